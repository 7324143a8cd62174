"""What onnxruntime actually runs for a QDQ model after its graph optimization.

The optimized graph is saved through ``SessionOptions.optimized_model_filepath`` and counted:
fused int8 kernels (QLinearConv, QGemm, QLinearAdd, ...) against the QuantizeLinear and
DequantizeLinear nodes it could not fuse away, each of which runs as its own pass over a tensor.
"""

from __future__ import annotations

import collections
import pathlib

import onnx

from deployopt.core.session import open_session
from deployopt.passes.quantize.report import QDQ_OPS, is_int8_kernel


def ort_kernels(model_path: pathlib.Path, work_dir: pathlib.Path, threads: int) -> dict:
    """Op histogram of the graph onnxruntime runs (all optimizations), split into fused int8
    kernels, Q/DQ nodes left unfused, and everything else."""
    optimized = work_dir / (model_path.stem + ".ort.onnx")
    open_session(model_path, threads=threads, optimized_path=optimized, what=f"quantized model {model_path.name}")
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    optimized.unlink()
    fused = {k: v for k, v in ops.items() if is_int8_kernel(k)}
    return {
        "fused_int8": dict(sorted(fused.items())),
        "fused_int8_total": sum(fused.values()),
        "unfused_quantize_linear": ops.get("QuantizeLinear", 0),
        "unfused_dequantize_linear": ops.get("DequantizeLinear", 0),
        "other_ops": {k: v for k, v in sorted(ops.items()) if k not in fused and k not in QDQ_OPS},
    }


def internal_unfused(kernels: dict, proto: onnx.ModelProto) -> int | None:
    """Unfused Q/DQ kernels onnxruntime runs inside the graph: beyond one Q per graph input and
    one DQ per graph output that a DequantizeLinear writes (``kernels`` as ``ort_kernels``
    returns it; None when the count was skipped)."""
    if "skipped" in kernels:
        return None
    initializers = {t.name for t in proto.graph.initializer}
    n_in = sum(1 for v in proto.graph.input if v.name not in initializers)
    dequantized = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    n_out = sum(1 for v in proto.graph.output if v.name in dequantized)
    return (max(0, kernels["unfused_quantize_linear"] - n_in)
            + max(0, kernels["unfused_dequantize_linear"] - n_out))
