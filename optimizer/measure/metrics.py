"""Classification metrics on logits: top-k accuracy, top-1 agreement, fidelity, Wilson intervals.

For logits z (model) and r (reference), one row per sample, labels y:
  top-k accuracy   mean[ y in the k largest z ]   (ties broken toward the lower class index,
                   as argmax does)
  agreement        mean[ argmax z == argmax r ]
  cosine           mean[ z.r / (|z| |r|) ]        (1 when both rows are zero, 0 when one is)
  max_abs_diff     max |z - r| over all elements
  kl               mean[ KL(softmax(r) || softmax(z)) ] = mean[ sum p_r (log p_r - log p_z) ],
                   computed with log-softmax in float64 so it stays finite
Rates carry a Wilson score interval (95%: z = 1.96), which unlike p +- z sqrt(p(1-p)/n) stays
inside [0, 1] and keeps its coverage on small evaluation sets:
  center = (p + z^2/2n) / (1 + z^2/n),  half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).

``FidelitySums`` accumulates the fidelity sums batch by batch, so memory does not grow with the
number of samples.
"""

from __future__ import annotations

import math

import numpy as np


def check_logits(logits) -> np.ndarray:
    """``logits`` as an array, or ValueError when it is not a non-empty [rows, classes] array."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits: expected a non-empty [rows, classes] array, got shape "
                         f"{logits.shape}")
    return logits


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """Number of rows whose label is among the k highest logits (no argument checks)."""
    # Stable sort on -logits: equal logits keep index order, so k=1 is exactly argmax.
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def topk_accuracy(logits, labels, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest logits."""
    logits, labels = check_logits(logits), np.asarray(labels)
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels: shape {labels.shape} does not match {logits.shape[0]} rows")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k: {k} is outside [1, {logits.shape[1]}]")
    return topk_hits(logits, labels, k) / logits.shape[0]


def predicted_class(logits) -> np.ndarray:
    """Arg-max over the last axis: ``[N]`` for ``[N, classes]`` logits, ``[N, T]`` for a sequence
    model's ``[N, T, classes]``; an array of rank below 2 is taken as classes already."""
    logits = np.asarray(logits)
    return logits.argmax(axis=-1) if logits.ndim >= 2 else logits


def class_agreement(reference, predictions) -> float:
    """Share of samples (and positions) where two arrays of predicted classes agree; NaN when empty."""
    reference, predictions = np.asarray(reference), np.asarray(predictions)
    return float(np.mean(reference == predictions)) if reference.size else math.nan


def top1_agreement(logits, ref_logits) -> float:
    """mean[ argmax logits == argmax ref_logits ] over rows (and positions)."""
    return class_agreement(predicted_class(ref_logits), predicted_class(logits))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial rate successes / n."""
    if n <= 0:
        raise ValueError(f"n: {n} trials, need at least 1")
    if not 0 <= successes <= n:
        raise ValueError(f"successes: {successes} is outside [0, {n}]")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def row_cosine(z: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Cosine of each row pair of [rows, k] arrays: 1 when both rows are zero, 0 when one is."""
    nz, nr = np.linalg.norm(z, axis=1), np.linalg.norm(r, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((nz > 0) & (nr > 0), (z * r).sum(axis=1) / (nz * nr), np.where(nz == nr, 1.0, 0.0))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


class FidelitySums:
    """Running sums for the fidelity of a model's logits to a reference's, over batches."""

    def __init__(self) -> None:
        self.n = self.agree = 0
        self.cosine = self.kl = 0.0
        self.max_abs = 0.0

    def add(self, z: np.ndarray, r: np.ndarray) -> None:
        z, r = z.astype(np.float64), r.astype(np.float64)
        self.n += len(z)
        self.agree += int((z.argmax(axis=1) == r.argmax(axis=1)).sum())
        self.cosine += float(row_cosine(z, r).sum())
        self.max_abs = max(self.max_abs, float(np.abs(z - r).max()))
        log_r, log_z = log_softmax(r), log_softmax(z)
        self.kl += float((np.exp(log_r) * (log_r - log_z)).sum())

    def result(self) -> dict:
        """{agreement, agreement_ci, cosine, max_abs_diff, kl} of everything added so far."""
        return {"agreement": self.agree / self.n,
                "agreement_ci": list(wilson_interval(self.agree, self.n)),
                "cosine": self.cosine / self.n, "max_abs_diff": self.max_abs,
                "kl": self.kl / self.n}


def fidelity(logits, ref_logits) -> dict:
    """{agreement, agreement_ci, cosine, max_abs_diff, kl} of ``logits`` vs ``ref_logits``."""
    z, r = check_logits(logits), check_logits(ref_logits)
    if z.shape != r.shape:
        raise ValueError(f"logits: shape {z.shape} differs from the reference's {r.shape}")
    sums = FidelitySums()
    sums.add(z, r)
    return sums.result()
