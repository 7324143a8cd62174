"""Fixtures shared by several test modules: sklearn's 8x8 digits as arrays, loaded once."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits in sklearn's order: x float32 [n, 1, 8, 8] scaled to [0, 1], y int64.

    Every module shares these arrays: copy before changing one in place."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    return x, y


@pytest.fixture(scope="session")
def digits_shuffled(digits) -> tuple[np.ndarray, np.ndarray]:
    """The same digits in one fixed random order (numpy ``default_rng(0)``), so that any prefix
    holds every class: split it as ``x[:n]`` for training and ``x[n:]`` for held-out data."""
    x, y = digits
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], y[order]
