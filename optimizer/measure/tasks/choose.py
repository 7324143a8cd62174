"""Which metric judges which output: parsing metric specs, building metrics, defaults, suggestions.

A metric spec names a kind, the outputs it reads and its settings:

    OUTPUT=KIND[:key=value,...]      e.g. ``sigmoid_0.tmp_0=segmentation:threshold=0.3``
    OUT1,OUT2=KIND[:...]             several outputs (decoded boxes, scores, classes)
    KIND[:key=value,...]             the first output, or every output for ``detection``
    [OUTPUT=]package.module:function[:key=value,...]   user code (``tasks.custom``)

The same as a mapping (the Python API, a recipe): ``{OUTPUT: KIND}`` or
``{OUTPUT: {kind: KIND, key: value}}``. Values are read as YAML scalars (0.3, true, null) and
checked against the kind's settings dataclass. Without any spec every output gets a default:
2-D logits (or [N, C, 1, 1]) ``classification``, anything else the generic fidelity metric
``regression``. ``suggest`` (``deployopt.core.stats.suggest_metrics``, which ``inspect`` prints)
proposes a metric per output from the output shapes alone.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from deployopt.core.errors import UserError
from deployopt.core.settings import build_settings
from deployopt.core.stats import is_logits, suggest_metrics as suggest  # noqa: F401 - shape rules shared with inspect
from deployopt.measure.tasks.base import Metric
from deployopt.measure.tasks.classification import ClassificationMetric, ClassificationSettings
from deployopt.measure.tasks.custom import CustomMetric
from deployopt.measure.tasks.detection import DetectionMetric, DetectionSettings
from deployopt.measure.tasks.regression import RegressionMetric, RegressionSettings
from deployopt.measure.tasks.segmentation import SegmentationMetric, SegmentationSettings
from deployopt.measure.tasks.sequence import SequenceMetric, SequenceSettings

KINDS: dict[str, tuple[type[Metric], type]] = {
    "classification": (ClassificationMetric, ClassificationSettings),
    "detection": (DetectionMetric, DetectionSettings),
    "segmentation": (SegmentationMetric, SegmentationSettings),
    "sequence": (SequenceMetric, SequenceSettings),
    "regression": (RegressionMetric, RegressionSettings),
}
LABEL_KINDS = ("detection", "segmentation", "sequence")  # kinds that read a --labels file
_CUSTOM = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*(:|$)")
_BUILTIN = re.compile(rf"^({'|'.join(KINDS)})(:|$)")


@dataclasses.dataclass
class MetricSpec:
    kind: str  # a KINDS name or package.module:function
    outputs: list[str] = dataclasses.field(default_factory=list)  # empty: the kind's default
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def custom(self) -> bool:
        return self.kind not in KINDS

    def label(self) -> str:
        return f"{','.join(self.outputs)}={self.kind}" if self.outputs else self.kind


def _options(text: str, where: str) -> dict[str, Any]:
    import yaml

    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{where}: {item!r} is not key=value")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


def _kind_part(text: str, where: str) -> tuple[str, dict[str, Any]] | None:
    """(kind, options) when ``text`` is KIND[:options] or module:function[:options], else None."""
    if _BUILTIN.match(text):
        kind, _, rest = text.partition(":")
        return kind, _options(rest, where)
    if _CUSTOM.match(text):
        module, fn, *rest = text.split(":", 2)
        return f"{module}:{fn}", _options(rest[0] if rest else "", where)
    return None


def parse_metric(text: str, where: str = "--metric") -> MetricSpec:
    """A spec from ``OUTPUT=KIND[:options]`` or ``KIND[:options]`` (see the module docstring)."""
    found = _kind_part(text, where)
    if found is not None:
        return MetricSpec(found[0], [], found[1])
    for i, ch in enumerate(text):
        if ch == "=" and i and (found := _kind_part(text[i + 1:], where)) is not None:
            return MetricSpec(found[0], [n.strip() for n in text[:i].split(",")], found[1])
    raise UserError(f"{where}: {text!r} is not OUTPUT=KIND or KIND, with KIND one of {', '.join(KINDS)} "
                    "or package.module:function")


def metric_specs(metrics: Any, where: str = "metrics") -> list[MetricSpec]:
    """Specs from what the API or a recipe gives: None, a spec string, a list of them, or a
    mapping ``{OUTPUT: KIND | {kind: KIND, ...settings}}``."""
    if metrics is None:
        return []
    if isinstance(metrics, MetricSpec):
        return [metrics]
    if isinstance(metrics, str):
        return [parse_metric(metrics, where)]
    if isinstance(metrics, Mapping):
        specs = []
        for output, value in metrics.items():
            key = f"{where}.{output}"
            if isinstance(value, str):
                spec = parse_metric(value, key)
            elif isinstance(value, Mapping) and isinstance(value.get("kind"), str):
                spec = parse_metric(value["kind"], key)
                spec.options.update({k: v for k, v in value.items() if k != "kind"})
            else:
                raise UserError(f"{key}: expected a metric kind or a mapping with 'kind', got {value!r}")
            spec.outputs = [n.strip() for n in str(output).split(",")]
            specs.append(spec)
        return specs
    if isinstance(metrics, Sequence):
        return [s for i, m in enumerate(metrics) for s in metric_specs(m, f"{where}[{i}]")]
    raise UserError(f"{where}: expected a metric spec, a list of them or a mapping, got {type(metrics).__name__}")


def default_specs(output_shapes: Mapping[str, Sequence[Any]]) -> list[MetricSpec]:
    """Without a spec: classification for logits, the generic fidelity metric for the rest."""
    return [MetricSpec("classification" if is_logits(shape) else "regression", [name])
            for name, shape in output_shapes.items()]


def build_metric(spec: MetricSpec, output_shapes: Mapping[str, Sequence[Any]], *, input_hw=None,
                 labels=None, charset: list[str] | None = None, where: str = "--metric") -> Metric:
    """The metric a spec names, checked against the model's outputs (name -> dims) before any run."""
    unknown = [n for n in spec.outputs if n not in output_shapes]
    if unknown:
        raise UserError(f"{where} {spec.label()}: the model has no output '{unknown[0]}' (outputs: "
                        f"{', '.join(output_shapes)})")
    outputs = spec.outputs or ([] if spec.kind == "detection" or spec.custom else list(output_shapes)[:1])
    if spec.custom:
        return CustomMetric(spec.kind, spec.options, outputs)
    cls, settings_cls = KINDS[spec.kind]
    settings = build_settings(settings_cls, spec.options, f"{where} {spec.label()}")
    if spec.kind == "sequence" and charset is None and settings.charset is not None:
        from deployopt.measure.tasks.labels import read_charset

        charset = read_charset(settings.charset)
    metric = cls(settings, outputs, input_hw=input_hw, labels=labels, charset=charset)
    metric.check({n: output_shapes[n] for n in (metric.outputs or output_shapes)})
    return metric
