"""Activation ranges by error search (``calibration: mse``): per tensor, the clipping range whose
quantize-dequantize has the least mean squared error on the calibration data.

minmax sets ``[lo, hi]`` to the extremes seen, so one outlier stretches the grid step of every
value. Here each tensor's values are summarised by a histogram (onnxruntime's histogram
collector: ``HIST_BINS`` bins over ``[−T, T]``, ``T`` = max |x|, merged chunk by chunk), and the
range is chosen among candidates ``lo = a · min, hi = b · max`` with ``a, b`` on the grid
``FRACTIONS`` (one factor when the tensor never goes negative, or with symmetric activations),
minimising

    MSE(lo, hi) = Σ_bins n_i (s (clip(round(c_i / s) + z, qmin, qmax) − z) − c_i)² / Σ n_i

over the bin centres ``c_i`` with counts ``n_i``, where ``s, z`` follow from ``[lo, hi]`` the way
onnxruntime derives them (the range is widened to contain 0; ``s = (hi − lo) / (qmax − qmin)``,
``z = round(qmin − lo / s)``). The minmax range is one of the candidates, so the chosen error is
never above minmax's on the histogram. This is each tensor's own error, not the error it causes
downstream.
"""

from __future__ import annotations

import numpy as np

#: Histogram bins over [−T, T]: a uint8 step then spans several bins for every clipping range tried.
HIST_BINS = 8192
#: Clipping factors of the minimum and maximum tried (1.0: minmax).
FRACTIONS = np.concatenate([np.linspace(1.0, 0.5, 26), np.geomspace(0.48, 0.05, 24)])
#: Candidate ranges whose errors are computed together (qdq_mse).
CANDIDATE_BLOCK = 32


def _scale_zero(lo: np.ndarray, hi: np.ndarray, qmin: int, qmax: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if symmetric:
        hi = np.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / (qmax - qmin)
    scale = np.where(scale > 0, scale, 1.0)
    if symmetric:
        return scale, np.full_like(scale, round((qmin + qmax) / 2))
    zero = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


def qdq_mse(centres: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, qmin: int, qmax: int,
            symmetric: bool = False) -> np.ndarray:
    """Mean squared quantize-dequantize error of the histogram for each candidate range (vectors)."""
    scale, zero = _scale_zero(np.asarray(lo, np.float64), np.asarray(hi, np.float64), qmin, qmax, symmetric)
    total = max(counts.sum(), 1)
    errors = np.empty(len(scale))
    # A few candidates at a time: the (candidates x bins) temporaries then stay in the CPU cache.
    # All 2,500 candidates of a two-signed tensor at once are 160 MB per temporary: EfficientNet-Lite0's
    # 95 searches took 19 s that way, 3 s in blocks, with the same results.
    for start in range(0, len(scale), CANDIDATE_BLOCK):
        s, z = scale[start:start + CANDIDATE_BLOCK, None], zero[start:start + CANDIDATE_BLOCK, None]
        q = np.clip(np.round(centres[None, :] / s) + z, qmin, qmax)
        err = (s * (q - z) - centres[None, :]) ** 2
        errors[start:start + CANDIDATE_BLOCK] = err @ counts / total
    return errors


def search(hist: np.ndarray, edges: np.ndarray, low: float, high: float, qmin: int, qmax: int,
           symmetric: bool = False) -> tuple[float, float, float, float]:
    """The range ``(lo, hi)`` with the least error on the histogram, that error, and minmax's."""
    counts = np.asarray(hist, np.float64)
    centres = (np.asarray(edges[:-1], np.float64) + np.asarray(edges[1:], np.float64)) / 2
    keep = counts > 0
    counts, centres = counts[keep], centres[keep]
    low, high = float(min(low, 0.0)), float(max(high, 0.0))
    if symmetric or low == 0.0 or high == 0.0:
        a, b = FRACTIONS, FRACTIONS
    else:  # both signs: every pair of factors
        a, b = (f.ravel() for f in np.meshgrid(FRACTIONS, FRACTIONS))
    lo, hi = a * low, b * high
    errors = qdq_mse(centres, counts, lo, hi, qmin, qmax, symmetric)
    best = int(np.argmin(errors))
    minmax = float(qdq_mse(centres, counts, np.array([low]), np.array([high]), qmin, qmax, symmetric)[0])
    return float(lo[best]), float(hi[best]), float(errors[best]), minmax
