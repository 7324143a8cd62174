"""What the quantize pass did, measured on the graphs themselves.

* ``already_quantized``: a model that already holds Q/DQ or integer kernels is refused.
* ``node_accounting``: which nodes of the float model run int8 in the QDQ model, which stayed
  float and why, which were folded away (a Relu/Clip after a quantized node is absorbed into the
  output range: ``q = clamp(round(x/s) + z, z, qmax)`` already applies ``max(x, 0)``).
* ``ort_kernels``: what onnxruntime actually runs after its graph optimization (saved through
  ``SessionOptions.optimized_model_filepath``): fused int8 kernels (QLinearConv, QGemm,
  QLinearAdd, ...) against QuantizeLinear/DequantizeLinear nodes it could not fuse away.
* ``tensor_sqnr``: signal-to-quantization-noise ratio per quantized tensor,
  ``SQNR = 10 log10(sum x^2 / sum (x - x_q)^2)`` dB, where ``x`` is the tensor before its Q/DQ pair
  and ``x_q`` after it (local error, onnxruntime's ``qdq_err``), plus the same against the float
  model's tensor (accumulated error, ``xmodel_err``). Same formula and tensor matching as
  onnxruntime.quantization.qdq_loss_debug, but the sums are accumulated batch by batch instead of
  keeping every activation of every sample (qdq_loss_debug.collect_activations does).
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import pathlib
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
from onnxruntime.quantization import qdq_loss_debug
from onnxruntime.quantization.calibrate import CalibraterBase
from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from deployopt.passes.quantize_data import session

#: Op types onnxruntime's static quantizer has a rule for (QDQ or QOperator registry).
QUANTIZABLE = frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: Ops that mean a model is quantized already.
INTEGER_OPS = QDQ_OPS | {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QGemm",
                         "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "MatMulNBits"}


def is_int8_kernel(op_type: str) -> bool:
    return op_type.startswith("QLinear") or op_type in INTEGER_OPS - QDQ_OPS


def already_quantized(proto: onnx.ModelProto) -> dict[str, int]:
    """Histogram of the quantization ops in the graph (empty for a float model)."""
    found = collections.Counter(n.op_type for n in proto.graph.node
                                if n.op_type in INTEGER_OPS or is_int8_kernel(n.op_type))
    return dict(found)


def _by_name(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in proto.graph.node}


def int8_nodes(float_proto: onnx.ModelProto, qdq_proto: onnx.ModelProto, *, op_types: Iterable[str]) -> list[str]:
    """Names of the float model's nodes that run int8 in the QDQ model (node_accounting's rule),
    plus the Relu/Clip nodes the quantizer folded into an int8 producer's output range."""
    op_types = set(op_types)
    dq_outputs = {o for n in qdq_proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    initializers = {t.name for t in qdq_proto.graph.initializer}
    present, names = set(), []
    for node in qdq_proto.graph.node:
        present.add(node.name)
        activations = [i for i in node.input if i and i not in initializers]
        if (node.op_type not in QDQ_OPS and activations and all(i in dq_outputs for i in activations)
                and node.op_type in QUANTIZABLE and node.op_type in op_types):
            names.append(node.name)
    folded = [n.name for n in float_proto.graph.node if n.name not in present and n.op_type in ("Relu", "Clip")]
    return names + folded


def node_accounting(float_proto: onnx.ModelProto, qdq_proto: onnx.ModelProto, *,
                    op_types: Iterable[str], excluded: dict[str, str]) -> dict:
    """Int8 and float nodes of the QDQ model, with a reason for every node left float.

    A node counts as int8 when onnxruntime's quantizer handled it: its float activation inputs
    come through DequantizeLinear and its op type has a quantizer rule; ``excluded`` maps the
    names we excluded to the reason (exclude_nodes, fallback).
    """
    op_types = set(op_types)
    dq_outputs = {o for n in qdq_proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    initializers = {t.name for t in qdq_proto.graph.initializer}
    int8, floats, float_nodes = collections.Counter(), collections.Counter(), []
    for node in qdq_proto.graph.node:
        if node.op_type in QDQ_OPS:
            continue
        activations = [i for i in node.input if i and i not in initializers]
        through_dq = bool(activations) and all(i in dq_outputs for i in activations)
        if node.name in excluded:
            reason = excluded[node.name]
        elif through_dq and node.op_type in QUANTIZABLE and node.op_type in op_types:
            int8[node.op_type] += 1
            continue
        elif node.op_type not in QUANTIZABLE:
            reason = f"onnxruntime has no int8 rule for {node.op_type}"
        elif node.op_type not in op_types:
            reason = "op type not in op_types"
        else:
            reason = "onnxruntime's quantizer left it float (its inputs are not quantized)"
        floats[node.op_type] += 1
        float_nodes.append({"node": node.name, "op_type": node.op_type, "reason": reason})
    qdq_names = _by_name(qdq_proto)
    folded = collections.Counter(n.op_type for n in float_proto.graph.node if n.name not in qdq_names)
    qdq = collections.Counter(n.op_type for n in qdq_proto.graph.node if n.op_type in QDQ_OPS)
    return {"int8_ops": dict(int8), "float_ops": dict(floats), "float_nodes": float_nodes,
            "folded_into_quantization": dict(folded), "qdq_nodes": dict(qdq)}


def ort_kernels(model_path: pathlib.Path, work_dir: pathlib.Path, threads: int) -> dict:
    """Op histogram of the graph onnxruntime runs (ORT_ENABLE_ALL), split into fused int8
    kernels, Q/DQ nodes left unfused, and everything else."""
    optimized = work_dir / (model_path.stem + ".ort.onnx")
    session(model_path, threads, optimized_path=optimized)
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


def _augment(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Expose every float tensor onnxruntime would calibrate as a graph output, keeping its shape
    (qdq_loss_debug.modify_model_output_intermediate_tensors flattens them, which loses the
    channel axis the per-channel SQNR needs)."""
    saver = CalibraterBase(str(src))  # loads with shape inference, as qdq_loss_debug does
    model = saver.model
    tensors, value_infos = saver.select_tensors_to_calibrate(model)
    present = {o.name for o in model.graph.output}
    for name in sorted(tensors - present):
        model.graph.output.append(value_infos[name])
    onnx.save(model, str(dst))


def _outputs(sess, feed) -> dict[str, list[np.ndarray]]:
    names = [o.name for o in sess.get_outputs()]
    return {n: [v] for n, v in zip(names, sess.run(names, feed))}


def _db(signal, noise):
    eps = float(np.finfo(np.float32).eps) ** 2  # qdq_loss_debug clamps both norms at eps
    return 10 * np.log10(np.maximum(signal, eps) / np.maximum(noise, eps))


def _energy(x: np.ndarray) -> np.ndarray:
    """Sum of squares per channel (axis 1), or one total for tensors without a channel axis."""
    x = x.astype(np.float64) ** 2
    return x.sum(axis=tuple(i for i in range(x.ndim) if i != 1)) if x.ndim >= 2 else np.array([x.sum()])


def activation_bounds(float_proto: onnx.ModelProto, skip: Iterable[str] = ()) -> dict[str, tuple[float, float]]:
    """``{output tensor: (lo, hi)}`` of every Relu/Clip node (except those named in ``skip``)."""
    skip = set(skip)
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in float_proto.graph.initializer}
    folded = {}
    for node in float_proto.graph.node:
        if node.name in skip or node.op_type not in ("Relu", "Clip"):
            continue
        lo, hi = (0.0, math.inf) if node.op_type == "Relu" else (-math.inf, math.inf)
        if node.op_type == "Clip":
            attrs = {a.name: a.f for a in node.attribute}
            lo, hi = attrs.get("min", lo), attrs.get("max", hi)
            if len(node.input) > 1 and node.input[1] in consts:
                lo = float(consts[node.input[1]])
            if len(node.input) > 2 and node.input[2] in consts:
                hi = float(consts[node.input[2]])
        folded[node.output[0]] = (lo, hi)
    return folded


def folded_activations(float_proto: onnx.ModelProto, qdq_proto: onnx.ModelProto,
                       ) -> dict[str, tuple[float, float]]:
    """``{tensor: (lo, hi)}`` for Relu/Clip nodes the quantizer removed. In the QDQ model the
    tensor before the Q/DQ pair is then the producer's raw output, so the local error must be
    measured against ``clip(x, lo, hi)``, not ``x`` (the clamp is intended, not noise)."""
    return activation_bounds(float_proto, skip=_by_name(qdq_proto))


def tensor_sqnr(float_path: pathlib.Path, qdq_path: pathlib.Path, work_dir: pathlib.Path,
                feeds: Iterator[dict[str, np.ndarray]], threads: int) -> dict[str, dict[str, float]]:
    """``{tensor: {"sqnr_db", "channel_sqnr_db", "xmodel_sqnr_db"}}`` over the feeds.

    ``sqnr_db`` is the whole-tensor local SQNR (qdq_loss_debug's ``qdq_err``); ``channel_sqnr_db``
    averages the SQNR of each channel (axis 1) in dB: one outlier channel that sets the
    per-tensor scale carries most of the energy, so the whole-tensor figure stays high while the
    other channels round to zero; the channel average exposes that. ``xmodel_sqnr_db`` compares
    with the float model's tensor (error accumulated up to here).
    """
    folded = folded_activations(onnx.load(str(float_path)), onnx.load(str(qdq_path)))
    float_aug, qdq_aug = work_dir / "sqnr_float.onnx", work_dir / "sqnr_qdq.onnx"
    _augment(float_path, float_aug)
    _augment(qdq_path, qdq_aug)
    float_sess = session(float_aug, threads, optimize=False)
    qdq_sess = session(qdq_aug, threads, optimize=False)
    # per tensor: [signal, noise] per channel (local), [signal, noise] in total (vs float model)
    sums: dict[str, list] = {}
    for feed in feeds:
        matched = qdq_loss_debug.create_activation_matching(_outputs(qdq_sess, feed), _outputs(float_sess, feed))
        for name, m in matched.items():
            pre, post = m["pre_qdq"][0], m["post_qdq"][0]
            if name in folded:
                pre = np.clip(pre, *folded[name])
            ref = m["float"][0] if "float" in m else pre
            acc = sums.setdefault(name, [0.0, 0.0, 0.0, 0.0])
            acc[0] = acc[0] + _energy(pre)
            acc[1] = acc[1] + _energy(pre.astype(np.float64) - post)
            acc[2] += float(np.sum(ref.astype(np.float64) ** 2))
            acc[3] += float(np.sum((ref.astype(np.float64) - post) ** 2))
    del float_sess, qdq_sess
    float_aug.unlink()
    qdq_aug.unlink()
    result = {}
    for name, (signal, noise, ref_signal, ref_noise) in sums.items():
        live = signal > 0  # dead channels (always 0) carry no signal to lose
        per_channel = _db(signal[live], noise[live]) if live.any() else np.array([_db(0.0, 0.0)])
        result[name] = {"sqnr_db": round(float(_db(signal.sum(), noise.sum())), 2),
                        "channel_sqnr_db": round(float(per_channel.mean()), 2),
                        "xmodel_sqnr_db": round(float(_db(ref_signal, ref_noise)), 2)}
    return result


@contextlib.contextmanager
def _drop_log_records(marker: str):
    """Drop root-logger records whose message contains ``marker`` (others pass)."""
    def keep(record: logging.LogRecord) -> bool:
        return marker not in record.getMessage()
    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def weight_sqnr(float_path: pathlib.Path, qdq_path: pathlib.Path) -> dict[str, float]:
    """SQNR of each quantized weight against its float values (qdq_loss_debug's own helpers)."""
    with contextlib.redirect_stdout(io.StringIO()), _drop_log_records("_bias_correction"):
        # Biases added by bias correction (passes.quantize_refine) have no float original, which
        # create_weight_matching logs as an error for each.
        matched = qdq_loss_debug.create_weight_matching(str(float_path), str(qdq_path))
    qdq = onnx.load(str(qdq_path), load_external_data=False)
    int32 = {t.name for t in qdq.graph.initializer if t.data_type == onnx.TensorProto.INT32}
    # Biases (int32 at scale s_x * s_w) are left out: their error follows the input's scale, which
    # the activation entries already rank.
    matched = {k: v for k, v in matched.items() if k + TENSOR_NAME_QUANT_SUFFIX not in int32}
    return {k: round(v, 2) for k, v in qdq_loss_debug.compute_weight_error(matched).items()}


def tensor_nodes(float_proto: onnx.ModelProto, tensor: str) -> list[str]:
    """Nodes whose quantization puts a Q/DQ pair on ``tensor``: its producer and its consumers
    (onnxruntime quantizes a tensor if either side is quantized, so both must go float). When the
    producer is a Relu/Clip, the quantizer folds it into the range of its input, so the input's
    producer and consumers join too (otherwise the same range reappears one tensor earlier)."""
    names: list[str] = []
    pending, done = [tensor], set()
    while pending:
        current = pending.pop()
        done.add(current)
        for node in float_proto.graph.node:
            if node.op_type not in QUANTIZABLE or not (current in node.output or current in node.input):
                continue
            if node.name not in names:
                names.append(node.name)
            if current in node.output and node.op_type in ("Relu", "Clip") and node.input[0] not in done:
                pending.append(node.input[0])
    return names
