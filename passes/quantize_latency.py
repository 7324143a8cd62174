"""Latency-aware quantization: keep int8 only where it is faster than float on this CPU.

onnxruntime runs a node of a QDQ model as an int8 kernel only when it has one and the Q/DQ
pattern around the node matches one of its fusions; everywhere else a DequantizeLinear
``x = s (q - z)`` and a QuantizeLinear ``q = clamp(round(x / s) + z)`` run as separate passes
over the tensor. Around ops without int8 kernels (HardSwish, HardSigmoid, PRelu, ...) and next to
convolutions too small to amortise them, those conversions cost more than int8 saves, and the
int8 model is slower than the float one (onnxruntime#20052, #17389, #12854).

Cost model. Label every compute node ``n`` of the float graph int8 (``L_n = 1``) or float (0):

    cost(L) = sum_n [L_n t8(n) + (1 - L_n) t32(n)]
            + sum_e Q_e   [producer of e float, some consumer of e int8]
            + sum_e DQ_e  [producer of e int8, some consumer of e float (or e a graph output)]

``t32`` / ``t8`` are per-node kernel times from onnxruntime's profiler (deployopt.measure.profile, which
maps fused kernels back to the saved model's node names) of the float model and of the first
quantization; ``Q_e`` / ``DQ_e`` are the standalone QuantizeLinear / DequantizeLinear kernels
measured on tensor ``e``, or for tensors that had none a line ``a + b * elements`` fitted to the
measured ones. Nodes that cannot run int8 have ``t8 = inf``. Every term is unary or a
non-negative cost paid only when neighbours disagree, so ``cost`` is submodular and its exact
minimum is an s-t minimum cut (Kolmogorov & Zabih, "What energy functions can be minimized via
graph cuts?", PAMI 2004): source side = int8, sink side = float; arcs ``s -> n`` of capacity
``t32(n)`` and ``n -> t`` of ``t8(n)``; a tensor's Q is an auxiliary node ``a_e`` that every int8
consumer pulls to the source side (infinite arcs ``v -> a_e``) and that pays ``Q_e`` through the
arc ``a_e -> producer`` when the producer is float; its DQ is ``b_e`` with infinite arcs
``b_e -> v`` from the consumers and the arc ``producer -> b_e`` of ``DQ_e``. networkx's
maximum-flow solver computes the cut (no library offers this placement, hence the hand-written
graph).

The model is an estimate (profiler overhead, layout transposes onnxruntime inserts at int8/float
borders, fusions that change when the neighbours change), so a labeling is only a candidate: it
is re-quantized with its float nodes in ``nodes_to_exclude`` (same calibration cache) and timed
against the float model in interleaved rounds. Conversion costs weighted by ``lambda`` in
``LAMBDAS`` give further candidates, from "int8 wherever a node wins" to "int8 only where it
wins by a wide margin". Decision: a configuration counts as faster than float when the whole 95%
interval of its latency ratio ``p50(int8) / p50(float)`` lies below 1 and the ratio is at most
``FASTER``; among those meeting the accuracy rule the lowest ratio is kept (when the two lowest
overlap, they are timed head to head first, and a tie goes to the one with fewer float nodes); with
none the float model is returned.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import pathlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

logger = logging.getLogger(__name__)

#: Interleaved timing of a candidate against the float model (per trial).
WARMUP, RUNS, ROUNDS = 5, 30, 3
#: Per-node profiles (float model and the first quantization).
PROFILE_WARMUP, PROFILE_RUNS = 5, 20
#: A configuration counts as faster than float at a latency ratio of at most this (and with its
#: whole 95% interval below 1).
FASTER = 0.98
#: Skip the search when the first quantization is at least this much faster and fully fused.
SKIP_SPEEDUP = 1.5
#: Without max_accuracy_drop, a trial's top-1 agreement with the float model may fall at most
#: this much below the first quantization's.
AGREEMENT_SLACK = 0.01
#: Samples the agreement check runs (evaluation data, else calibration data).
AGREEMENT_SAMPLES = 256
#: Conversion-cost weights of the min-cut candidates, in the order they are tried.
LAMBDAS = (1.0, 2.0, 0.5, 4.0, 0.25, 8.0)
#: Ops that do the arithmetic of a fused kernel: a fused row's time is theirs, not the epilogue's.
HEAVY = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: Fallback conversion cost when nothing was measured: ~0.3 ns per element (memory bound) plus
#: the per-kernel dispatch cost seen on this machine's profiles.
DEFAULT_NS_PER_ELEMENT = 0.3
DEFAULT_OVERHEAD_MS = 0.002
_SOURCE, _SINK = ("source",), ("sink",)  # tuples never collide with node names (str)


# -- measurements --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Timing:
    """``ratio = p50(model) / p50(reference)`` (< 1: the model is faster), 95% bootstrap interval."""

    ratio: float
    ci: tuple[float, float]
    reference_ms: float
    model_ms: float

    @property
    def faster(self) -> bool:
        """Faster than the reference with confidence: the whole interval below 1 and a gain of at
        least 1 - FASTER (smaller gains are within what a busy host shifts between runs)."""
        return self.ci[1] < 1.0 and self.ratio <= FASTER


@dataclasses.dataclass
class NodeCosts:
    """Per-node kernel time of one model (ms per run) split into compute and conversions."""

    nodes: dict[str, float]  # original compute node -> ms
    conversions: dict[tuple[str, str], float]  # ("Q" | "DQ", tensor) -> ms of a standalone kernel
    total_ms: float
    unattributed_ms: float  # kernels onnxruntime inserted (layout), charged to the heavy nodes


class LatencyProbe:
    """What the search measures, on onnxruntime in this process. Tests substitute a probe with
    synthetic timings (``QuantizePass.probe``) so that decisions do not depend on a busy host."""

    def compare(self, reference: pathlib.Path, model: pathlib.Path, feeds: dict[str, np.ndarray],
                threads: int) -> Timing:
        return measure_latency(reference, model, feeds, threads=threads)

    def profile(self, path: pathlib.Path, proto: onnx.ModelProto, feeds: dict[str, np.ndarray],
                threads: int) -> NodeCosts:
        from deployopt.measure.profile import profile_model

        prof = profile_model(path, threads=threads, runs=PROFILE_RUNS, warmup=PROFILE_WARMUP,
                             shapes={k: tuple(v.shape) for k, v in feeds.items()},
                             isolated=False, timeout=None)
        # Kernel times above the end-to-end latency (coverage > 1) are the profiler's own
        # bookkeeping, a few µs per kernel (deployopt.measure.profile): take it off every kernel evenly,
        # or graphs with many small kernels (int8 with its Q/DQ) would look slower than they run.
        excess = max(0.0, prof.total_node_ms - prof.end_to_end_ms) / max(1, len(prof.rows))
        return node_costs([(r.op_type, r.original_nodes, max(0.0, r.mean_ms - excess)) for r in prof.rows], proto)


def measure_latency(reference: pathlib.Path, model: pathlib.Path, feeds: dict[str, np.ndarray], *,
                    threads: int, warmup: int = WARMUP, runs: int = RUNS, rounds: int = ROUNDS,
                    seed: int = 0) -> Timing:
    """Both models timed in interleaved rounds (the order alternates each round), with the
    harness's session settings and statistics (deployopt.measure.latency: bootstrap over rounds)."""
    import onnxruntime as ort

    from deployopt.core.session import session_options
    from deployopt.measure.timing import speedup_interval, time_runs

    sessions = [ort.InferenceSession(str(p), session_options(threads), providers=["CPUExecutionProvider"])
                for p in (reference, model)]
    samples: list[list[np.ndarray]] = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            sess = sessions[i]
            for _ in range(warmup):
                sess.run(None, feeds)
            ns, _ = time_runs(lambda s=sess: s.run(None, feeds), runs)
            samples[i].append(ns / 1e6)
    ref_p50 = float(np.median(np.concatenate(samples[0])))
    model_p50 = float(np.median(np.concatenate(samples[1])))
    # The ratio is the geometric mean of the per-round p50 ratios (the statistic the bootstrap
    # resamples, and the one that cancels drift between rounds); speedup_interval(base, other)
    # bounds p50(base) / p50(other), so base = the model gives the interval of the ratio.
    ratio = float(np.exp(np.mean([np.log(np.median(m) / np.median(r)) for m, r in zip(samples[1], samples[0])])))
    low, high = speedup_interval(samples[1], samples[0], seed=seed)
    return Timing(ratio, (low, high), ref_p50, model_p50)


