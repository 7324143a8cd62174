"""What the quantizer did to the graph, read from the float and QDQ graphs themselves.

* ``already_quantized``: a model that already holds Q/DQ or integer kernels is refused.
* ``node_accounting`` / ``int8_nodes``: which nodes of the float model run int8 in the QDQ model,
  which stayed float and why, which were folded away (a Relu/Clip after a quantized node is
  absorbed into the output range: ``q = clamp(round(x/s) + z, z, qmax)`` already applies
  ``max(x, 0)``).
* ``activation_bounds`` / ``folded_activations``: the clamp of every Relu/Clip, and of those the
  quantizer folded into a range.
* ``tensor_nodes``: the nodes that must go back to float to take a tensor's Q/DQ pair away.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable

import onnx
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from deployopt.passes.quantize.dead_zones import clip_bounds, scalar_constants

#: Op types onnxruntime's static quantizer has a rule for (QDQ or QOperator registry).
QUANTIZABLE = frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: Ops that mean a model is quantized already.
INTEGER_OPS = QDQ_OPS | {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QGemm",
                         "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "MatMulNBits"}
#: Ops whose fused int8 kernel in onnxruntime can write float (QGemm, MatMulIntegerToFloat): where
#: they produce a graph output, no QuantizeLinear is needed after them (quantizer.float_outputs).
FLOAT_OUTPUT_OPS = frozenset({"Gemm", "MatMul"})
#: Ops at the end of a graph that run cheaply in float and whose output a uint8 grid only damages:
#: probabilities and scores (a step of 1/255 zeroes most of a 1000-class softmax) ...
SCORE_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid"})
#: ... and the layout ops that carry them to the output (quantizer.float_outputs).
LAYOUT_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})
#: Activations the quantizer folds into the range of the tensor they read.
CLAMPS = ("Relu", "Clip")


def is_int8_kernel(op_type: str) -> bool:
    return op_type.startswith("QLinear") or op_type in INTEGER_OPS - QDQ_OPS


def already_quantized(proto: onnx.ModelProto) -> dict[str, int]:
    """Histogram of the quantization ops in the graph (empty for a float model)."""
    found = collections.Counter(n.op_type for n in proto.graph.node
                                if n.op_type in INTEGER_OPS or is_int8_kernel(n.op_type))
    return dict(found)


def _by_name(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in proto.graph.node}


def _quantized_nodes(qdq_proto: onnx.ModelProto, op_types: set[str]) -> set[str]:
    """Nodes the quantizer handled: every float activation input comes through a DequantizeLinear,
    the op type has a quantizer rule and is selected by ``op_types``, and an output is quantized
    (or the op is one whose int8 kernel writes float)."""
    dq_outputs = {o for n in qdq_proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    initializers = {t.name for t in qdq_proto.graph.initializer}
    q_inputs = {n.input[0] for n in qdq_proto.graph.node if n.op_type == "QuantizeLinear"}
    names = set()
    for node in qdq_proto.graph.node:
        activations = [i for i in node.input if i and i not in initializers]
        # and its result is quantized, unless its int8 kernel writes float: a score or layout op
        # whose output quantizer.float_outputs freed runs in float
        written = node.op_type in FLOAT_OUTPUT_OPS or any(o in q_inputs for o in node.output)
        if (node.op_type not in QDQ_OPS and activations and all(i in dq_outputs for i in activations)
                and node.op_type in QUANTIZABLE and node.op_type in op_types and written):
            names.add(node.name)
    return names


def int8_nodes(float_proto: onnx.ModelProto, qdq_proto: onnx.ModelProto, *, op_types: Iterable[str]) -> list[str]:
    """Names of the float model's nodes that run int8 in the QDQ model (node_accounting's rule),
    plus the Relu/Clip nodes the quantizer folded into an int8 producer's output range."""
    quantized = _quantized_nodes(qdq_proto, set(op_types))
    present = _by_name(qdq_proto)
    names = [n.name for n in qdq_proto.graph.node if n.name in quantized]
    folded = [n.name for n in float_proto.graph.node if n.name not in present and n.op_type in CLAMPS]
    return names + folded


