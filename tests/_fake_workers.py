"""Latency-worker entries that fail on purpose, for the fault tests.

They live in a module of their own because a worker is a spawned interpreter that imports the
module its entry is defined in: a test module (torch, the whole pipeline) would cost every
worker seconds to start, this one costs what the real worker does.
"""

from __future__ import annotations

import os
import time

from deployopt.measure.worker import main as real_worker_main


def fault_worker(conn, model_path, optimization_level):
    """A worker that dies like onnxruntime aborting ('crash.onnx') or hangs ('hang.onnx')."""
    name = os.path.basename(model_path)
    if name in ("crash.onnx", "hang.onnx"):
        conn.send(("ready", 1.0))
        while conn.recv()[0] != "measure":
            pass
        if name == "crash.onnx":
            os.abort()
        time.sleep(120)
    real_worker_main(conn, model_path, optimization_level)


def load_failure_worker(conn, model_path, optimization_level):
    """A worker for which onnxruntime refuses a step's output model, saying so as it does:
    naming the file."""
    if os.path.basename(model_path).endswith("_output.onnx"):
        conn.send(("ready", 1.0))
        while True:
            message = conn.recv()
            if message[0] == "stop":
                return
            if message[0] == "measure":
                conn.send(("error", f"onnxruntime cannot load {model_path}: INVALID_GRAPH", 1.0))
    real_worker_main(conn, model_path, optimization_level)
