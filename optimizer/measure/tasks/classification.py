"""Classification: top-1/top-5 against labels and fidelity to a reference's logits.

The formulas (top-k, agreement, cosine, max |diff|, KL, Wilson intervals) are in
``deployopt.measure.metrics``; this metric feeds them batch by batch. The class axis is
configurable: the logits are moved to [rows, classes] with every other axis a row (an output
[N, C, 1, 1] of a 1x1-conv head is [N, C]). Labels are the dataset's class indices, one per row.

The score that gates and fallbacks compare (``score`` setting):

- ``top1`` (default): top-1 against the labels when the data is labelled, else top-1 agreement
  with the reference;
- ``kl``: ``exp(-KL)``, KL the mean of KL(softmax(reference) || softmax(model)) over the rows, so
  a model identical to its reference scores 1 and a drop ``d`` is a KL of ``-ln(1 - d)``, about
  ``d`` for small ``d``. Agreement counts only the rows whose top-1 flips, a step of 1/N on N
  rows; the KL moves with every probability, so a tolerance on it is steady on a few hundred
  samples and holds the whole distribution, not only the arg-max. Labels are not read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from deployopt.core.errors import UserError
from deployopt.core.settings import Settings
from deployopt.measure.metrics import FidelitySums, topk_hits, wilson_interval
from deployopt.measure.tasks.base import Metric, class_axis, does_not_fit


@dataclasses.dataclass
class ClassificationSettings(Settings):
    axis: int = -1  # the class axis
    score: Literal["top1", "kl"] = "top1"  # what gates and fallbacks compare (module doc)


def as_logits(x: np.ndarray, axis: int) -> np.ndarray:
    """[rows, classes]: an [N, C, 1, ...] head is [N, C]; otherwise ``axis`` goes last and every
    other axis becomes rows."""
    if x.ndim > 2 and all(d == 1 for d in x.shape[2:]):
        return x.reshape(x.shape[:2])
    axis %= x.ndim
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


class ClassificationMetric(Metric):
    kind = "classification"

    def __init__(self, settings: ClassificationSettings, outputs: Sequence[str], **_):
        super().__init__(outputs[:1])
        self.settings = settings
        self.n = self.top1 = self.top5 = 0
        self.classes: int | None = None
        self.sums: FidelitySums | None = None
        self.labeled = False

    def check(self, shapes: Mapping[str, Sequence[Any]]) -> None:
        name = self.outputs[0] if self.outputs else next(iter(shapes))
        shape = tuple(shapes[name])
        if len(shape) < 2:
            raise does_not_fit(self.kind, name, shape, "logits with a class axis [batch, classes]")
        class_axis(self.settings.axis, len(shape), self.kind, name, shape)

    def _logits(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        x = self.selected(outputs)[0]
        name = self.outputs[0] if self.outputs else next(iter(outputs))
        if x.ndim < 2:
            raise does_not_fit(self.kind, name, x.shape, "logits with a class axis [batch, classes]")
        class_axis(self.settings.axis, x.ndim, self.kind, name, x.shape)
        return as_logits(x, self.settings.axis)

    def predicted(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The top-1 class of every row of the logits this metric reads."""
        return self._logits(outputs).argmax(axis=1)

    def accumulate(self, outputs, reference_outputs=None, labels=None) -> None:
        z = self._logits(outputs)
        self.classes = z.shape[1]
        if labels is not None:
            y = np.asarray(labels, dtype=np.int64).reshape(-1)
            if y.shape != (len(z),):
                raise UserError(f"metric classification: {len(y)} labels for {len(z)} rows of logits")
            if y.size and (y.min() < 0 or y.max() >= self.classes):
                bad = int(y.max()) if y.max() >= self.classes else int(y.min())
                raise UserError(f"label {bad} is outside the {self.classes} classes of the model's output")
            self.labeled = True
            self.top1 += topk_hits(z, y, 1)
            if self.classes > 5:  # top-5 of 5 classes or fewer would be trivially 1
                self.top5 += topk_hits(z, y, 5)
        if reference_outputs is not None:
            r = self._logits(reference_outputs)
            if r.shape != z.shape:
                raise UserError(f"metric classification: the reference's logits are {list(r.shape)}, the "
                                f"model's {list(z.shape)}")
            self.sums = self.sums or FidelitySums()
            self.sums.add(z, r)
        self.n += len(z)

    def result(self) -> dict[str, Any]:
        n, labeled = self.n, self.labeled and self.n > 0
        top5 = labeled and self.classes > 5
        res: dict[str, Any] = {
            "classes": self.classes,
            "top1": self.top1 / n if labeled else None,
            "top1_ci": list(wilson_interval(self.top1, n)) if labeled else None,
            "top5": self.top5 / n if top5 else None,
            "top5_ci": list(wilson_interval(self.top5, n)) if top5 else None,
            "agreement": None, "agreement_ci": None, "cosine": None, "max_abs_diff": None, "kl": None,
        }
        if self.sums is not None and self.sums.n:
            res.update(self.sums.result())
        if self.settings.score == "kl":
            res.update(score=None if res["kl"] is None else math.exp(-res["kl"]), score_name="exp_neg_kl")
        else:
            res.update(score=res["top1"] if labeled else res["agreement"],
                       score_name="top1" if labeled else "agreement")
        return res
