"""The latency cost model of a QDQ labeling and its exact minimum, a minimum s-t cut.

onnxruntime runs a node of a QDQ model as an int8 kernel only when it has one and the Q/DQ
pattern around the node matches one of its fusions; everywhere else a DequantizeLinear
``x = s (q - z)`` and a QuantizeLinear ``q = clamp(round(x / s) + z)`` run as separate passes
over the tensor. Around ops without int8 kernels (HardSwish, HardSigmoid, PRelu, ...) and next to
convolutions too small to amortise them, those conversions cost more than int8 saves.

Label every compute node ``n`` of the float graph int8 (``L_n = 1``) or float (0):

    cost(L) = sum_n [L_n t8(n) + (1 - L_n) t32(n)]
            + sum_e Q_e   [producer of e float, some consumer of e int8]
            + sum_e DQ_e  [producer of e int8, some consumer of e float (or e a graph output,
                           unless a Gemm/MatMul writes it: their int8 kernels write float)]

``t32`` / ``t8`` are per-node kernel times (latency_probe.node_costs) of the float model and of
the first quantization; ``Q_e`` / ``DQ_e`` are the standalone QuantizeLinear / DequantizeLinear
kernels measured on tensor ``e``, or for tensors that had none a line ``a + b * elements`` fitted
to the measured ones. Nodes that cannot run int8 have ``t8 = inf``. Every term is unary or a
non-negative cost paid only when neighbours disagree, so ``cost`` is submodular and its exact
minimum is an s-t minimum cut: source side = int8, sink side = float; arcs ``s -> n`` of
capacity ``t32(n)`` and ``n -> t`` of ``t8(n)``; a tensor's Q is an auxiliary node ``a_e`` that
every int8 consumer pulls to the source side (infinite arcs ``v -> a_e``) and that pays ``Q_e``
through the arc ``a_e -> producer`` when the producer is float; its DQ is ``b_e`` with infinite
arcs ``b_e -> v`` from the consumers and the arc ``producer -> b_e`` of ``DQ_e``. networkx's
maximum-flow solver computes the cut (no library offers this placement, hence the hand-written
graph).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from deployopt.passes.quantize.latency_probe import NodeCosts
from deployopt.passes.quantize.report import FLOAT_OUTPUT_OPS

logger = logging.getLogger(__name__)

#: Conversion cost when nothing was measured: a memory-bound pass of about 0.3 ns per element
#: plus a per-kernel dispatch cost.
DEFAULT_NS_PER_ELEMENT = 0.3
DEFAULT_OVERHEAD_MS = 0.002
_SOURCE, _SINK = ("source",), ("sink",)  # tuples never collide with node names (str)


@dataclasses.dataclass
class Graph:
    """Data flow between the compute nodes of the (pre-processed) float model."""

    op_type: dict[str, str]  # node -> op type, in graph order
    producer: dict[str, str | None]  # tensor -> node (None: a graph input)
    consumers: dict[str, list[str]]  # tensor -> nodes
    outputs: list[str]
    elements: dict[str, int]  # tensor -> number of elements at the timed input shape

    def tensors(self) -> list[str]:
        """Every tensor a node reads or the graph returns, in graph order."""
        return list(dict.fromkeys([*self.consumers, *self.outputs]))


def graph_of(proto: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> Graph:
    """The compute nodes of ``proto`` (Constant nodes and initializers are not data flow) and the
    tensors between them, with element counts at ``input_shapes``."""
    initializers = {t.name for t in proto.graph.initializer}
    constants = {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    op_type, producer, consumers = {}, {}, collections.defaultdict(list)
    for value in proto.graph.input:
        if value.name not in initializers:
            producer[value.name] = None
    for node in proto.graph.node:
        if node.op_type == "Constant":
            continue
        op_type[node.name] = node.op_type
        for o in node.output:
            if o:
                producer[o] = node.name
        for i in dict.fromkeys(node.input):  # a node reading a tensor twice converts it once
            if i and i not in initializers and i not in constants:
                consumers[i].append(node.name)
    return Graph(op_type, producer, dict(consumers), [o.name for o in proto.graph.output],
                 _elements(proto, input_shapes))


def _elements(proto: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Elements of every tensor at the given input shapes (onnx shape inference on a copy whose
    inputs have those shapes)."""
    fixed = onnx.ModelProto.FromString(proto.SerializeToString())
    del fixed.graph.value_info[:]
    for value in fixed.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for d, size in zip(dims, input_shapes[value.name]):
                d.Clear()
                d.dim_value = int(size)
    try:
        fixed = onnx.shape_inference.infer_shapes(fixed)
    except Exception as e:  # unknown sizes only make conversion estimates coarser
        logger.info("shape inference for conversion costs failed: %s", e)
    sizes = {}
    for value in [*fixed.graph.input, *fixed.graph.value_info, *fixed.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if dims and all(isinstance(d, int) and d > 0 for d in dims):
            sizes[value.name] = int(np.prod(dims))
        elif value.type.tensor_type.HasField("shape") and not dims:
            sizes[value.name] = 1  # a scalar
    return sizes


@dataclasses.dataclass
class CostModel:
    """The cost function of the module doc for one graph, with measured and fitted costs."""

    graph: Graph
    capable: frozenset[str]  # nodes that may run int8 (int8 in the first quantization)
    t32: dict[str, float]
    t8: dict[str, float]
    measured: dict[tuple[str, str], float]
    fit: dict[str, tuple[float, float]]  # kind -> (overhead ms, ms per element)

    @classmethod
    def build(cls, graph: Graph, capable: Iterable[str], float_costs: NodeCosts, int8_costs: NodeCosts) -> CostModel:
        capable = frozenset(n for n in capable if n in graph.op_type)
        measured = dict(int8_costs.conversions)
        # Q and DQ are both one memory-bound pass over the tensor: one line through all of them
        line = _fit_line([(graph.elements.get(t), ms) for (_, t), ms in measured.items()])
        line = line or (DEFAULT_OVERHEAD_MS, DEFAULT_NS_PER_ELEMENT * 1e-6)
        fit = {"Q": line, "DQ": line}
        t32 = {n: float_costs.nodes.get(n, 0.0) for n in graph.op_type}
        t8 = {n: int8_costs.nodes.get(n, 0.0) for n in capable}
        return cls(graph, capable, t32, t8, measured, fit)

    def conversion(self, kind: str, tensor: str) -> float:
        """ms of the standalone ``kind`` ("Q" | "DQ") kernel on ``tensor``: measured, else the
        fitted line at the tensor's size (the median size when unknown)."""
        if (kind, tensor) in self.measured:
            return self.measured[(kind, tensor)]
        overhead, per_element = self.fit[kind]
        sizes = self.graph.elements
        elements = sizes.get(tensor, int(np.median(list(sizes.values()))) if sizes else 0)
        return overhead + per_element * elements

    def cost(self, int8: Iterable[str], weight: float = 1.0) -> float:
        """cost(L) of the module doc for the labeling with ``int8`` as the int8 nodes, conversions
        multiplied by ``weight``."""
        int8 = set(int8) & self.capable
        g = self.graph
        total = sum(self.t8[n] if n in int8 else self.t32[n] for n in g.op_type)
        converts = 0.0
        for tensor in g.tensors():
            source, users = g.producer.get(tensor), g.consumers.get(tensor, [])
            if source not in int8 and any(u in int8 for u in users):
                converts += self.conversion("Q", tensor)
            if source in int8 and (self._read_as_float(tensor) or any(u not in int8 for u in users)):
                converts += self.conversion("DQ", tensor)
        return total + weight * converts

    def _read_as_float(self, tensor: str) -> bool:
        """Whether ``tensor`` is a graph output that an int8 producer must dequantize: not when a
        Gemm/MatMul writes it for no other reader (its int8 kernel writes float,
        quantizer.float_outputs). A Gemm followed by a Softmax is left to the timing."""
        g = self.graph
        return tensor in g.outputs and (bool(g.consumers.get(tensor))
                                        or g.op_type.get(g.producer.get(tensor)) not in FLOAT_OUTPUT_OPS)

    def cut(self, weight: float = 1.0) -> set[str]:
        """Nodes labeled int8 by the minimum cut with conversion costs multiplied by ``weight``."""
        import networkx as nx

        g = self.graph
        net = nx.DiGraph()
        for n in g.op_type:
            net.add_edge(_SOURCE, n, capacity=self.t32[n])
            if n in self.capable:
                net.add_edge(n, _SINK, capacity=self.t8[n])
            else:
                net.add_edge(n, _SINK)  # no capacity attribute: infinite, the node stays float
        for tensor in g.tensors():  # graph order: the same graph gives the same cut on ties
            source, users = g.producer.get(tensor), g.consumers.get(tensor, [])
            q, dq = ("Q", tensor), ("DQ", tensor)
            for u in users:
                net.add_edge(u, q)
                net.add_edge(dq, u)
            if users:
                net.add_edge(q, _SINK if source is None else source, capacity=weight * self.conversion("Q", tensor))
            if self._read_as_float(tensor):
                net.add_edge(dq, _SINK)
            if source is not None:
                net.add_edge(source, dq, capacity=weight * self.conversion("DQ", tensor))
        _, (int8_side, _) = nx.minimum_cut(net, _SOURCE, _SINK)
        return {n for n in int8_side if isinstance(n, str) and n in self.capable}

    def losers(self, limit: int = 10) -> list[dict]:
        """Where int8 costs more than float in the first quantization: each int8 node's kernel time
        against its float time, plus the conversions on its tensors, worst first."""
        g, rows = self.graph, []
        for n in self.capable:
            extra = sum(ms for (kind, t), ms in self.measured.items()
                        if (kind == "Q" and n in g.consumers.get(t, [])) or (kind == "DQ" and g.producer.get(t) == n))
            delta = self.t8[n] + extra - self.t32[n]
            if delta > 0:
                rows.append({"node": n, "op_type": g.op_type[n], "int8_ms": round(self.t8[n], 4),
                             "conversions_ms": round(extra, 4), "float_ms": round(self.t32[n], 4),
                             "extra_ms": round(delta, 4)})
        return sorted(rows, key=lambda r: -r["extra_ms"])[:limit]

    def conversions_around(self, limit: int = 10) -> list[dict]:
        """The costliest standalone Q/DQ kernels of the first quantization and the ops they border."""
        g, rows = self.graph, []
        for (kind, tensor), ms in sorted(self.measured.items(), key=lambda kv: -kv[1])[:limit]:
            producer = g.producer.get(tensor)
            rows.append({"kind": kind, "tensor": tensor, "ms": round(ms, 4),
                         "producer": None if producer is None else f"{producer} ({g.op_type.get(producer, '?')})",
                         "consumers": [f"{c} ({g.op_type[c]})" for c in g.consumers.get(tensor, [])][:4]})
        return rows


def _fit_line(points: list[tuple[int | None, float]]) -> tuple[float, float] | None:
    """``ms = overhead + per_element * elements`` through the measured conversions, least squares
    with both coefficients kept non-negative (a two-parameter NNLS, solved by hand: the
    unconstrained solution, else the better of the two one-parameter fits)."""
    points = [(float(e), ms) for e, ms in points if e]
    if not points:
        return None
    e = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    if len(points) >= 2 and np.ptp(e) > 0:
        slope, intercept = np.polyfit(e, y, 1)
        if slope >= 0 and intercept >= 0:
            return float(intercept), float(slope)
    fits = [(float(np.mean(y)), 0.0), (0.0, float(np.dot(e, y) / np.dot(e, e)))]
    return min(fits, key=lambda f: float(np.sum((f[0] + f[1] * e - y) ** 2)))
