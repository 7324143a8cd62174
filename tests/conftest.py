"""Fixtures shared by several test modules: sklearn's 8x8 digits as arrays, loaded once.

The arrays are shared by every module that asks for them: copy one before changing it in place."""

from __future__ import annotations

import functools

import numpy as np
import pytest


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    # A plain function rather than one fixture requesting the other, so that a module may define
    # its own ``digits`` fixture on top of ``digits_shuffled``.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32)[:, None], bunch.target.astype(np.int64)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits in sklearn's order: x float32 [n, 1, 8, 8] scaled to [0, 1], y int64."""
    return _load_digits()


@pytest.fixture(scope="session")
def digits_shuffled() -> tuple[np.ndarray, np.ndarray]:
    """The same digits in one fixed random order (numpy ``default_rng(0)``), so that any prefix
    holds every class: split it as ``x[:n]`` for training and ``x[n:]`` for held-out data."""
    x, y = _load_digits()
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], y[order]
