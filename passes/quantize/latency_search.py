"""Latency-aware quantization: keep int8 only where it is faster than float on this CPU.

The first quantization is timed against the float model. Unless it is already clearly faster
with every Q/DQ inside the graph fused (or the float model is too fast for timings to mean
much), both are profiled per node, the cost model (cost_model.py) is built, and its minimum cut
with the conversion costs weighted by each ``lambda`` in ``LAMBDAS`` gives candidate labelings,
from "int8 wherever a node wins" to "int8 only where it wins by a wide margin".

The model is an estimate (profiler overhead, layout transposes onnxruntime inserts at int8/float
borders, fusions that change when the neighbours change), so a labeling is only a candidate: it
is re-quantized with its float nodes in ``nodes_to_exclude`` (same calibration cache) and timed
against the float model in interleaved rounds (latency_probe.py). Decision: a configuration
counts as faster than float when the whole 95% interval of its latency ratio
``p50(int8) / p50(float)`` lies below 1 and the ratio is at most ``FASTER``; among those meeting
the accuracy rule the lowest ratio is kept (when the two lowest overlap, they are timed head to
head first, and a tie goes to the one with fewer float nodes); with none the float model is
returned.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable, Iterable

import onnx

from deployopt.core.errors import one_line
from deployopt.passes.quantize.cost_model import CostModel, graph_of
from deployopt.passes.quantize.data import Feed
from deployopt.passes.quantize.latency_probe import ROUNDS, RUNS, WARMUP, LatencyProbe

logger = logging.getLogger(__name__)

#: Skip the search when the first quantization is at least this much faster and fully fused.
SKIP_SPEEDUP = 1.5
#: Conversion-cost weights of the min-cut candidates, in the order they are tried.
LAMBDAS = (1.0, 2.0, 0.5, 4.0, 0.25, 8.0)

#: ``quantize(float_nodes, path)``: the model re-quantized with ``float_nodes`` kept float.
Quantize = Callable[[list[str], pathlib.Path], pathlib.Path]
#: ``check(path)``: the accuracy record of a model, with ``met`` (its accuracy rule).
Check = Callable[[pathlib.Path], dict]


@dataclasses.dataclass
class Outcome:
    """What the search chose: ``path`` None means the float model."""

    path: pathlib.Path | None
    excluded: list[str]  # nodes returned to float for latency (beyond the first quantization's)
    trials: list[dict]
    summary: dict
    note: str


class _Trials:
    """The candidates of one search, in order: a record per trial and the model it timed."""

    def __init__(self, float_path: pathlib.Path, feeds: Feed, threads: int, probe: LatencyProbe,
                 check: Check, op_of: dict[str, str]):
        self.float_path, self.feeds, self.threads = float_path, feeds, threads
        self.probe, self.check, self.op_of = probe, check, op_of
        self.records: list[dict] = []
        self.paths: dict[int, pathlib.Path] = {}

    def add(self, path: pathlib.Path, source: str, excluded: list[str], predicted: float | None, *,
            score: bool = True) -> dict:
        """Time ``path`` against the float model (and score it, unless ``score`` is False)."""
        t0 = time.perf_counter()
        timing = self.probe.compare(self.float_path, path, self.feeds, self.threads)
        record = {"trial": len(self.records), "source": source, "excluded_nodes": len(excluded),
                  "excluded_op_types": dict(collections.Counter(self.op_of.get(n, "?") for n in excluded)),
                  "excluded": list(excluded), "latency_ratio": round(timing.ratio, 4),
                  "latency_ratio_ci": [round(timing.ci[0], 4), round(timing.ci[1], 4)],
                  "float_p50_ms": round(timing.reference_ms, 4), "p50_ms": round(timing.model_ms, 4),
                  "faster": timing.faster, "predicted_ratio": predicted}
        if score:
            record.update(self.check(path))
        record["seconds"] = round(time.perf_counter() - t0, 2)
        self.paths[record["trial"]] = path
        self.records.append(record)
        return record

    def score(self, record: dict) -> None:
        """Score a trial that was timed without (its seconds include the scoring)."""
        t0 = time.perf_counter()
        record.update(self.check(self.paths[record["trial"]]))
        record["seconds"] = round(record["seconds"] + time.perf_counter() - t0, 2)


def search(*, float_path: pathlib.Path, trial0: pathlib.Path, pre_proto: onnx.ModelProto,
           qdq0_proto: onnx.ModelProto, capable: Iterable[str], feeds: Feed, threads: int,
           probe: LatencyProbe, quantize: Quantize, check: Check, internal_unfused: int, max_trials: int,
           budget_s: float, min_ms: float, tmp: pathlib.Path) -> Outcome:
    """Measure the first quantization against float, then try min-cut candidates (module doc).

    ``quantize(excluded, path)`` re-quantizes with more nodes in float; ``check(path)`` returns the
    accuracy record of a model with ``met``; ``internal_unfused`` is the number of Q/DQ kernels
    onnxruntime leaves unfused inside the graph of the first quantization (not counting the graph
    input's Q and the graph output's DQ).
    """
    start = time.perf_counter()
    capable = list(capable)
    trials = _Trials(float_path, feeds, threads, probe, check, {n.name: n.op_type for n in pre_proto.graph.node})
    # The first quantization is scored only once a search follows (it sets the accuracy baseline).
    first = trials.add(trial0, "first quantization", [], None, score=False)
    base = {"float_p50_ms": first["float_p50_ms"], "first_ratio": first["latency_ratio"],
            "internal_unfused_qdq": internal_unfused, "max_trials": max_trials, "budget_s": budget_s,
            "timing": {"warmup": WARMUP, "runs": RUNS, "rounds": ROUNDS, "threads": threads}}
    why_not = _skip_reason(first, internal_unfused, min_ms)
    if why_not is not None:
        return Outcome(trial0, [], trials.records, {**base, "result": "int8", "searched": False, "chosen_trial": 0},
                       why_not)
    trials.score(first)
    model, regions = _cost_model(probe, float_path, trial0, pre_proto, qdq0_proto, capable, feeds, threads)
    if model is not None:
        first["predicted_ratio"] = round(model.cost(model.capable) / model.cost(()), 4)
        _try_cuts(model, capable, trials, quantize, tmp, max_trials=max_trials, start=start, budget_s=budget_s)
    return _choose(trials, {**base, "searched": True, **regions})


def _skip_reason(first: dict, internal_unfused: int, min_ms: float) -> str | None:
    """Why no search follows the first quantization's timing (None: search)."""
    float_ms = first["float_p50_ms"]
    if float_ms < min_ms:
        return (f"latency-aware: search skipped, the float model runs in {float_ms:.3f} ms "
                f"(< latency_min_ms {min_ms:g}, per-call overhead dominates); the first "
                f"quantization measured {_ratio_text(first)} is kept, the pipeline's step guard decides")
    if 1 / first["latency_ratio"] >= SKIP_SPEEDUP and internal_unfused == 0:
        return (f"latency-aware: search skipped, the first quantization is already "
                f"{1 / first['latency_ratio']:.2f}x faster than float ({_ratio_text(first)}) "
                "with every Q/DQ inside the graph fused")
    return None


