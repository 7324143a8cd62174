"""Side-by-side latency of ONNX models on a CPU runtime, with ratios that survive a noisy host.

Method
  * Each model runs in its own worker process (``deployopt.measure.worker``): one session per thread
    count, ``warmup`` untimed runs before every measured segment of ``runs`` timed runs.
  * Rounds interleave the models: for each round, for each (threads, batch), A then B then ...
    Slow drift of the host (other jobs, turbo, thermal) then hits every model alike, so the
    ratio of two models is far more stable than either absolute number.
  * Per row: the statistics of all ``rounds x runs`` samples (``deployopt.measure.timing``:
    percentiles, mean, std, min, CV, throughput). speedup = p50(first model) / p50(this model)
    at the same (threads, batch), with a 95% interval from a two-level bootstrap over the paired
    rounds (``timing.speedup_interval``).
  * A CV above ``CV_WARN`` is reported as a warning (in the result and on stderr).
  * Target: every model runs on ``runtime``/``ep`` (``deployopt.measure.runtime``: onnxruntime with
    an execution provider, or OpenVINO), or each on its own entry of ``targets``, so one
    interleaved run can compare runtimes; every row says what it ran on.
  * Throughput mode (``instances`` N > 1, server-style deployment): each model runs in N worker
    processes at once (separate processes, so the GIL serializes nothing), each with ``threads``
    intra-op threads; every measured segment starts all N together. Latency statistics are over
    all instances' runs; ``throughput_ips`` is the aggregate under that load,
    batch x (runs that ended inside the window where all N were timing) / (window length), the
    window running from the last instance's first timed run to the first instance's last one.
Session settings (recorded in every result): those of ``deployopt.core.session``, intra-op threads
as given, graph optimization ORT_ENABLE_ALL unless told otherwise. Inputs are planned in this
process before any worker starts (``deployopt.measure.inputs``); the result's output formats are in
``deployopt.measure.latency_report``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from deployopt.core.errors import UserError
from deployopt.measure import latency_report
from deployopt.measure import machine as machine_mod
from deployopt.measure.inputs import check_settings, plan_feeds
from deployopt.measure.latency_report import ROW_KEYS
from deployopt.measure.model_io import input_specs, load_proto
from deployopt.measure.runtime import Target, as_target, check_target, recorded_options
from deployopt.measure.timing import CV_WARN, cv_warnings, speedup_interval, summarize
from deployopt.measure.worker import Worker, WorkerFailure

#: How far ahead concurrent instances are told to start their timed runs: enough for the request
#: to reach every worker process on a busy host.
START_MARGIN_NS = 50_000_000
_STAT_KEYS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "cv",
              "throughput_ips")


# -- result -------------------------------------------------------------------------------------

@dataclasses.dataclass
class BenchResult:
    rows: list[dict]
    machine: dict
    session_options: dict
    warnings: list[str]
    settings: dict = dataclasses.field(default_factory=dict)
    models: list[dict] = dataclasses.field(default_factory=list)  # [{label, path}]
    #: One entry per measured segment, in execution order: {round, model, threads, batch,
    #: runs, wall_ms, sum_ms, session_load_s}; wall_ms - sum_ms is the timing loop's own cost.
    timeline: list[dict] = dataclasses.field(default_factory=list)

    def to_dict(self, *, samples: bool = False) -> dict:
        return latency_report.result_dict(self, samples=samples)

    def to_json(self, *, samples: bool = False, indent: int = 2) -> str:
        return latency_report.to_json(self, samples=samples, indent=indent)

    def to_csv(self) -> str:
        return latency_report.to_csv(self)

    def to_text(self) -> str:
        return latency_report.to_text(self)

    def to_markdown(self) -> str:
        return latency_report.to_markdown(self)


def _labels(paths, labels) -> list[str]:
    if labels is not None:
        labels = [str(x) for x in labels]
        if len(labels) != len(paths):
            raise UserError(f"labels: {len(labels)} labels for {len(paths)} models")
        if len(set(labels)) != len(labels):
            raise UserError(f"labels: duplicate labels in {', '.join(labels)}")
        return labels
    out, seen = [], {}
    for p in paths:
        stem = pathlib.Path(p).name.removesuffix(".onnx")
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}#{seen[stem]}")
    return out


# -- the benchmark ------------------------------------------------------------------------------

def compare(paths: Sequence[str | os.PathLike], *, labels: Sequence[str] | None = None,
            threads: Sequence[int] = (1,), batch: Sequence[int] = (1,), warmup: int = 10,
            runs: int = 100, rounds: int = 3, shapes: dict[str, tuple] | None = None, data=None,
            seed: int = 0, timeout: float | None = None, progress: bool = True,
            optimization_level: str = "all", worker_entry=None, runtime: str = "onnxruntime",
            ep: str | None = None, targets: Sequence | None = None, instances: int = 1) -> BenchResult:
    """Benchmark ``paths`` side by side (see module doc); speedups are vs ``paths[0]``.

    ``targets``: one (runtime, ep) pair or Target per model, instead of ``runtime``/``ep`` for all;
    ``instances``: concurrent worker processes per model (throughput mode, module doc).

    A model that cannot be loaded, crashes its worker or exceeds ``timeout`` seconds (its total
    time answering, after its interpreter started) gets rows with ``error`` set; the others
    complete. Bad settings, unresolvable input shapes and ``data`` that does not fit raise
    UserError before anything runs. ``worker_entry`` replaces the worker's main loop (for
    fault-injection tests).
    """
    from tqdm import tqdm

    threads, batch = tuple(threads), tuple(batch)
    check_settings(threads=threads, batch=batch, warmup=warmup, runs=runs, rounds=rounds,
                   timeout=timeout, optimization_level=optimization_level, instances=instances)
    if not paths:
        raise UserError("bench: no models given")
    paths = [str(p) for p in paths]
    names = _labels(paths, labels)
    if targets is None:
        targets = [Target(runtime, ep)] * len(paths)
    elif len(targets) != len(paths):
        raise UserError(f"targets: {len(targets)} targets for {len(paths)} models")
    # An unavailable runtime or EP is bad input before any worker starts, never a fallback.
    targets = [check_target(t.runtime, t.ep, key="runtime", ep_key="ep")
               for t in (as_target(t) for t in targets)]
    target_of = dict(zip(names, targets))
    shapes = {k: tuple(v) for k, v in (shapes or {}).items()}

    # Plan every model's inputs in this process first: bad input fails before any worker starts.
    load_errors: dict[str, str] = {}
    plans: dict[str, dict] = {}
    known_inputs: set[str] = set()
    for name, path in zip(names, paths):
        try:
            proto = load_proto(path)
        except UserError as e:
            load_errors[name] = f"cannot load: {e}"
            continue
        specs = input_specs(proto)
        del proto
        known_inputs.update(s.name for s in specs)
        plans[name] = plan_feeds(path, specs, batch, shapes, data, seed)
    unknown = sorted(set(shapes) - known_inputs)
    if unknown and plans:
        raise UserError(f"--shape {unknown[0]}: no model has an input named {unknown[0]!r} "
                        f"(inputs: {', '.join(sorted(known_inputs))})")

    warnings: list[str] = []
    machine = machine_mod.stamp(runtimes=True)
    if max(threads) * instances > machine["cores"]:
        what = f"threads={max(threads)}" + (f" x {instances} instances" if instances > 1 else "")
        warnings.append(f"{what} exceeds the {machine['cores']} cores available: "
                        f"threads will time-share")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > machine["cores"]:
        warnings.append(f"load average {load:.1f} on {machine['cores']} cores: other work "
                        f"competes for the CPU, absolute latencies will be inflated")

    configs = [(t, b) for t in threads for b in batch]
    samples = {(n, t, b): [] for n in names for t, b in configs}
    aggregate = {(n, t, b): [0, 0] for n in names for t, b in configs}  # [inferences, window ns]
    errors: dict[tuple, str] = {}
    timeline: list[dict] = []
    workers: dict[str, list[Worker]] = {}
    extra = {} if worker_entry is None else {"entry": worker_entry}
    bar = tqdm(total=rounds * len(configs) * len(names), desc="bench", unit="seg",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for name, path in zip(names, paths):
            if name in plans:
                target = target_of[name]
                given = None if target == Target() else (target.runtime, target.ep)
                workers[name] = [Worker(path, optimization_level, budget=timeout, target=given, **extra)
                                 for _ in range(instances)]
        for name, group in workers.items():
            try:
                for worker in group:
                    worker.wait_ready()
                    for b, feeds in plans[name].items():
                        worker.send(("feeds", b, feeds))
            except WorkerFailure as e:
                load_errors[name] = str(e)
        for r in range(rounds):
            for t, b in configs:
                for name in names:
                    bar.update()
                    if name in load_errors or (name, t, b) in errors:
                        continue
                    bar.set_postfix_str(f"round {r + 1}/{rounds} {name} T{t} B{b}", refresh=False)
                    group = workers[name]
                    try:
                        replies = _measure_together(group, ("measure", t, b, warmup, runs), together=instances > 1)
                    except WorkerFailure as e:
                        if any(w.dead for w in group):  # nothing more can run in this worker
                            load_errors[name] = str(e)
                        else:
                            errors[(name, t, b)] = str(e)
                        continue
                    ms = np.concatenate([reply[1] for reply in replies]) / 1e6
                    samples[(name, t, b)].append(ms)
                    entry = {"round": r, "model": name, "threads": t, "batch": b, "runs": runs,
                             "wall_ms": max(reply[2] for reply in replies) / 1e6,
                             "sum_ms": float(max(reply[1].sum() for reply in replies)) / 1e6,
                             "session_load_s": max(reply[4] for reply in replies)}
                    if instances > 1:
                        done, window_ns = _concurrent_window(replies)
                        aggregate[(name, t, b)][0] += done
                        aggregate[(name, t, b)][1] += window_ns
                        entry.update(instances=instances, window_ms=window_ns / 1e6, window_runs=done)
                    timeline.append(entry)
    finally:
        bar.close()
        for group in workers.values():
            for worker in group:
                worker.stop()

    rows = []
    for t, b in configs:
        base = names[0]
        base_ok = base not in load_errors and (base, t, b) not in errors
        for name in names:
            row = {"model": name, "threads": t, "batch": b, **dict.fromkeys(_STAT_KEYS),
                   "speedup": None, "speedup_ci": None,
                   "peak_rss_mb": _peak_rss(workers.get(name)),
                   **target_of[name].stamp(), "instances": instances,
                   "error": errors.get((name, t, b), load_errors.get(name)), "samples_ms": None}
            if row["error"] is None:
                per_round = samples[(name, t, b)]
                pooled = np.concatenate(per_round)
                row.update(summarize(pooled, b))
                done, window_ns = aggregate[(name, t, b)]
                if instances > 1 and window_ns > 0:
                    row["throughput_ips"] = b * done / (window_ns / 1e9)
                row["samples_ms"] = pooled.tolist()
                if base_ok:
                    base_rounds = samples[(base, t, b)]
                    base_p50 = float(np.median(np.concatenate(base_rounds)))
                    row["speedup"] = base_p50 / row["p50_ms"]
                    row["speedup_ci"] = ((1.0, 1.0) if name == base else
                                         speedup_interval(base_rounds, per_round, seed=seed))
            rows.append({k: row[k] for k in ROW_KEYS})
        if not base_ok and len(names) > 1:
            warnings.append(f"threads={t}, batch={b}: no speedups, the first model ({base}) "
                            f"failed")
    warnings += cv_warnings(rows, CV_WARN)
    for w in warnings:
        print(f"deployopt: warning: {w}", file=sys.stderr)

    inputs = (f"dataset {data.name}" if data is not None else f"random (seed {seed})")
    settings = {"warmup": warmup, "runs": runs, "rounds": rounds, "seed": seed,
                "inputs": inputs, "timeout_s": timeout, "instances": instances,
                "shapes": {k: list(v) for k, v in shapes.items()}}
    return BenchResult(rows=rows, machine=machine,
                       session_options=recorded_options(targets[0], threads, optimization_level),
                       warnings=warnings, settings=settings,
                       models=[{"label": n, "path": p} for n, p in zip(names, paths)],
                       timeline=timeline)


def _measure_together(group: list[Worker], message, *, together: bool = False) -> list:
    """Send ``message`` to every worker of a model, then collect every answer (the workers run it
    at the same time); WorkerFailure from the first that fails, after all have answered or died.

    ``together``: the warm-up (and any session load) runs first on all workers, then the timed
    runs start on all of them at one clock reading, so that they overlap from the first run.
    """
    if not together:
        return _ask_all(group, message)
    kind, threads, key, warmup, runs = message
    first = _ask_all(group, (kind, threads, key, warmup, 1))
    replies = _ask_all(group, (kind, threads, key, 0, runs, time.perf_counter_ns() + START_MARGIN_NS))
    return [(*reply[:4], ready[4], *reply[5:]) for reply, ready in zip(replies, first)]  # with the load time


def _ask_all(group: list[Worker], message) -> list:
    for worker in group:
        worker.send(message)
    replies, failure = [], None
    for worker in group:
        try:
            replies.append(worker.answer())
        except WorkerFailure as e:
            failure = failure or e
    if failure is not None:
        raise failure
    return replies


def _concurrent_window(replies) -> tuple[int, int]:
    """(runs that ended inside the window where every instance was timing, window length in ns).

    A run's end is its worker's start plus the cumulated samples, stretched to the segment's wall
    time (which also holds the loop's own clock reads).
    """
    ends = []
    for reply in replies:
        ns, wall_ns, start = reply[1], reply[2], reply[5]
        scale = wall_ns / ns.sum() if ns.sum() > 0 else 1.0
        ends.append(start + np.cumsum(ns) * scale)
    low = max(reply[5] for reply in replies)
    high = min(float(e[-1]) for e in ends)
    if high <= low:  # no common window: the instances did not overlap at all
        return 0, 0
    done = sum(int(np.count_nonzero((e > low) & (e <= high))) for e in ends)
    return done, int(high - low)


def _peak_rss(group: list[Worker] | None) -> float | None:
    """The largest peak RSS of a model's workers (each instance is its own process)."""
    values = [w.peak_rss_mb for w in group or [] if w.peak_rss_mb is not None]
    return max(values) if values else None
