"""``calibration: auto``: quantize with several calibration methods and keep the one whose int8
model's outputs are closest to the float model's.

No range method wins on every network. Measured on the 440 held-out photo crops (top-1
agreement with fp32, onnxruntime int8 kernels, this repository's benchmarks): MobileNetV2 minmax
88.4%, mse 90.5%, entropy 92.5%; EfficientNet-Lite0 minmax 94.3%, mse 95.9%, entropy 95.0%.
Each method's whole int8 model (ranges, rounding, bias correction) is therefore made and scored
by its relative output error ``E`` on the first calibration samples (output_error.py: with one
output ``Σ‖y_q − y_f‖² / Σ‖y_f‖²``, with several the mean of each output's own),
reported as ``10 log10(1 / E)`` dB (output SQNR; higher is closer). On those two networks the
ranking by ``E`` on 64 calibration crops is the ranking by held-out agreement (the two
EfficientNet-Lite0 methods within 1 point of each other excepted), and ``E`` needs no labels and
no task metric, so it applies to any model. The samples are the calibration data's own: the
choice is between three sets of ranges, few degrees of freedom to fit.
"""

from __future__ import annotations

import pathlib

from deployopt.passes.quantize.output_error import OutputError, sqnr_db

#: The methods ``auto`` tries, in order (a tie keeps the earlier, cheaper one).
AUTO_METHODS = ("minmax", "mse", "entropy")


def output_sqnr_db(error: OutputError, candidates: dict[str, pathlib.Path]) -> dict[str, float]:
    """Per candidate, ``10 log10(1 / E)`` on ``error``'s feeds (inf when equal)."""
    return {name: sqnr_db(error.error(path)) for name, path in candidates.items()}


def best_method(scores: dict[str, float]) -> str:
    """The method with the highest output SQNR; the first listed wins a tie."""
    return max(scores, key=lambda m: (scores[m], -list(scores).index(m)))
