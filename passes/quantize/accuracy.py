"""How a quantized candidate is judged against the float model: by the task metrics of the
recipe (``context.metrics``; without any, top-1 for a logits classifier and the fidelity metric
for other outputs), through the one judging rule of ``deployopt.measure.judge``.

With ``max_accuracy_drop`` (``Scorer``): per metric, drop = float score - candidate score, the
float score being the float model's own score against labels when the metric reads labels
(top-1 on a labelled data.evaluation, mAP / mIoU / exact-match against a label file), else 1
(agreement with the float model); divided by the float score when ``relative``. The candidate's
drop is the largest over the metrics, and it meets the rule when ``drop <= max_accuracy_drop``.
The fallback and the latency trials use it.

Without it (``AgreementCheck``, latency trials only): the task score against the float model
(agreement, box F1, pixel agreement, ...; labels are not read) on up to ``AGREEMENT_SAMPLES``
samples may fall at most ``AGREEMENT_SLACK`` below the first quantization's, so that trading
accuracy for speed is never silent.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnxruntime as ort

from deployopt.core.data import Dataset
from deployopt.measure.judge import Judge, Verdict
from deployopt.measure.metrics import predicted_class
from deployopt.passes.quantize.data import Feed

#: Without max_accuracy_drop, a trial's task score against the float model may fall at most
#: this much below the first quantization's.
AGREEMENT_SLACK = 0.01
#: Samples the agreement check runs (evaluation data, else calibration data).
AGREEMENT_SAMPLES = 256


def predicted_classes(sess: ort.InferenceSession, stream: Iterable[Feed]) -> np.ndarray:
    """Arg-max over the last axis of the first output, per sample and position: ``[N]`` for
    ``[N, classes]`` logits, ``[N, T]`` for a sequence model's ``[N, T, classes]``."""
    output = sess.get_outputs()[0].name
    parts = [predicted_class(sess.run([output], feed)[0]) for feed in stream]
    return np.concatenate(parts) if parts else np.empty(0)


def verdict_record(verdict: Verdict) -> dict[str, Any]:
    """A trial's accuracy fields: the metric that decides, its score and the drop; with several
    metrics, every metric's score and drop too."""
    record: dict[str, Any] = {"metric": verdict.metric, verdict.metric: _round(verdict.score),
                              "drop": _round(verdict.drop)}
    if len(verdict.per_metric) > 1:
        record["metrics"] = {f"{','.join(m['outputs'])}:{m['metric']}": {"score": _round(m["score"]),
                                                                         "drop": _round(m["drop"])}
                             for m in verdict.per_metric}
    return record


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


class Scorer:
    """``max_accuracy_drop`` on data.evaluation (module doc); the float model's scores are measured once."""

    def __init__(self, float_path: pathlib.Path, dataset: Dataset, *, metrics: Any = None, tolerance: float,
                 relative: bool, batch_size: int, threads: int):
        self.tolerance, self.relative = float(tolerance), relative
        self.judge = Judge(float_path, dataset, metrics=metrics, relative=relative, batch_size=batch_size,
                           threads=threads)
        self._bases: dict[str, float] = {}

    def score(self, path: pathlib.Path) -> Verdict:
        """The verdict on the model at ``path`` (its ``drop`` is the largest over the metrics)."""
        verdict = self.judge.score(path)
        self._bases.update({m["metric"]: m["base"] for m in verdict.per_metric})
        return verdict

    def base(self, metric: str) -> float | None:
        """The float model's value of ``metric`` (a score name): its score against labels, else 1."""
        return self._bases.get(metric)

    def met(self, drop: float | None) -> bool:
        return drop is not None and drop <= self.tolerance + 1e-12

    def __call__(self, path: pathlib.Path) -> dict:
        """The accuracy record of a latency trial."""
        verdict = self.score(path)
        return {**verdict_record(verdict), "met": self.met(verdict.drop)}


class AgreementCheck:
    """The accuracy rule of a latency trial without ``max_accuracy_drop`` (module doc). The floors
    (one per metric) are set by the first call on ``first`` (the first quantization, scored before
    any other); a trial meets the rule when every metric is at or above its floor."""

    def __init__(self, float_path: pathlib.Path, dataset: Dataset, *, metrics: Any = None, first: pathlib.Path,
                 batch_size: int, threads: int):
        self.dataset, self.first = dataset, first
        self.floors: list[float] | None = None
        self.judge = Judge(float_path, dataset, metrics=metrics, batch_size=batch_size, threads=threads,
                           limit=AGREEMENT_SAMPLES, use_labels=False)

    def __call__(self, path: pathlib.Path) -> dict:
        verdict = self.judge.score(path)
        scores = [m["score"] for m in verdict.per_metric]
        if path == self.first and self.floors is None:
            self.floors = [v - AGREEMENT_SLACK for v in scores]
        met = all(v >= floor - 1e-12 for v, floor in zip(scores, self.floors))
        return {"metric": verdict.metric, verdict.metric: _round(verdict.score), "data": self.dataset.name,
                "met": bool(met)}
