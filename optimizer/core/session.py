"""The one place deployopt opens an onnxruntime session.

Every session, whether it times a model, evaluates it, calibrates it or captures activations for
a reconstruction, is made here, so they all share the settings a latency number is recorded with:
``intra_op_num_threads`` as given, one inter-op thread and sequential execution (with parallel
execution or more inter-op threads, the thread count a result is labelled with would not be the
number of cores the model used), errors-only logging, and the CPU execution provider unless the
caller names others.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from deployopt.core.errors import WorkFailed, one_line

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

#: optimization level names (``--opt-level``, recipe values) -> onnxruntime GraphOptimizationLevel members.
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
CPU = ("CPUExecutionProvider",)


def session_options(threads: int = 1, optimization_level: str = "all", *,
                    optimized_path: str | os.PathLike | None = None) -> ort.SessionOptions:
    """The settings every deployopt session uses (see the module docstring)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[optimization_level])
    options.log_severity_level = 3  # errors only: warnings would interleave with tables and progress bars
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def recorded_options(threads, optimization_level: str) -> dict:
    """``session_options()`` as plain data, for results that say how they were measured."""
    return {
        "intra_op_num_threads": list(threads),
        "inter_op_num_threads": 1,
        "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": OPT_LEVELS[optimization_level],
        "providers": list(CPU),
    }


def open_session(model: str | os.PathLike | bytes | onnx.ModelProto | ir.Model, *, threads: int = 1,
                 optimization_level: str = "all", optimized_path: str | os.PathLike | None = None,
                 options: ort.SessionOptions | None = None, what: str = "the model",
                 providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime session over a file path, serialized bytes, a ModelProto or an ``ir.Model``.

    ``options`` replaces the standard settings (for profiling, which needs extra flags on top of
    ``session_options()``). onnxruntime raises its own exception types (Fail, InvalidGraph,
    NotImplemented, ...): they become one ``WorkFailed`` line naming ``what``. ``providers``:
    the execution providers in order of preference (default the CPU provider; empty when
    ``options`` already names the EP devices, as for a plugin EP).
    """
    import onnxruntime as ort

    if isinstance(model, (str, os.PathLike)):
        source: str | bytes = str(pathlib.Path(model))
    elif isinstance(model, bytes):
        source = model
    elif hasattr(model, "SerializeToString"):
        source = model.SerializeToString()
    else:
        import onnx_ir as ir

        source = ir.to_proto(model).SerializeToString()
    if options is None:
        options = session_options(threads, optimization_level, optimized_path=optimized_path)
    try:
        if providers is not None and not providers:
            return ort.InferenceSession(source, options)
        return ort.InferenceSession(source, options, providers=list(providers or CPU))
    except Exception as e:  # onnxruntime's own exception types
        raise WorkFailed(f"onnxruntime cannot load {what}: {one_line(e)}") from e


def run_outputs(model: str | os.PathLike | bytes | onnx.ModelProto | ir.Model,
                feeds: Sequence[Mapping[str, np.ndarray]], *, threads: int = 1,
                what: str = "the model") -> list[np.ndarray]:
    """Every output of ``model`` over ``feeds``, each concatenated along the batch axis, in float64."""
    import numpy as np

    session = open_session(model, threads=threads, what=what)
    runs = [session.run(None, dict(feed)) for feed in feeds]
    return [np.concatenate([r[i] for r in runs]).astype(np.float64) for i in range(len(runs[0]))]
