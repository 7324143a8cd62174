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

Budget (``budget_s``, seconds of wall time from the start of the search). The first timing of
the first quantization always runs in full, whatever the budget: the search needs it to know
whether it is needed at all, and its duration is the yardstick of every later stage. Each later
stage starts only when its predicted duration fits in what is left of the budget: scoring the
first quantization (it needs room for the two profiles and a timing after it), the two per-node
profiles (``PROFILE_WARMUP + PROFILE_RUNS`` runs of each model against the first timing's
``ROUNDS * (WARMUP + RUNS)``, times ``PROFILE_OVERHEAD``), each trial (re-quantization, timing
and scoring: as long as the last trial, the first one as the first timing and scoring) and the
head-to-head (one timing).
When the budget stops the search before any trial, the first quantization alone is judged by
the rule above (it meets the accuracy rule by construction: it sets the agreement floors, and
the fallback has already met ``max_accuracy_drop``). Not covered: the first quantization,
calibration and everything else of the pass before the search, and the writing of the model
after it. The stages the budget cannot predict, the first scoring and the first
re-quantization, are the ones that can take the search past it.
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
from deployopt.passes.quantize.latency_probe import (PROFILE_RUNS, PROFILE_WARMUP, ROUNDS, RUNS, WARMUP,
                                                     LatencyProbe)

logger = logging.getLogger(__name__)

#: Skip the search when the first quantization is at least this much faster and fully fused.
SKIP_SPEEDUP = 1.5
#: Conversion-cost weights of the min-cut candidates, in the order they are tried.
LAMBDAS = (1.0, 2.0, 0.5, 4.0, 0.25, 8.0)
#: A per-node profile runs longer per run than a timing (the profiler records every kernel).
PROFILE_OVERHEAD = 1.5

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


