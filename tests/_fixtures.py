"""Helpers the test modules import (conftest.py holds the shared fixtures)."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import onnx
import torch


def train_classifier(net: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = 3e-3,
                     batch: int = 64, shuffle: bool = True, threads: int | None = None) -> None:
    """Adam + cross-entropy over mini-batches of numpy arrays, reshuffled every epoch with torch's
    global RNG (or in the arrays' order with ``shuffle=False``). With ``threads``, torch trains on
    that many threads and gets the caller's count back afterwards: on batches this small, more
    threads only contend with each other and with onnxruntime's pool.

    BatchNorm running statistics are re-estimated at the end from one pass over ``x`` (plain
    averages): after a few epochs at a high rate, the momentum averages still lag the weights, and
    how far they lag depends on the CPU's kernels (measured: a digits net scored 0.46 in eval mode
    and 0.92 in train mode on one machine, above 0.5 on another)."""
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        opt = torch.optim.Adam(net.parameters(), lr)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(epochs):
            order = torch.randperm(len(xt)) if shuffle else None
            for i in range(0, len(xt), batch):
                if order is None:
                    xb, yb = xt[i:i + batch], yt[i:i + batch]
                else:
                    idx = order[i:i + batch]
                    xb, yb = xt[idx], yt[idx]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(xb), yb).backward()
                opt.step()
        # torch's own re-estimation: plain averages over the batches, in train mode, momenta restored
        torch.optim.swa_utils.update_bn((xt[i:i + batch] for i in range(0, len(xt), batch)), net)
    finally:
        torch.set_num_threads(saved_threads)


def digits_onnx(make_net: Callable[[], torch.nn.Module], x: np.ndarray, y: np.ndarray, *,
                epochs: int = 15) -> onnx.ModelProto:
    """``make_net()`` built after ``torch.manual_seed(0)``, trained on one thread on ``x``, ``y``
    (8x8 digits) and exported at opset 17 with input 'input' (dynamic batch) and output 'logits'."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = make_net()
    train_classifier(net, x, y, epochs=epochs)
    buf = io.BytesIO()
    torch.onnx.export(net.eval(), torch.zeros(1, 1, 8, 8), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def mean_kl(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(logits)), in float64: the tests' own
    computation, apart from deployopt.measure.metrics."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, np.float64) - np.max(z, axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    log_p, log_q = log_softmax(reference_logits), log_softmax(logits)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))
