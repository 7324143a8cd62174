"""Learned rounding of int8 weights (AdaRound) on a layer's calibration statistics.

Round-to-nearest minimises each weight's own error; what matters is the layer's output error.
AdaRound chooses, for every weight, between the grid points below and above it:

    q = clip(floor(W / s) + z + h(V), qmin, qmax),   Ŵ = s (q − z),
    h(V) = clip(sigmoid(V) (ζ − γ) + γ, 0, 1),       ζ = 1.1, γ = −0.1

(``s``, ``z``: the layer's per-channel scale and zero point, kept as the quantizer chose them), and
learns the continuous ``V`` by minimising

    L(V) = Σ_rows ΔŴ H ΔŴᵀ / E_nearest + λ mean(1 − |2 h(V) − 1|^β),    ΔŴ = Ŵ − W

with ``H = E[x xᵀ] + δ mean(diag) I`` the (damped) second moment of the layer's float inputs on
calibration data (the same statistics GPTQ uses, refine.py: the first term is the layer's output
error ``E‖ΔŴ x‖²`` before its activation) and ``E_nearest`` that error under round-to-nearest, so
one ``λ`` suits every layer. ``V`` starts where ``h(V)`` equals the fractional part of ``W / s``
(the soft weights equal the float ones). For the first ``WARMUP`` of the iterations only the
output error is minimised; then the regulariser, with ``β`` annealed from ``BETA[0]`` to
``BETA[1]``, pushes every ``h`` to 0 or 1. The final weights are ``floor(W / s) + z + [h(V) ≥ ½]``:
always the floor or the ceiling of ``W / s`` (clipped to the integer range). Adam on ``V``; the
gradient of the first term is ``2 ΔŴ H s h'(V) / E_nearest`` (zero where ``q`` is clipped).

Cost per iteration is one ``(R, K) x (K, K)`` product per group, independent of the number of
calibration samples (the statistics are sums). ``budget`` splits a wall-time budget over layers
in proportion to that cost; a layer that cannot afford ``MIN_ITERATIONS`` is left to the caller.

Written in numpy (no torch): the objective is quadratic in ``Ŵ`` given ``H``, so no framework or
autograd is needed and a base install runs it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

#: Stretch of the rectified sigmoid (AdaRound's ζ, γ): h reaches exactly 0 and 1.
ZETA, GAMMA = 1.1, -0.1
#: β of the regulariser, annealed linearly from the first to the second value after warm-up.
BETA = (20.0, 2.0)
#: Share of the iterations with the output error only (no regulariser).
WARMUP = 0.2
#: Adam step on V (V starts within about ±3) and its moments.
LEARNING_RATE = 0.05
ADAM = (0.9, 0.999, 1e-8)
#: λ, the weight of the rounding regulariser against the relative output error.
REG = 3.0
#: Below this many iterations learned rounding is not attempted on a layer.
MIN_ITERATIONS = 50
#: Relative output error of round-to-nearest below which a layer counts as exact.
EXACT = 1e-10
#: Iterations timed to predict a layer's cost.
PROBE_ITERATIONS = 5


@dataclasses.dataclass
class Outcome:
    """Integer weights (G, R, K) chosen by AdaRound, or None with the reason."""

    q: np.ndarray | None
    iterations: int
    seconds: float
    reason: str = ""


def rectified_sigmoid(v: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(rest: np.ndarray) -> np.ndarray:
    """V with h(V) = rest (the fractional part of W / s), so the soft weights start at W."""
    p = np.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def damped(hessian: np.ndarray, damp: float) -> np.ndarray:
    """``H + damp · mean(diag H) I`` per group; inputs never seen get a unit diagonal."""
    h = hessian.astype(np.float64).copy()
    k = h.shape[-1]
    idx = np.arange(k)
    diag = h[:, idx, idx]
    h[:, idx, idx] += np.where(diag <= 0, 1.0, 0.0)
    h[:, idx, idx] += damp * np.mean(h[:, idx, idx], axis=1, keepdims=True)
    return h


def cost(weight_shape: tuple[int, int, int]) -> float:
    """Multiply-adds of one iteration: G · R · K²."""
    g, r, k = weight_shape
    return float(g) * r * k * k


def adaround(weight: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int, hessian: np.ndarray,
             *, iterations: int, reg: float, seconds: float | None = None) -> Outcome:
    """AdaRound of ``weight`` (G, R, K) on the grid ``s (q − z)``; ``scale``/``zero`` (G, R),
    ``hessian`` (G, K, K) already damped. ``seconds``: the wall time this layer may take (None: no
    limit); the number of iterations is cut to fit it, after timing the first ones."""
    t0 = time.perf_counter()
    s = np.where(scale > 0, scale, 1.0)[:, :, None].astype(np.float32)
    z = zero[:, :, None].astype(np.float32)
    w = weight.astype(np.float32)
    h32 = hessian.astype(np.float32)
    base = np.floor(w / s)
    lo, hi = qmin - z - base, qmax - z - base  # the clip in units above floor
    nearest = np.clip(np.round(w / s) + z, qmin, qmax)
    d_near = s * (nearest - z) - w
    e_near = float(np.sum(np.matmul(d_near, h32) * d_near))
    if e_near <= EXACT * float(np.sum(np.matmul(w, h32) * w)):  # float32 noise: nothing to learn
        return Outcome(None, 0, time.perf_counter() - t0, "round-to-nearest is exact on the calibration data")
    v = initial_v(w / s - base)
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps = ADAM
    scale_grad = (ZETA - GAMMA)
    n_weights = v.size
    planned = iterations
    step = 0
    while step < planned:
        sig = 1.0 / (1.0 + np.exp(-v))
        raw = sig * scale_grad + GAMMA
        h = np.clip(raw, 0.0, 1.0)
        up = np.clip(h, lo, hi)
        delta = s * (base + up) - w
        grad_h = 2.0 * np.matmul(delta, h32) * s / e_near
        grad_h *= (h > lo) & (h < hi)
        warm = int(WARMUP * planned)
        if step >= warm:
            frac = (step - warm) / max(planned - warm, 1)
            beta = BETA[0] + (BETA[1] - BETA[0]) * frac
            t = 2.0 * h - 1.0
            grad_h += reg / n_weights * (-beta * np.abs(t) ** (beta - 1) * np.sign(t) * 2.0)
        grad_v = grad_h * ((raw > 0) & (raw < 1)) * scale_grad * sig * (1 - sig)
        step += 1
        m1 = b1 * m1 + (1 - b1) * grad_v
        m2 = b2 * m2 + (1 - b2) * grad_v * grad_v
        v -= LEARNING_RATE * (m1 / (1 - b1 ** step)) / (np.sqrt(m2 / (1 - b2 ** step)) + eps)
        if seconds is not None and step == PROBE_ITERATIONS:
            per = (time.perf_counter() - t0) / step
            planned = min(iterations, int(seconds / per))
            if planned < MIN_ITERATIONS:
                return Outcome(None, step, time.perf_counter() - t0,
                               f"time budget: {seconds:.2f} s allows {planned} < {MIN_ITERATIONS} iterations")
    up = (rectified_sigmoid(v) >= 0.5).astype(np.float64)
    q = np.clip(base.astype(np.float64) + up + z, qmin, qmax)
    return Outcome(q, planned, time.perf_counter() - t0)


@dataclasses.dataclass
class Budget:
    """Wall time shared by layers in proportion to their cost; what one layer leaves goes to the next."""

    seconds: float
    remaining_cost: float
    spent: float = 0.0

    def share(self, layer_cost: float) -> float:
        left = max(self.seconds - self.spent, 0.0)
        return left * layer_cost / max(self.remaining_cost, layer_cost, 1e-9)

    def charge(self, layer_cost: float, seconds: float) -> None:
        self.spent += seconds
        self.remaining_cost = max(self.remaining_cost - layer_cost, 0.0)
