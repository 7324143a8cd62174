"""The output error of a quantized model against its float model on fixed inputs.

    E = Σ_samples Σ_outputs ‖y_q − y_f‖² / Σ_samples Σ_outputs ‖y_f‖²,

reported as output SQNR ``10 log10(1 / E)`` dB (higher is closer). It needs no labels and no
task metric, so it applies to any model: ``calibration: auto`` chooses a calibration method by
it (calibration_choice.py) and ``tune_ranges`` searches activation ranges by it
(range_tuning.py). The quantized model runs with onnxruntime's int8 kernels, as deployed.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterable

import numpy as np

from deployopt.core.session import open_session
from deployopt.passes.quantize.data import Feed, samples_in


class OutputError:
    """The relative output error ``E`` (module doc) of QDQ models against the float model on fixed
    feeds; the float model runs once, when this is made."""

    def __init__(self, float_model: pathlib.Path, feeds: Iterable[Feed], threads: int):
        self.feeds = list(feeds)
        self.samples = sum(samples_in(feed) for feed in self.feeds)
        self.threads = threads
        ref = open_session(float_model, threads=threads, what="the float model")
        self.reference = [[np.asarray(y, np.float64) for y in ref.run(None, feed)] for feed in self.feeds]
        self.signal = sum(float(np.sum(y ** 2)) for ys in self.reference for y in ys)

    def error(self, model: pathlib.Path | bytes) -> float:
        """``E`` of ``model`` (a path or serialized bytes), run with onnxruntime's int8 kernels."""
        sess = open_session(model, threads=self.threads, what="the int8 model")
        noise = 0.0
        for feed, ys in zip(self.feeds, self.reference):
            noise += sum(float(np.sum((np.asarray(y_q, np.float64) - y) ** 2)) for y, y_q in zip(ys, sess.run(None, feed)))
        return noise / max(self.signal, 1e-30)


def sqnr_db(error: float) -> float:
    """``10 log10(1 / E)``; inf for an exact model."""
    return math.inf if error == 0.0 else -10 * math.log10(error)