def _output_tail(qdq_proto: onnx.ModelProto) -> set[str]:
    """The score and layout nodes quantizer.float_outputs leaves in float: walking back from each
    graph output through score and layout nodes, those up to the last score op, or the whole walk
    when it ends at an int8 Gemm/MatMul (its input dequantized). Layout nodes after a Conv or Gemm
    the fallback left float are float because their inputs are: they do not count here."""
    producer = {o: n for n in qdq_proto.graph.node for o in n.output}
    dq_outputs = {o for n in qdq_proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    tail = set()
    for output in qdq_proto.graph.output:
        chain, node = [], producer.get(output.name)
        while node is not None and node.op_type in SCORE_OPS | LAYOUT_OPS:  # a DAG: the walk ends
            chain.append(node)
            node = producer.get(node.input[0]) if node.input else None
        ends = [i for i, n in enumerate(chain) if n.op_type in SCORE_OPS]
        if node is not None and node.op_type in FLOAT_OUTPUT_OPS and node.input[0] in dq_outputs:
            ends.append(len(chain) - 1)
        if ends:
            tail.update(n.name for n in chain[:max(ends) + 1])
    return tail


def node_accounting(float_proto: onnx.ModelProto, qdq_proto: onnx.ModelProto, *,
                    op_types: Iterable[str], excluded: dict[str, str]) -> dict:
    """Int8 and float nodes of the QDQ model, with a reason for every node left float.

    A node counts as int8 when onnxruntime's quantizer handled it (``_quantized_nodes``);
    ``excluded`` maps the names the pass excluded to the reason (exclude_nodes, fallback, latency).
    """
    op_types = set(op_types)
    quantized = _quantized_nodes(qdq_proto, op_types)
    tail = _output_tail(qdq_proto)
    int8, floats, float_nodes = collections.Counter(), collections.Counter(), []
    for node in qdq_proto.graph.node:
        if node.op_type in QDQ_OPS:
            continue
        if node.name in excluded:
            reason = excluded[node.name]
        elif node.name in quantized:
            int8[node.op_type] += 1
            continue
        elif node.op_type not in QUANTIZABLE:
            reason = f"onnxruntime has no int8 rule for {node.op_type}"
        elif node.op_type not in op_types:
            reason = "op type not in op_types"
        elif node.name in tail:
            reason = "writes a graph output: runs in float, so the output is not rounded to uint8"
        else:
            reason = "onnxruntime's quantizer left it float (its inputs are not quantized)"
        floats[node.op_type] += 1
        float_nodes.append({"node": node.name, "op_type": node.op_type, "reason": reason})
    qdq_names = _by_name(qdq_proto)
    folded = collections.Counter(n.op_type for n in float_proto.graph.node if n.name not in qdq_names)
    qdq = collections.Counter(n.op_type for n in qdq_proto.graph.node if n.op_type in QDQ_OPS)
    return {"int8_ops": dict(int8), "float_ops": dict(floats), "float_nodes": float_nodes,
            "folded_into_quantization": dict(folded), "qdq_nodes": dict(qdq)}


def activation_bounds(float_proto: onnx.ModelProto, skip: Iterable[str] = ()) -> dict[str, tuple[float, float]]:
    """``{output tensor: (lo, hi)}`` of every Relu/Clip node (except those named in ``skip``)."""
    skip = set(skip)
    scalars = scalar_constants(float_proto)
    folded = {}
    for node in float_proto.graph.node:
        if node.name in skip or node.op_type not in CLAMPS:
            continue
        lo, hi = (0.0, math.inf) if node.op_type == "Relu" else clip_bounds(node, scalars)
        folded[node.output[0]] = (lo, hi)
    return folded


def folded_activations(float_proto: onnx.ModelProto, qdq_proto: onnx.ModelProto,
                       ) -> dict[str, tuple[float, float]]:
    """``{tensor: (lo, hi)}`` for Relu/Clip nodes the quantizer removed. In the QDQ model the
    tensor before the Q/DQ pair is then the producer's raw output, so the local error must be
    measured against ``clip(x, lo, hi)``, not ``x`` (the clamp is intended, not noise)."""
    return activation_bounds(float_proto, skip=_by_name(qdq_proto))


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
            if current in node.output and node.op_type in CLAMPS and node.input[0] not in done:
                pending.append(node.input[0])
    return names
