"""Which quantized activation matters: the output error each tensor's quantization causes.

Local SQNR ranks tensors by how much rounding noise they carry, not by how much of it reaches
the output: an early tensor with few channels at high resolution can carry an ordinary SQNR and
still cost most, because its noise passes through the whole network. Ranked by the output error
instead, the accuracy fallback returns fewer nodes to float for the same tolerance.

For each activation tensor ``t`` carrying a QuantizeLinear -> DequantizeLinear pair, a copy of the
quantized model with that pair removed (``t`` read directly; when the quantizer folded a
Relu/Clip into ``t``'s range, the clamp is put back as a Clip) is run on the data, and

    sensitivity(t) = E(f_q) − E(f_q∖t),

the relative output error against the float model ``f`` (output_error.py: each output's squared
error over its energy, averaged over the outputs) that removing ``t``'s quantization takes away.
Each copy runs with onnxruntime's full optimization, so every other node keeps its fused int8
kernel. Cost: one session and one pass over a few samples per tensor.

Written by hand: onnxruntime's qdq_loss_debug measures local tensor errors only, and its
``nodes_to_exclude`` needs a re-quantization per candidate.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from deployopt.passes.quantize.data import Feed
from deployopt.passes.quantize.output_error import OutputError
from deployopt.passes.quantize.report import folded_activations


def pairs(qdq: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, list[onnx.NodeProto]]]:
    """``{tensor: (QuantizeLinear, [its DequantizeLinear nodes])}`` for activation tensors."""
    init = {t.name for t in qdq.graph.initializer}
    quantizers = {n.output[0]: n for n in qdq.graph.node
                  if n.op_type == "QuantizeLinear" and n.input[0] not in init}
    found: dict[str, tuple[onnx.NodeProto, list[onnx.NodeProto]]] = {}
    for node in qdq.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in quantizers:
            q = quantizers[node.input[0]]
            found.setdefault(q.input[0], (q, []))[1].append(node)
    return found


def without(qdq: onnx.ModelProto, tensor: str, q: onnx.NodeProto, dqs: list[onnx.NodeProto],
            bounds: tuple[float, float] | None) -> onnx.ModelProto:
    """A copy of ``qdq`` whose consumers of ``tensor``'s DequantizeLinear outputs read ``tensor``
    (through a Clip to ``bounds`` when the quantizer folded one into the range)."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    drop = {q.name, *(d.name for d in dqs)}
    source = tensor
    extra: list[onnx.NodeProto] = []
    if bounds is not None:
        lo, hi = bounds
        source = f"{tensor}_sensitivity_clip"
        names = [f"{source}_min", f"{source}_max"]
        for name, value in zip(names, (lo, hi)):
            value = np.float32(np.clip(value, -3.4e38, 3.4e38)) if math.isinf(value) else np.float32(value)
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value), name))
        extra.append(helper.make_node("Clip", [tensor, *names], [source], name=source))
    renamed = {d.output[0]: source for d in dqs}
    kept = [n for n in model.graph.node if n.name not in drop]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    # the Clip goes right after the producer of ``tensor`` (or first, for a graph input)
    position = next((i + 1 for i, n in enumerate(kept) if tensor in n.output), 0)
    del model.graph.node[:]
    model.graph.node.extend(kept[:position] + extra + kept[position:])
    return model


def tensor_sensitivity(float_path: pathlib.Path, qdq_path: pathlib.Path,
                       feeds: Sequence[Feed], threads: int) -> dict[str, float]:
    """``{tensor: sensitivity}`` for every activation tensor with a Q/DQ pair (module docstring),
    except those whose DequantizeLinear output is a graph output."""
    feeds = list(feeds)
    if not feeds:
        return {}
    float_proto, qdq = onnx.load(str(float_path)), onnx.load(str(qdq_path))
    output_error = OutputError(float_path, feeds, threads)
    base = output_error.error(qdq_path)
    probe = pathlib.Path(qdq_path).with_name("sensitivity-probe.onnx")
    folded = folded_activations(float_proto, qdq)
    graph_outputs = {o.name for o in qdq.graph.output}
    result = {}
    for tensor, (q, dqs) in pairs(qdq).items():
        if any(d.output[0] in graph_outputs for d in dqs):
            continue
        onnx.save(without(qdq, tensor, q, dqs, folded.get(tensor)), str(probe))
        result[tensor] = base - output_error.error(probe)
    probe.unlink(missing_ok=True)
    return result


def most_sensitive(sensitivity: dict[str, float]) -> list[str]:
    """The tensors whose quantization adds output error (positive sensitivity), most first."""
    return sorted((t for t, v in sensitivity.items() if v > 0), key=lambda t: -sensitivity[t])