class _Budget:
    """What is left of ``budget_s`` since ``start``, and the durations of the stages measured so
    far, from which the next stage's duration is predicted (module doc)."""

    def __init__(self, start: float, budget_s: float):
        self.start, self.budget_s = start, budget_s
        self.seconds: dict[str, float] = {}  # stage -> seconds of its last run
        self.stopped: str | None = None  # the stage the budget did not afford

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def measured(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = seconds

    def predict(self, *stages: str) -> float:
        return sum(self.seconds.get(stage, 0.0) for stage in stages)

    def affords(self, stage: str, seconds: float) -> bool:
        """Whether ``stage``, predicted to take ``seconds``, fits; if not, the search stops before it."""
        if self.spent() + seconds <= self.budget_s:
            return True
        self.stopped = self.stopped or stage
        return False

    def summary(self) -> dict:
        return {"budget_s": self.budget_s, "spent_s": round(self.spent(), 2), "stopped_before": self.stopped}

    def note(self) -> str:
        return (f"the search stopped before {self.stopped} at latency_budget_s {self.budget_s:g} "
                f"({self.spent():.1f} s spent)")


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
    budget = _Budget(time.perf_counter(), budget_s)
    capable = list(capable)
    trials = _Trials(float_path, feeds, threads, probe, check, {n.name: n.op_type for n in pre_proto.graph.node})
    # The first quantization is scored only once a search follows (it sets the accuracy baseline).
    first = trials.add(trial0, "first quantization", [], None, score=False)
    budget.measured("timing", first["seconds"])
    base = {"float_p50_ms": first["float_p50_ms"], "first_ratio": first["latency_ratio"],
            "internal_unfused_qdq": internal_unfused, "max_trials": max_trials, "budget_s": budget_s,
            "timing": {"warmup": WARMUP, "runs": RUNS, "rounds": ROUNDS, "threads": threads}}
    why_not = _skip_reason(first, internal_unfused, min_ms)
    if why_not is not None:
        return Outcome(trial0, [], trials.records, {**base, "result": "int8", "searched": False, "chosen_trial": 0},
                       why_not)
    # one profile of each model: PROFILE_WARMUP + PROFILE_RUNS runs, against the timing's runs of both
    budget.measured("profiles", first["seconds"] * PROFILE_OVERHEAD * (PROFILE_WARMUP + PROFILE_RUNS)
                    / (ROUNDS * (WARMUP + RUNS)))
    if not budget.affords("scoring the first quantization", budget.predict("profiles", "timing")):
        return _stopped_after_first(trials, {**base, "searched": False, "budget": budget.summary()}, budget)
    t0 = time.perf_counter()
    trials.score(first)
    budget.measured("scoring", time.perf_counter() - t0)
    if not budget.affords("the per-node profiles", budget.predict("profiles", "timing", "scoring")):
        return _stopped_after_first(trials, {**base, "searched": False, "budget": budget.summary()}, budget)
    t0 = time.perf_counter()
    model, regions = _cost_model(probe, float_path, trial0, pre_proto, qdq0_proto, capable, feeds, threads)
    budget.measured("profiles", time.perf_counter() - t0)
    if model is not None:
        first["predicted_ratio"] = round(model.cost(model.capable) / model.cost(()), 4)
        _try_cuts(model, capable, trials, quantize, tmp, max_trials=max_trials, budget=budget)
    summary = {**base, "searched": True, **regions}
    outcome = _choose(trials, summary, budget)
    summary["budget"] = budget.summary()
    if budget.stopped:
        outcome.note += f"; {budget.note()}"
    return outcome


def _stopped_after_first(trials: _Trials, summary: dict, budget: _Budget) -> Outcome:
    """The budget stopped the search before any trial: the first quantization alone, judged by
    the search's rule (module doc: it meets the accuracy rule by construction)."""
    first = trials.records[0]
    if first["faster"] and first.get("met", True):
        summary.update(result="int8", chosen_trial=0)
        first["chosen"] = True
        return Outcome(trials.paths[0], [], trials.records, summary,
                       f"latency-aware: kept the first quantization ({_ratio_text(first)}); {budget.note()}")
    summary.update(result="float", chosen_trial=None)
    return Outcome(None, [], trials.records, summary,
                   f"latency-aware: the first quantization was not faster than float with confidence "
                   f"({_ratio_text(first)}); the float model is returned unchanged; {budget.note()}")


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
              max_trials: int, budget: _Budget) -> None:
    """Quantize, time and score the minimum cut for every weight in ``LAMBDAS`` that gives a new
    labeling, within ``max_trials`` trials and the budget (a trial starts only when its predicted
    re-quantization, timing and scoring fit)."""
    tried = {frozenset(capable)}
    for weight in LAMBDAS:
        if len(trials.records) >= max_trials:
            break
        int8 = frozenset(model.cut(weight))
        if int8 in tried or not int8:  # nothing new, or "all float" (the float model itself)
            tried.add(int8)
            continue
        tried.add(int8)
        predicted = budget.predict("trial") if "trial" in budget.seconds else budget.predict("timing", "scoring")
        if not budget.affords(f"trial {len(trials.records)}", predicted):
            break
        excluded = [n for n in capable if n not in int8]
        t0 = time.perf_counter()
        path = quantize(excluded, tmp / f"latency{len(trials.records)}.onnx")
        record = trials.add(path, f"min-cut, conversions x{weight:g}", excluded,
                            round(model.cost(int8) / model.cost(()), 4))
        record["seconds"] = round(time.perf_counter() - t0, 2)  # quantize + time + score
        budget.measured("trial", record["seconds"])


def _choose(trials: _Trials, summary: dict, budget: _Budget) -> Outcome:
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
        if budget.affords("the head-to-head", budget.predict("timing")):
            chosen = _head_to_head(trials, chosen, ranked[1], summary)
        else:  # cannot be told apart without it: the tie rule
            chosen = min(ranked[:2], key=lambda t: (t["excluded_nodes"], t["latency_ratio"]))
            summary["head_to_head"] = {"trials": [ranked[0]["trial"], ranked[1]["trial"]],
                                       "skipped": "latency_budget_s spent; the tie rule chose"}
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
