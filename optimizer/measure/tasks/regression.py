"""Regression outputs (boxes, landmarks, embeddings) and any output without a task metric:
fidelity of the model's values to the reference model's.

Per sample the output is flattened to a vector z (model) and r (reference); over all samples
    cosine       = mean[ z.r / (|z| |r|) ]          (1 when both are zero, 0 when one is)
    mae          = mean |z - r| over all elements
    relative_mae = mae / std(r), std over every element of the reference (its spread), so the
                   error reads in units of the reference's own variation whatever the output's scale
    max_abs_diff = max |z - r|
accumulated as running sums (memory flat). The score is the cosine.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from deployopt.core.errors import UserError
from deployopt.core.settings import Settings
from deployopt.measure.metrics import row_cosine
from deployopt.measure.tasks.base import Metric


@dataclasses.dataclass
class RegressionSettings(Settings):
    pass


class RegressionMetric(Metric):
    kind = "regression"

    def __init__(self, settings: RegressionSettings, outputs, **_):
        super().__init__(outputs[:1])
        self.settings = settings
        self.n = self.count = 0
        self.cosine = self.abs_sum = self.ref_sum = self.ref_sq = self.max_abs = 0.0

    def accumulate(self, outputs, reference_outputs=None, labels=None) -> None:
        if reference_outputs is None:
            return  # nothing to compare with: regression has no label reader
        z = self.selected(outputs)[0].astype(np.float64)
        r = self.selected(reference_outputs)[0].astype(np.float64)
        if z.shape != r.shape:
            name = self.outputs[0] if self.outputs else next(iter(outputs))
            raise UserError(f"metric regression: output '{name}' is {list(z.shape)} but the reference's is "
                            f"{list(r.shape)}")
        rows = len(z) if z.ndim else 1
        z, r = z.reshape(rows, -1), r.reshape(rows, -1)
        cos = row_cosine(z, r)
        diff = np.abs(z - r)
        self.n += rows
        self.count += diff.size
        self.cosine += float(cos.sum())
        self.abs_sum += float(diff.sum())
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        self.ref_sum += float(r.sum())
        self.ref_sq += float((r * r).sum())

    def result(self) -> dict[str, Any]:
        if not self.n:
            return {"score": None, "score_name": "cosine", "cosine": None, "mae": None, "relative_mae": None,
                    "max_abs_diff": None}
        mean = self.ref_sum / self.count
        spread = math.sqrt(max(self.ref_sq / self.count - mean * mean, 0.0))
        mae = self.abs_sum / self.count
        cosine = self.cosine / self.n
        return {"score": cosine, "score_name": "cosine", "cosine": cosine, "mae": mae,
                "relative_mae": mae / spread if spread > 0 else (0.0 if mae == 0 else math.inf),
                "max_abs_diff": self.max_abs}