def _cost_model(probe: LatencyProbe, float_path: pathlib.Path, trial0: pathlib.Path, pre_proto: onnx.ModelProto,
                qdq0_proto: onnx.ModelProto, capable: list[str], feeds: Feed, threads: int,
                ) -> tuple[CostModel | None, dict]:
    """The cost model from per-node profiles of the float model and the first quantization, and
    what it says about them for the report. A model the profiler cannot run gives no cost model:
    only the measured trials decide."""
    try:
        float_costs = probe.profile(float_path, pre_proto, feeds, threads)
        int8_costs = probe.profile(trial0, qdq0_proto, feeds, threads)
        graph = graph_of(pre_proto, {k: v.shape for k, v in feeds.items()})
        model = CostModel.build(graph, capable, float_costs, int8_costs)
        return model, {"int8_costs_more": model.losers(), "costliest_conversions": model.conversions_around(),
                       "predicted_ms": {"float": round(model.cost(()), 4),
                                        "first_quantization": round(model.cost(model.capable), 4)},
                       "profiled_ms": {"float": round(float_costs.total_ms, 4),
                                       "first_quantization": round(int8_costs.total_ms, 4)}}
    except Exception as e:  # the profiler and onnxruntime raise their own exception types
        logger.warning("latency-aware: profiling failed: %s", one_line(e))
        return None, {"profile_error": one_line(e)}


