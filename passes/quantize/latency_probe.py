"""What the latency search measures: a model against a reference in interleaved rounds, and
per-node kernel times attributed back to the nodes of the saved model.

Target. Both are measured on the run's target (``benchmark.runtime`` / ``benchmark.ep``, handed
to the probe from the pass context): int8 that pays off on onnxruntime may not on OpenVINO, so the
search decides on what will be deployed. Per-node profiles are onnxruntime's only; on another
runtime the cost model is not built and the timed trials alone decide.

Timing. Both models warm up (``WARMUP`` runs each), then run ``ROUNDS`` rounds of ``RUNS``
timed runs (one warm run before each), the order alternating each round; for a model slow enough
that this would pass ``MAX_COMPARE_S``, fewer runs per round (at least ``MIN_RUNS``). ``ratio = exp(mean_r log(p50_r(model) / p50_r(reference)))``, the
geometric mean of the per-round p50 ratios (it cancels drift of the host between rounds), with a
95% bootstrap interval over rounds and runs (deployopt.measure.timing.speedup_interval).

Attribution. A profile row is a kernel onnxruntime ran, with the original nodes it covers. A
fused kernel's time goes to its heavy nodes (Conv/Gemm/MatMul: the Relu or Add it absorbed costs
nothing extra), else is split evenly over its nodes; a standalone QuantizeLinear /
DequantizeLinear kernel is a conversion of the float tensor it converts; a weight
DequantizeLinear that runs on its own is paid by the node that consumes the weight; kernels
onnxruntime inserted (layout reorders) are charged to the heavy nodes in proportion to their time.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import onnx

from deployopt.measure.runtime import open_runtime
from deployopt.measure.timing import speedup_interval, time_runs
from deployopt.passes.quantize.data import Feed

#: Interleaved timing of a candidate against the float model (per trial).
WARMUP, RUNS, ROUNDS = 5, 30, 3
#: Seconds one interleaved comparison aims at when RUNS would take longer, and the fewest timed
#: runs per round it goes down to.
MAX_COMPARE_S, MIN_RUNS = 20.0, 8
#: Per-node profiles (float model and the first quantization).
PROFILE_WARMUP, PROFILE_RUNS = 5, 20
#: A configuration counts as faster than float at a latency ratio of at most this (and with its
#: whole 95% interval below 1).
FASTER = 0.98
#: Ops that do the arithmetic of a fused kernel: a fused row's time is theirs, not the epilogue's.
HEAVY = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


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
    """What the search measures, on the target runtime in this process. Tests substitute a probe
    with synthetic timings (``QuantizePass.probe``) so that decisions do not depend on a busy host."""

    runtime: str = "onnxruntime"
    ep: str | None = None
    slot: Callable[[Callable[[], Any]], Any] | None = None

    def on_target(self, runtime: str, ep: str | None, slot: Callable[[Callable[[], Any]], Any] | None = None,
                  ) -> LatencyProbe:
        """This probe, measuring on ``runtime``/``ep`` from now on (the pass context's target),
        each measurement inside ``slot`` (the pass context's benchmark slot) when given."""
        self.runtime, self.ep, self.slot = runtime, ep, slot
        return self

    def _in_slot(self, measure: Callable[[], Any]) -> Any:
        return measure() if self.slot is None else self.slot(measure)

    def compare(self, reference: pathlib.Path, model: pathlib.Path, feeds: Feed, threads: int) -> Timing:
        return self._in_slot(lambda: measure_latency(reference, model, feeds, threads=threads, runtime=self.runtime,
                                                     ep=self.ep))

    def profile(self, path: pathlib.Path, proto: onnx.ModelProto, feeds: Feed, threads: int) -> NodeCosts:
        from deployopt.measure.profile import profile_model

        prof = self._in_slot(lambda: profile_model(
            path, threads=threads, runs=PROFILE_RUNS, warmup=PROFILE_WARMUP,
            shapes={k: tuple(v.shape) for k, v in feeds.items()}, isolated=False, timeout=None,
            runtime=self.runtime, ep=self.ep))
        # Kernel times above the end-to-end latency (coverage > 1) are the profiler's own
        # bookkeeping, a few µs per kernel: take it off every kernel evenly, or graphs with many
        # small kernels (int8 with its Q/DQ) would look slower than they run.
        excess = max(0.0, prof.total_node_ms - prof.end_to_end_ms) / max(1, len(prof.rows))
        return node_costs([(r.op_type, r.original_nodes, max(0.0, r.mean_ms - excess)) for r in prof.rows], proto)


def measure_latency(reference: pathlib.Path, model: pathlib.Path, feeds: Feed, *, threads: int,
                    warmup: int = WARMUP, runs: int = RUNS, rounds: int = ROUNDS, seed: int = 0,
                    runtime: str = "onnxruntime", ep: str | None = None) -> Timing:
    """Both models timed in interleaved rounds (the order alternates each round) on the target
    ``runtime``/``ep``, with the harness's session settings and statistics (module doc)."""
    sessions = [open_runtime(p, runtime, ep, threads=threads, what=f"model {pathlib.Path(p).name}")
                for p in (reference, model)]
    per_run_s = 0.0
    for sess in sessions:  # full warm-up once; the last warm run also estimates the cost of a run
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            sess.run(None, feeds)
        per_run_s += time.perf_counter() - t0
    # A large model (a detector at 800x608 runs ~1 s per call on a busy host) would spend minutes
    # on RUNS x ROUNDS; fewer runs per round keep one comparison near MAX_COMPARE_S, never below
    # MIN_RUNS (the bootstrap interval widens accordingly, and decisions read that interval).
    runs = max(MIN_RUNS, min(runs, int(MAX_COMPARE_S / max(rounds * per_run_s, 1e-9))))
    samples: list[list[np.ndarray]] = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            sess = sessions[i]
            sess.run(None, feeds)  # one warm run after the other model ran: caches are the other's
            ns, _ = time_runs(lambda s=sess: s.run(None, feeds), runs)
            samples[i].append(ns / 1e6)
    ref_p50 = float(np.median(np.concatenate(samples[0])))
    model_p50 = float(np.median(np.concatenate(samples[1])))
    # speedup_interval(base, other) bounds p50(base) / p50(other), so base = the model gives the
    # interval of the ratio.
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
    ``proto`` to its compute nodes and conversions (module doc)."""
    roles = _qdq_roles(proto)
    op_of = {n.name: n.op_type for n in proto.graph.node}
    nodes: dict[str, float] = collections.defaultdict(float)
    conversions: dict[tuple[str, str], float] = collections.defaultdict(float)
    total = unattributed = 0.0
    for op_type, originals, ms in rows:
        total += ms
        qdq = [n for n in originals if n in roles]
        compute = [n for n in originals if n in op_of and n not in roles]
        if op_type in QDQ and qdq:
            _charge_conversion(qdq, ms, roles, nodes, conversions)
        elif compute:
            heavy = [n for n in compute if op_of[n] in HEAVY] or compute
            for n in heavy:
                nodes[n] += ms / len(heavy)
        elif qdq:
            _charge_conversion(qdq, ms, roles, nodes, conversions)
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


def _charge_conversion(names: list[str], ms: float, roles: dict[str, tuple[str, object]],
                       nodes: dict[str, float], conversions: dict[tuple[str, str], float]) -> None:
    """Split a Q/DQ kernel's ``ms`` over the Q/DQ nodes ``names``: a weight DQ's share goes to the
    nodes that consume the weight, an activation Q/DQ's share to the conversion of its tensor."""
    for name in names:
        kind, what = roles[name]
        if kind == "W":
            for consumer in what or []:
                nodes[consumer] += ms / len(names) / max(1, len(what))
        else:
            conversions[(kind, what)] += ms / len(names)