def _qdq_roles(proto: onnx.ModelProto) -> dict[str, tuple[str, object]]:
    """Q/DQ node name -> ("Q", tensor) | ("DQ", tensor) | ("W", [consumer nodes]) where tensor is
    the float tensor of the original graph the node converts (a weight DQ is part of its consumer)."""
    initializers = {t.name for t in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    # The quantizer renames the producer's output of a graph output y to y_QuantizeLinear_Input
    # and lets the final DequantizeLinear produce y: both conversions are of the float tensor y.
    renamed = {}
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.output[0] in outputs:
            q = next((m for m in proto.graph.node if m.op_type == "QuantizeLinear" and m.output[0] == n.input[0]), None)
            if q is not None:
                renamed[q.input[0]] = n.output[0]
    q_input = {n.output[0]: renamed.get(n.input[0], n.input[0])
               for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    consumers: dict[str, list[str]] = collections.defaultdict(list)
    for n in proto.graph.node:
        for i in n.input:
            consumers[i].append(n.name)
    roles: dict[str, tuple[str, object]] = {}
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear":
            roles[n.name] = ("Q", renamed.get(n.input[0], n.input[0]))
        elif n.op_type == "DequantizeLinear":
            source = n.input[0]
            if source in initializers:
                roles[n.name] = ("W", consumers[n.output[0]])
            else:
                roles[n.name] = ("DQ", q_input.get(source, source))
    return roles


def node_costs(rows: Iterable[tuple[str, Sequence[str], float]], proto: onnx.ModelProto) -> NodeCosts:
    """Attribute profile rows ``(executed op type, original node names, ms)`` of the model
    ``proto`` to its compute nodes and conversions.

    A fused kernel's time goes to its heavy nodes (Conv/Gemm/MatMul: the Relu or Add it absorbed
    costs nothing extra), else is split evenly over its nodes; a standalone QuantizeLinear /
    DequantizeLinear kernel is a conversion of its tensor; a weight DequantizeLinear that runs on
    its own is paid by the node that consumes the weight.
    """
    roles = _qdq_roles(proto)
    op_of = {n.name: n.op_type for n in proto.graph.node}
    nodes: dict[str, float] = collections.defaultdict(float)
    conversions: dict[tuple[str, str], float] = collections.defaultdict(float)
    total = unattributed = 0.0

    def convert(names: list[str], ms: float) -> None:
        for name in names:
            kind, what = roles[name]
            if kind == "W":
                for consumer in what or []:
                    nodes[consumer] += ms / len(names) / max(1, len(what))
            else:
                conversions[(kind, what)] += ms / len(names)

    for op_type, originals, ms in rows:
        total += ms
        qdq = [n for n in originals if n in roles]
        compute = [n for n in originals if n in op_of and n not in roles]
        if op_type in QDQ and qdq:
            convert(qdq, ms)
        elif compute:
            heavy = [n for n in compute if op_of[n] in HEAVY] or compute
            for n in heavy:
                nodes[n] += ms / len(heavy)
        elif qdq:
            convert(qdq, ms)
        else:
            unattributed += ms
    # Layout kernels onnxruntime inserts (NCHWc reorders around float convolutions, NHWC
    # transposes around int8 ones) exist because of the heavy kernels' layout: charge them to
    # those kernels in proportion to their time.
    heavy = {n: ms for n, ms in nodes.items() if op_of.get(n) in HEAVY}
    heavy_ms = sum(heavy.values())
    if unattributed and heavy_ms > 0:
        for n, ms in heavy.items():
            nodes[n] += unattributed * ms / heavy_ms
    return NodeCosts(dict(nodes), dict(conversions), total, unattributed)


# -- the graph and its cut -----------------------------------------------------------------------

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
        outputs = set(g.outputs)
        for tensor in g.tensors():
            source, users = g.producer.get(tensor), g.consumers.get(tensor, [])
            if source not in int8 and any(u in int8 for u in users):
                converts += self.conversion("Q", tensor)
            if source in int8 and (tensor in outputs or any(u not in int8 for u in users)):
                converts += self.conversion("DQ", tensor)
        return total + weight * converts

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
        outputs = set(g.outputs)
        for tensor in g.tensors():  # graph order: the same graph gives the same cut on ties
            source, users = g.producer.get(tensor), g.consumers.get(tensor, [])
            q, dq = ("Q", tensor), ("DQ", tensor)
            for u in users:
                net.add_edge(u, q)
                net.add_edge(dq, u)
            if users:
                net.add_edge(q, _SINK if source is None else source, capacity=weight * self.conversion("Q", tensor))
            if tensor in outputs:
                net.add_edge(dq, _SINK)  # a graph output is read as float
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


# -- the search ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    """What the search chose: ``path`` None means the float model."""

    path: pathlib.Path | None
    excluded: list[str]  # nodes returned to float for latency (beyond the first quantization's)
    trials: list[dict]
    summary: dict
    note: str


def search(*, float_path: pathlib.Path, trial0: pathlib.Path, pre_proto: onnx.ModelProto,
           qdq0_proto: onnx.ModelProto, capable: Iterable[str], feeds: dict[str, np.ndarray],
           threads: int, probe: LatencyProbe, quantize: Callable[[list[str], pathlib.Path], pathlib.Path],
           check: Callable[[pathlib.Path], dict], internal_unfused: int, max_trials: int,
           budget_s: float, min_ms: float, tmp: pathlib.Path) -> Outcome:
    """Measure the first quantization against float, then try min-cut candidates (module doc).

    ``check(path)`` returns the accuracy record of a model with ``met`` (its accuracy rule);
    ``quantize(excluded, path)`` re-quantizes with more nodes in float; ``internal_unfused`` is
    the number of Q/DQ kernels onnxruntime leaves unfused inside the graph of the first
    quantization (not counting the graph input's Q and the graph output's DQ).
    """
    start = time.perf_counter()
    capable = list(capable)
    trials: list[dict] = []
    paths: dict[int, pathlib.Path] = {}
    op_of = {n.name: n.op_type for n in pre_proto.graph.node}

    def trial(path: pathlib.Path, source: str, excluded: list[str], predicted: float | None,
              score: bool = True) -> dict:
        t0 = time.perf_counter()
        timing = probe.compare(float_path, path, feeds, threads)
        record = {"trial": len(trials), "source": source, "excluded_nodes": len(excluded),
                  "excluded_op_types": dict(collections.Counter(op_of.get(n, "?") for n in excluded)),
                  "excluded": list(excluded), "latency_ratio": round(timing.ratio, 4),
                  "latency_ratio_ci": [round(timing.ci[0], 4), round(timing.ci[1], 4)],
                  "float_p50_ms": round(timing.reference_ms, 4), "p50_ms": round(timing.model_ms, 4),
                  "faster": timing.faster, "predicted_ratio": predicted}
        if score:
            record.update(check(path))
        record["seconds"] = round(time.perf_counter() - t0, 2)
        paths[record["trial"]] = path
        trials.append(record)
        return record

    # The first quantization is scored only once a search follows (it sets the accuracy baseline).
    first = trial(trial0, "first quantization", [], None, score=False)
    float_ms = first["float_p50_ms"]
    base = {"float_p50_ms": float_ms, "first_ratio": first["latency_ratio"],
            "internal_unfused_qdq": internal_unfused, "max_trials": max_trials, "budget_s": budget_s,
            "timing": {"warmup": WARMUP, "runs": RUNS, "rounds": ROUNDS, "threads": threads}}
    if float_ms < min_ms:
        return Outcome(trial0, [], trials, {**base, "result": "int8", "searched": False, "chosen_trial": 0},
                       f"latency-aware: search skipped, the float model runs in {float_ms:.3f} ms "
                       f"(< latency_min_ms {min_ms:g}, per-call overhead dominates); the first "
                       f"quantization measured {_ratio_text(first)} is kept, the pipeline's step "
                       "guard decides")
    if 1 / first["latency_ratio"] >= SKIP_SPEEDUP and internal_unfused == 0:
        return Outcome(trial0, [], trials, {**base, "result": "int8", "searched": False, "chosen_trial": 0},
                       f"latency-aware: search skipped, the first quantization is already "
                       f"{1 / first['latency_ratio']:.2f}x faster than float ({_ratio_text(first)}) "
                       "with every Q/DQ inside the graph fused")

    t0 = time.perf_counter()
    first.update(check(trial0))
    first["seconds"] = round(first["seconds"] + time.perf_counter() - t0, 2)
    model, regions = None, {}
    try:
        float_costs = probe.profile(float_path, pre_proto, feeds, threads)
        int8_costs = probe.profile(trial0, qdq0_proto, feeds, threads)
        graph = graph_of(pre_proto, {k: v.shape for k, v in feeds.items()})
        model = CostModel.build(graph, capable, float_costs, int8_costs)
        regions = {"int8_costs_more": model.losers(), "costliest_conversions": model.conversions_around(),
                   "predicted_ms": {"float": round(model.cost(()), 4),
                                    "first_quantization": round(model.cost(model.capable), 4)},
                   "profiled_ms": {"float": round(float_costs.total_ms, 4), "first_quantization":
                                   round(int8_costs.total_ms, 4)}}
    except Exception as e:  # a model the profiler cannot run: only the measured trials decide
        logger.warning("latency-aware: profiling failed: %s", e)
        regions = {"profile_error": " ".join(str(e).split())[:300]}

    tried = {frozenset(capable)}
    if model is not None:
        first["predicted_ratio"] = round(model.cost(model.capable) / model.cost(()), 4)
        for weight in LAMBDAS:
            # stop when the next trial (about as long as the last one) would overrun the budget
            if len(trials) >= max_trials or time.perf_counter() - start + trials[-1]["seconds"] > budget_s:
                break
            int8 = frozenset(model.cut(weight))
            if int8 in tried or not int8:  # nothing new, or "all float" (the float model itself)
                tried.add(int8)
                continue
            tried.add(int8)
            excluded = [n for n in capable if n not in int8]
            t0 = time.perf_counter()
            path = quantize(excluded, tmp / f"latency{len(trials)}.onnx")
            record = trial(path, f"min-cut, conversions x{weight:g}", excluded,
                           round(model.cost(int8) / model.cost(()), 4))
            record["seconds"] = round(time.perf_counter() - t0, 2)  # quantize + time + score

    eligible = [t for t in trials if t["met"] and t["faster"]]
    summary = {**base, "searched": True, **regions}
    if not eligible:
        best = min(trials, key=lambda t: t["latency_ratio"])
        summary.update(result="float", chosen_trial=None)
        return Outcome(None, [], trials, summary,
                       f"latency-aware: no int8 configuration was faster than float in {len(trials)} "
                       f"trial{'s' if len(trials) != 1 else ''} (best {_ratio_text(best)}); the float "
                       "model is returned unchanged")
    ranked = sorted(eligible, key=lambda t: t["latency_ratio"])
    chosen = ranked[0]
    if len(ranked) > 1 and ranked[1]["latency_ratio_ci"][0] <= chosen["latency_ratio_ci"][1]:
        # The two fastest are within each other's noise: the lowest of several noisy ratios is
        # biased low (winner's curse), so time them head to head before choosing.
        # When even that cannot separate them (its interval holds 1), the one with fewer nodes in
        # float is kept: smaller, and closer to what was asked for.
        runner = ranked[1]
        duel = probe.compare(paths[runner["trial"]], paths[chosen["trial"]], feeds, threads)
        summary["head_to_head"] = {"trials": [chosen["trial"], runner["trial"]],
                                   "ratio": round(duel.ratio, 4), "ci": [round(c, 4) for c in duel.ci]}
        tie = duel.ci[0] <= 1.0 <= duel.ci[1]
        if (duel.ratio > 1.0 and not tie) or (tie and runner["excluded_nodes"] < chosen["excluded_nodes"]):
            chosen = runner
    chosen["chosen"] = True
    summary.update(result="int8", chosen_trial=chosen["trial"])
    if chosen["trial"] == 0:
        others = (f"none of {len(trials) - 1} other configurations was faster" if len(trials) > 1 else
                  "the minimum cut proposed no other int8 configuration")
        note = f"latency-aware: kept the first quantization ({_ratio_text(chosen)}); {others}"
    else:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(chosen["excluded_op_types"].items()))
        n = chosen["excluded_nodes"]
        note = (f"latency-aware: trial {chosen['trial']} kept, {n} node{'s' if n != 1 else ''} back "
                f"to float ({ops}): {_ratio_text(chosen)}; the first quantization was {_ratio_text(first)}")
    return Outcome(paths[chosen["trial"]], chosen["excluded"], trials, summary, note)


def _ratio_text(trial: dict) -> str:
    low, high = trial["latency_ratio_ci"]
    return f"{trial['latency_ratio']:.2f}x float latency [{low:.2f}, {high:.2f}]"


def internal_unfused(kernels: dict, proto: onnx.ModelProto) -> int:
    """Unfused Q/DQ kernels onnxruntime runs inside the graph: beyond one Q per graph input and
    one DQ per graph output (quantize_report.ort_kernels counts)."""
    initializers = {t.name for t in proto.graph.initializer}
    n_in = sum(1 for v in proto.graph.input if v.name not in initializers)
    n_out = len(proto.graph.output)
    return (max(0, kernels["unfused_quantize_linear"] - n_in)
            + max(0, kernels["unfused_dequantize_linear"] - n_out))


def top1(sess, feeds: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
    """Arg-max over the last axis of the first output, per sample and position: ``[N]`` for
    ``[N, classes]`` logits, ``[N, T]`` for a sequence model's ``[N, T, classes]``."""
    output = sess.get_outputs()[0].name
    parts = []
    for feed in feeds:
        logits = np.asarray(sess.run([output], feed)[0])
        parts.append(logits.argmax(axis=-1) if logits.ndim >= 2 else logits)
    return np.concatenate(parts) if parts else np.empty(0)


def agreement(reference: np.ndarray, predictions: np.ndarray) -> float:
    """Share of samples (and positions) where both models predict the same class."""
    return float(np.mean(reference == predictions)) if reference.size else math.nan
