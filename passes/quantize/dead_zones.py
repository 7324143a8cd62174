"""Activation ranges cut to what a tensor's readers can tell apart.

A uint8 range ``[lo, hi]`` spends its 256 steps evenly, ``s = (hi - lo) / 255``. Part of a
calibrated range is often wasted: the readers of the tensor give the same outputs for every value
below some ``L`` (or above some ``U``). The commonest case is the input of a hardswish,

    hardswish(x) = x · clip(x + 3, 0, 6) / 6  (or x · HardSigmoid(x), what pre-processing makes of
                                               a HardSwish node; or one HardSwish node)

which is 0 for every ``x ≤ −3``. A convolution before a hardswish in a real network (PP-LCNet,
MobileNetV3, PicoDet, PP-OCR) reaches −60 on a few channels; its calibrated range ``[−60, 57]``
has a step of 0.46, the cut range ``[−3, 57]`` one of 0.24 with the same outputs downstream: the
values below −3 saturate to −3, where every reader already gave 0.

``dead_zones`` finds, for each tensor, the interval ``[L, U]`` outside which no reader's output
changes, by these rules per reader (a tensor's bound is the loosest over its readers; a graph
output or a tensor read inside a subgraph has none):

* ``Relu``: ``L = 0``; ``Clip(min, max)``: ``[min, max]``; ``Max(t, k)`` / ``Min(t, k)`` with a
  scalar constant ``k`` (ReLU6 as older TensorFlow exports write it): ``L = k`` / ``U = k``;
  ``HardSigmoid(α, β)``: ``[−β/α, (1 − β)/α]``; ``HardSwish``: ``L = −3``.
* ``Add(t, k)`` / ``Sub(t, k)`` with a scalar constant ``k``: the sum's own interval moved by
  ``∓k`` (the tensors are visited from the outputs back, so the sum's is known).
* ``Mul(t, g)`` where ``g`` is computed from ``t`` and is exactly 0 for ``t ≤ Z`` (``g`` a
  ``Relu``/``Clip(0, ·)`` of ``t + k``, a ``HardSigmoid`` of ``t``, or such a ``g`` times or over a
  constant): ``L = Z``, since the product is 0 there whatever ``t`` is.
* anything else: no bound.

Calibration intersects each tensor's range with its interval (calibration.clamp_ranges).
Written by hand: onnxruntime's quantizer only folds a Relu/Clip into the range of the tensor it
reads (QDQRemovableActivation); it does not look past the reader.
"""

from __future__ import annotations

import math

import onnx
from onnx import numpy_helper

UNBOUNDED = (-math.inf, math.inf)


def scalar_constants(proto: onnx.ModelProto) -> dict[str, float]:
    """``{initializer: value}`` of every one-element initializer."""
    return {t.name: float(numpy_helper.to_array(t).reshape(-1)[0])
            for t in proto.graph.initializer if math.prod(t.dims) == 1}


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes of the subgraphs (If/Loop/Scan bodies) anywhere under ``graph``."""
    names: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
                names |= {name for inner in body.node for name in inner.input} | _subgraph_reads(body)
    return names


def dead_zones(proto: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """``{tensor: (L, U)}`` for every tensor whose readers ignore values below ``L`` / above ``U``
    (at least one of them finite), by the rules of the module doc."""
    graph = proto.graph
    scalars = scalar_constants(proto)
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    opaque = {o.name for o in graph.output} | _subgraph_reads(graph)

    def attrs(node: onnx.NodeProto) -> dict[str, float]:
        return {a.name: a.f for a in node.attribute if a.type == onnx.AttributeProto.FLOAT}

    def shift(node: onnx.NodeProto, t: str) -> float | None:
        """``k`` when ``node`` computes ``t + k`` from a scalar constant (Add, or Sub with t first)."""
        if node.op_type == "Add" and len(node.input) == 2 and t in node.input:
            other = node.input[1] if node.input[0] == t else node.input[0]
            return scalars.get(other) if other != t else None
        if node.op_type == "Sub" and len(node.input) == 2 and node.input[0] == t and node.input[1] != t:
            k = scalars.get(node.input[1])
            return None if k is None else -k
        return None

    def zero_below(g: str, t: str) -> float | None:
        """``Z`` such that tensor ``g`` is exactly 0 whenever ``t ≤ Z`` (None: not shown)."""
        node = producer.get(g)
        if node is None:
            return None
        if node.op_type in ("Mul", "Div") and len(node.input) == 2 and node.input[1] in scalars \
                and scalars[node.input[1]] != 0:
            return zero_below(node.input[0], t)
        if node.op_type == "HardSigmoid" and node.input[0] == t:
            a = attrs(node)
            alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
            return -beta / alpha if alpha > 0 else None
        if floored_at_zero(node, scalars):
            source = node.input[0]
            if source == t:
                return 0.0
            inner = producer.get(source)
            k = None if inner is None else shift(inner, t)
            return None if k is None else -k
        return None

    bounds: dict[str, tuple[float, float]] = {}

    def reader_interval(node: onnx.NodeProto, t: str) -> tuple[float, float]:
        op = node.op_type
        if op == "Relu":
            return 0.0, math.inf
        if op == "Clip" and node.input[0] == t and t not in node.input[1:]:
            return clip_bounds(node, scalars)
        if op in ("Max", "Min") and len(node.input) == 2 and t in node.input:
            k = scalars.get(node.input[1] if node.input[0] == t else node.input[0])
            if k is not None:
                return (k, math.inf) if op == "Max" else (-math.inf, k)
            return UNBOUNDED
        if op == "HardSigmoid":
            a = attrs(node)
            alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
            return ((-beta / alpha, (1 - beta) / alpha) if alpha > 0 else UNBOUNDED)
        if op == "HardSwish":
            return -3.0, math.inf
        k = shift(node, t)
        if k is not None:
            low, high = bounds.get(node.output[0], UNBOUNDED)
            return low - k, high - k
        if op == "Mul" and len(node.input) == 2 and t in node.input and node.input[0] != node.input[1]:
            other = node.input[1] if node.input[0] == t else node.input[0]
            z = zero_below(other, t)
            return (z, math.inf) if z is not None else UNBOUNDED
        return UNBOUNDED

    tensors = [out for node in graph.node for out in node.output] + [i.name for i in graph.input]
    for tensor in reversed(tensors):  # readers come after their tensor: outputs first
        if tensor in opaque or tensor not in readers or tensor in scalars:
            continue
        intervals = [reader_interval(node, tensor) for node in readers[tensor]]
        low, high = min(i[0] for i in intervals), max(i[1] for i in intervals)
        if low > -math.inf or high < math.inf:
            bounds[tensor] = (low, high)
    return bounds


def floored_at_zero(node: onnx.NodeProto, scalars: dict[str, float]) -> bool:
    """Relu, or a Clip whose minimum is 0."""
    return node.op_type == "Relu" or (node.op_type == "Clip" and clip_bounds(node, scalars)[0] == 0.0)


def clip_bounds(node: onnx.NodeProto, scalars: dict[str, float]) -> tuple[float, float]:
    """A Clip's ``(min, max)`` from its attributes (opset < 11) or constant inputs; an input that
    is not a constant leaves that side unbounded."""
    a = {x.name: x.f for x in node.attribute}
    low, high = a.get("min", -math.inf), a.get("max", math.inf)
    if len(node.input) > 1 and node.input[1]:
        low = scalars.get(node.input[1], -math.inf)
    if len(node.input) > 2 and node.input[2]:
        high = scalars.get(node.input[2], math.inf)
    return low, high
