"""Task metrics: each vision task judged by its own metric, batch by batch.

``base``: the ``Metric`` contract (``accumulate(outputs, reference_outputs, labels)``, ``result()``
with a primary ``score``). One module per task: ``classification``, ``detection`` (decoding and
NMS in ``boxes``), ``segmentation``, ``sequence`` (CTC), ``regression`` (the generic fidelity
metric), ``custom`` (``package.module:function``). ``labels`` reads label files aligned with a
dataset; ``choose`` parses metric specs, builds metrics, picks defaults and suggests metrics.
"""

from deployopt.measure.tasks.base import Metric
from deployopt.measure.tasks.choose import (KINDS, LABEL_KINDS, MetricSpec, build_metric, default_specs, is_logits,
                                            metric_specs, parse_metric, suggest)
from deployopt.measure.tasks.labels import CocoLabels, MaskLabels, TextLabels, read_charset

__all__ = ["KINDS", "LABEL_KINDS", "CocoLabels", "MaskLabels", "Metric", "MetricSpec", "TextLabels", "build_metric",
           "default_specs", "is_logits", "metric_specs", "parse_metric", "read_charset", "suggest"]
