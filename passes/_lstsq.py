"""Streamed ridge least squares for layer reconstruction (``prune``, ``channel_prune``).

A layer seen as a linear map ``y = W x + b`` (Conv via im2col patches, Gemm/MatMul via rows) is
re-fitted so that its outputs on the pruned model's inputs ``X`` match target outputs ``Y``
(usually the dense model's). Only the sufficient statistics are kept, so memory is flat in the
number of samples:

    G = X̃ᵀX̃   (k+1 × k+1, X̃ = [X, 1] when the bias is fitted)
    C = X̃ᵀY   (k+1 × m)
    s = Σ y²  per output (m), and the row count n

For output ``o`` restricted to its kept inputs ``K_o`` (the unmasked weights) the ridge solution is

    θ_o = (G[K_o, K_o] + λ D)⁻¹ (C[K_o, o] + λ D θ⁰_o),   λ = ridge · mean(diag G[:k, :k])

where ``D`` is the identity on the weight coordinates and zero on the bias coordinate (the bias
is not shrunk), and ``θ⁰`` the ``prior`` weights the ridge pulls toward (zero by default, which
is plain ridge regression ``(XᵀX + λI)⁻¹ Xᵀy``). ``ridge`` is relative to the mean input
energy, so one value suits layers of any scale (the same convention as GPTQ's damping). With
``ridge == 0`` (or all-zero inputs) the minimum-norm least-squares solution is used, which stays
defined when ``G`` is singular (dead ReLU channels, constant padding).

The squared error of any weights follows from the same statistics without revisiting the data:

    E(θ_o) = Σ_n (x̃_n·θ_o − y_no)² = θ_oᵀ G θ_o − 2 θ_oᵀ C[:, o] + s_o

Written by hand: numpy/scipy solve one system, but no library keeps streamed normal equations
with a per-output sparsity pattern.
"""

from __future__ import annotations

import numpy as np


