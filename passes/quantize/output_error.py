"""The output error of a quantized model against its float model on fixed inputs.

For each output ``o`` of the model, its error relative to its own energy,

    E_o = Σ_samples ‖y_q,o − y_f,o‖² / Σ_samples ‖y_f,o‖²,

and over the ``O`` outputs their mean, ``E = (1/O) Σ_o E_o``, reported as output SQNR
``10 log10(1 / E)`` dB (higher is closer). Each output counts by its relative error, whatever its
scale: a detector's score maps (sigmoid values, mostly near 0) weigh as much as its box logits
(spread over several units), where one sum over all outputs would let the largest output decide
alone. With one output, ``E`` is that output's relative error. An output whose float values are
all zero is measured against the energy of all outputs.

It needs no labels and no task metric, so it applies to any model: ``calibration: auto`` chooses a
calibration method by it (calibration_choice.py), ``tune_ranges`` searches activation ranges by it
(range_tuning.py) and the fallback ranks tensors by how much of it each one adds (sensitivity.py).
The quantized model runs with onnxruntime's int8 kernels, as deployed.
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
        outputs = len(self.reference[0]) if self.reference else 0
        energy = [sum(float(np.sum(ys[o] ** 2)) for ys in self.reference) for o in range(outputs)]
        total = max(sum(energy), 1e-30)
        self.signal = [e if e > 0 else total for e in energy]  # per output, the denominator of E_o

    def error(self, model: pathlib.Path | bytes) -> float:
        """``E`` of ``model`` (a path or serialized bytes), run with onnxruntime's int8 kernels."""
        sess = open_session(model, threads=self.threads, what="the int8 model")
        noise = [0.0] * len(self.signal)
        for feed, ys in zip(self.feeds, self.reference):
            for o, (y, y_q) in enumerate(zip(ys, sess.run(None, feed))):
                noise[o] += float(np.sum((np.asarray(y_q, np.float64) - y) ** 2))
        return sum(n / s for n, s in zip(noise, self.signal)) / max(len(self.signal), 1)


def sqnr_db(error: float) -> float:
    """``10 log10(1 / E)``; inf for an exact model."""
    return math.inf if error == 0.0 else -10 * math.log10(error)