def _try_cuts(model: CostModel, capable: list[str], trials: _Trials, quantize: Quantize, tmp: pathlib.Path, *,
              max_trials: int, start: float, budget_s: float) -> None:
    """Quantize, time and score the minimum cut for every weight in ``LAMBDAS`` that gives a new
    labeling, within ``max_trials`` trials and ``budget_s`` seconds since ``start``."""
    tried = {frozenset(capable)}
    for weight in LAMBDAS:
        # stop when the next trial (about as long as the last one) would overrun the budget
        if len(trials.records) >= max_trials or time.perf_counter() - start + trials.records[-1]["seconds"] > budget_s:
            break
        int8 = frozenset(model.cut(weight))
        if int8 in tried or not int8:  # nothing new, or "all float" (the float model itself)
            tried.add(int8)
            continue
        tried.add(int8)
        excluded = [n for n in capable if n not in int8]
        t0 = time.perf_counter()
        path = quantize(excluded, tmp / f"latency{len(trials.records)}.onnx")
        record = trials.add(path, f"min-cut, conversions x{weight:g}", excluded,
                            round(model.cost(int8) / model.cost(()), 4))
        record["seconds"] = round(time.perf_counter() - t0, 2)  # quantize + time + score


def _choose(trials: _Trials, summary: dict) -> Outcome:
    """The fastest trial that is faster than float and meets the accuracy rule (module doc), or
    the float model."""
    records, first = trials.records, trials.records[0]
    eligible = [t for t in records if t["met"] and t["faster"]]
    if not eligible:
        best = min(records, key=lambda t: t["latency_ratio"])
        summary.update(result="float", chosen_trial=None)
        return Outcome(None, [], records, summary,
                       f"latency-aware: no int8 configuration was faster than float in {len(records)} "
                       f"trial{'s' if len(records) != 1 else ''} (best {_ratio_text(best)}); the float "
                       "model is returned unchanged")
    ranked = sorted(eligible, key=lambda t: t["latency_ratio"])
    chosen = ranked[0]
    if len(ranked) > 1 and ranked[1]["latency_ratio_ci"][0] <= chosen["latency_ratio_ci"][1]:
        chosen = _head_to_head(trials, chosen, ranked[1], summary)
    chosen["chosen"] = True
    summary.update(result="int8", chosen_trial=chosen["trial"])
    if chosen["trial"] == 0:
        others = (f"none of {len(records) - 1} other configurations was faster" if len(records) > 1 else
                  "the minimum cut proposed no other int8 configuration")
        note = f"latency-aware: kept the first quantization ({_ratio_text(chosen)}); {others}"
    else:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(chosen["excluded_op_types"].items()))
        n = chosen["excluded_nodes"]
        note = (f"latency-aware: trial {chosen['trial']} kept, {n} node{'s' if n != 1 else ''} back "
                f"to float ({ops}): {_ratio_text(chosen)}; the first quantization was {_ratio_text(first)}")
    return Outcome(trials.paths[chosen["trial"]], chosen["excluded"], records, summary, note)


def _head_to_head(trials: _Trials, leader: dict, runner: dict, summary: dict) -> dict:
    """The two fastest are within each other's noise, and the lowest of several noisy ratios is
    biased low (winner's curse): time them against each other before choosing. When even that
    cannot separate them (its interval holds 1), the one with fewer nodes in float is kept:
    smaller, and closer to what was asked for."""
    duel = trials.probe.compare(trials.paths[runner["trial"]], trials.paths[leader["trial"]], trials.feeds,
                                trials.threads)
    summary["head_to_head"] = {"trials": [leader["trial"], runner["trial"]],
                               "ratio": round(duel.ratio, 4), "ci": [round(c, 4) for c in duel.ci]}
    tie = duel.ci[0] <= 1.0 <= duel.ci[1]
    if (duel.ratio > 1.0 and not tie) or (tie and runner["excluded_nodes"] < leader["excluded_nodes"]):
        return runner
    return leader


def _ratio_text(trial: dict) -> str:
    low, high = trial["latency_ratio_ci"]
    return f"{trial['latency_ratio']:.2f}x float latency [{low:.2f}, {high:.2f}]"