class GramAccumulator:
    """Accumulate XᵀX, XᵀY and Σy² over streamed batches, then solve masked ridge problems.

    ``GramAccumulator(in_features, out_features, intercept=True)``; ``add(x [n, k], y [n, m])``
    any number of times; ``solve(ridge, keep)`` -> ``(W [m, k], b [m] | None)``;
    ``squared_error(W, b)`` -> ``[m]`` and ``target_energy`` (Σy² per output) for relative errors.
    """

    def __init__(self, in_features: int, out_features: int, *, intercept: bool = True):
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.intercept = bool(intercept)
        size = self.in_features + (1 if self.intercept else 0)
        self.gram = np.zeros((size, size), dtype=np.float64)
        self.cross = np.zeros((size, self.out_features), dtype=np.float64)
        self.target_energy = np.zeros(self.out_features, dtype=np.float64)
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add ``n`` rows: inputs ``x [n, in_features]``, targets ``y [n, out_features]``."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x: expected [n, {self.in_features}], got {list(x.shape)}")
        if y.shape != (x.shape[0], self.out_features):
            raise ValueError(f"y: expected [{x.shape[0]}, {self.out_features}], "
                             f"got {list(y.shape)}")
        k = self.in_features
        self.gram[:k, :k] += x.T @ x
        self.cross[:k] += x.T @ y
        if self.intercept:
            col_sum = x.sum(axis=0)
            self.gram[:k, k] += col_sum
            self.gram[k, :k] += col_sum
            self.gram[k, k] += x.shape[0]
            self.cross[k] += y.sum(axis=0)
        self.target_energy += np.einsum("nm,nm->m", y, y)
        self.rows += x.shape[0]

    def damping(self, ridge: float) -> float:
        """λ = ridge · mean(diag(XᵀX)) over the weight coordinates."""
        k = self.in_features
        return float(ridge) * float(np.mean(np.diag(self.gram)[:k])) if k else 0.0

    def solve(self, ridge: float, keep: np.ndarray | None = None,
              prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Ridge solution with the weights outside ``keep`` fixed at zero.

        ``keep``: None (all inputs), a bool vector ``[k]`` shared by all outputs (one multi-output
        solve, e.g. inputs removed by channel pruning), or a bool matrix ``[m, k]`` (one solve per
        output, e.g. unstructured pruning masks). ``prior [m, k]``: the weights the ridge term
        pulls toward (default zero). Returns ``W [m, k]`` (zeros outside ``keep``)
        and ``b [m]`` (None without intercept).
        """
        if self.rows == 0:
            raise ValueError("no rows were added")
        k, m = self.in_features, self.out_features
        lam = self.damping(ridge)
        weights = np.zeros((m, k), dtype=np.float64)
        bias = np.zeros(m, dtype=np.float64) if self.intercept else None
        if keep is None:
            keep = np.ones(k, dtype=bool)
        keep = np.asarray(keep, dtype=bool)
        prior = np.zeros((m, k)) if prior is None else np.asarray(prior, dtype=np.float64)
        if keep.shape == (k,):
            kept = np.flatnonzero(keep)
            theta = self._solve_subset(kept, self.cross, lam, prior[:, kept].T)
            weights[:, keep] = theta[: keep.sum()].T
            if bias is not None:
                bias[:] = theta[-1]
            return weights, bias
        if keep.shape != (m, k):
            raise ValueError(f"keep: expected [{k}] or [{m}, {k}], got {list(keep.shape)}")
        for o in range(m):
            kept = np.flatnonzero(keep[o])
            theta = self._solve_subset(kept, self.cross[:, o : o + 1], lam,
                                       prior[o, kept][:, None])[:, 0]
            weights[o, kept] = theta[: kept.size]
            if bias is not None:
                bias[o] = theta[-1]
        return weights, bias

    def _solve_subset(self, kept: np.ndarray, rhs: np.ndarray, lam: float,
                      prior: np.ndarray) -> np.ndarray:
        index = np.append(kept, self.in_features) if self.intercept else kept
        if index.size == 0:
            return np.zeros((0, rhs.shape[1]))
        a = self.gram[np.ix_(index, index)].copy()
        b = rhs[index].copy()
        if lam > 0:
            a[np.arange(kept.size), np.arange(kept.size)] += lam  # the bias is not shrunk
            b[: kept.size] += lam * prior
            try:
                return np.linalg.solve(a, b)
            except np.linalg.LinAlgError:
                pass  # only when the bias column alone is singular (no rows): fall through
        return np.linalg.lstsq(a, b, rcond=None)[0]

    def squared_error(self, weights: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """Σ_n (x_n·w_o + b_o − y_no)² per output, from the accumulated statistics."""
        theta = np.asarray(weights, dtype=np.float64).T  # [k, m]
        if self.intercept:
            b = np.zeros(self.out_features) if bias is None else np.asarray(bias, dtype=np.float64)
            theta = np.vstack([theta, b[None, :]])
        elif bias is not None:
            raise ValueError("bias given to an accumulator without intercept")
        quad = np.einsum("km,km->m", theta, self.gram @ theta)
        error = quad - 2.0 * np.einsum("km,km->m", theta, self.cross) + self.target_energy
        return np.maximum(error, 0.0)  # rounding can push an exact fit a hair below zero


def conv_pads(auto_pad: str, pads, in_size, kernel, strides, dilations) -> tuple[int, ...]:
    """Explicit ONNX pads ``[h_begin, w_begin, h_end, w_end]`` for a 2-D Conv, resolving auto_pad.

    SAME_*: total = max((⌈i/s⌉ − 1)·s + (k − 1)·d + 1 − i, 0), the odd pixel at the end for
    SAME_UPPER and at the beginning for SAME_LOWER (the ONNX Conv definition).
    """
    if auto_pad in ("", "NOTSET"):
        return tuple(int(p) for p in pads) if pads else (0,) * (2 * len(kernel))
    if auto_pad == "VALID":
        return (0,) * (2 * len(kernel))
    begins, ends = [], []
    for i, k, s, d in zip(in_size, kernel, strides, dilations):
        total = max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return tuple(begins + ends)


def conv_patches(x: np.ndarray, kernel: tuple[int, int], *, strides=(1, 1), pads=(0, 0, 0, 0),
                 dilations=(1, 1), group: int = 1,
                 positions: np.ndarray | None = None) -> np.ndarray:
    """im2col for a 2-D Conv: ``x [b, C, H, W]`` -> ``[group, b·P, C/group·kh·kw]``.

    Row ``(i, p)`` holds the receptive field of output position ``p`` (row-major over the
    ``oh × ow`` output grid; all positions, or the flat indices in ``positions``) of sample ``i``;
    columns follow ``W[o].reshape(-1)`` (channel, kernel row, kernel column), so
    ``conv(x)[i, o, p] = patches[g(o)][i·P + p] · W[o].reshape(-1) + b[o]``. Only the selected
    positions are copied out of the strided window view.
    Written by hand: numpy has sliding windows but no im2col with stride/pad/dilation/groups.
    """
    b, c, _, _ = x.shape
    kh, kw = kernel
    (sh, sw), (dh, dw) = strides, dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = np.lib.stride_tricks.sliding_window_view(xp, span, axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [b, c, oh, ow, kh, kw]
    oh, ow = windows.shape[2:4]
    if positions is None:
        positions = np.arange(oh * ow)
    cols = windows[:, :, positions // ow, positions % ow]  # [b, c, P, kh, kw] (a copy)
    p = cols.shape[2]
    cols = cols.reshape(b, group, c // group, p, kh, kw).transpose(1, 0, 3, 2, 4, 5)
    return cols.reshape(group, b * p, (c // group) * kh * kw)


def conv_output_size(in_size, kernel, strides, pads, dilations) -> tuple[int, int]:
    """Output grid ``(oh, ow)``: ⌊(i + pad_begin + pad_end − (k − 1)·d − 1) / s⌋ + 1."""
    n = len(kernel)
    return tuple((i + pads[a] + pads[a + n] - (k - 1) * d - 1) // s + 1
                 for a, (i, k, s, d) in enumerate(zip(in_size, kernel, strides, dilations)))
