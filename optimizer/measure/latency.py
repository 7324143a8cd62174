"""Side-by-side latency of ONNX models on onnxruntime CPU, with ratios that survive a noisy host.

Method
  * Each model runs in its own worker process (``deployopt.measure.worker``): one session per thread
    count, ``warmup`` untimed runs before every measured segment of ``runs`` timed runs.
  * Rounds interleave the models: for each round, for each (threads, batch), A then B then ...
    Slow drift of the host (other jobs, turbo, thermal) then hits every model alike, so the
    ratio of two models is far more stable than either absolute number.
  * Per row: percentiles p50/p90/p95/p99 of all ``rounds x runs`` samples (linear
    interpolation), mean, std, min, CV = std / mean, throughput = batch * 1000 / mean_ms.
  * speedup = p50(first model) / p50(this model) at the same (threads, batch). Its 95% interval
    is a two-level bootstrap: resample the rounds with replacement, and within each drawn round
    resample its runs; the statistic is the geometric mean of the per-round p50 ratios, and the
    interval is its 2.5 / 97.5 percentiles (fixed seed, so the same samples give the same
    interval). Round-to-round drift is what makes single-run ratios lie, hence resampling rounds;
    resampling runs keeps a one-round interval from collapsing to a point.
  * A CV above 10% is reported as a warning (in the result and on stderr).
Session settings (recorded in every result): intra-op threads as given, inter-op 1,
ORT_SEQUENTIAL, graph optimization ORT_ENABLE_ALL unless told otherwise.
``deployopt bench --profile`` then profiles each model per node (``deployopt.measure.profile``) at the
first thread count and batch size and prints its most expensive nodes and op types.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import sys
import zlib
from collections.abc import Sequence

import numpy as np

from deployopt.measure import machine as machine_mod
from deployopt.measure.model_io import (OPT_LEVELS, TensorSpec, fits_sample, format_shape, input_specs,
                               load_proto, one_line, open_data, parse_shape, recorded_options)
from deployopt.measure.worker import Worker, WorkerFailure
from deployopt.core.errors import UserError, WorkFailed

CV_WARN = 0.10
#: The keys report.json's ``benchmark`` rows carry (DESIGN.md).
REPORT_KEYS = ("model", "threads", "batch", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms",
               "throughput_ips", "speedup")
#: All keys of a row, in table order.
ROW_KEYS = ("model", "threads", "batch", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms",
            "std_ms", "min_ms", "cv", "throughput_ips", "speedup", "speedup_ci", "peak_rss_mb",
            "error", "samples_ms")
_STAT_KEYS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "cv",
              "throughput_ips")


# -- statistics ---------------------------------------------------------------------------------

def summarize(samples_ms, batch: int = 1) -> dict:
    """Latency statistics of per-run samples (ms): percentiles, mean, std, min, CV, throughput."""
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("summarize: no samples")
    p50, p90, p95, p99 = np.percentile(x, [50, 90, 95, 99])
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return {
        "p50_ms": float(p50), "p90_ms": float(p90), "p95_ms": float(p95), "p99_ms": float(p99),
        "mean_ms": mean, "std_ms": std, "min_ms": float(x.min()),
        "cv": std / mean if mean > 0 else 0.0,
        "throughput_ips": batch * 1000.0 / mean if mean > 0 else math.inf,
    }


def speedup_interval(base_rounds: Sequence, other_rounds: Sequence, *, level: float = 0.95,
                     n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of p50(base) / p50(other) from per-round sample arrays (see module doc).

    Round r of ``base_rounds`` is paired with round r of ``other_rounds`` (they ran back to back).
    """
    rounds = min(len(base_rounds), len(other_rounds))
    if rounds == 0:
        raise ValueError("speedup_interval: no rounds")
    rng = np.random.default_rng(seed)
    log_ratio = np.empty((rounds, n_boot))
    for r in range(rounds):
        a = np.asarray(base_rounds[r], dtype=np.float64)
        b = np.asarray(other_rounds[r], dtype=np.float64)
        p50_a = np.median(a[rng.integers(0, a.size, (n_boot, a.size))], axis=1)
        p50_b = np.median(b[rng.integers(0, b.size, (n_boot, b.size))], axis=1)
        log_ratio[r] = np.log(p50_a) - np.log(p50_b)
    picked = rng.integers(0, rounds, (n_boot, rounds))
    stat = np.exp(log_ratio[picked, np.arange(n_boot)[:, None]].mean(axis=1))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(stat, [tail, 100 - tail])
    return float(low), float(high)


def cv_warnings(rows: list[dict], limit: float = CV_WARN) -> list[str]:
    return [f"{r['model']} (threads={r['threads']}, batch={r['batch']}): CV {r['cv']:.0%} > "
            f"{limit:.0%}, timings are noisy; trust ratios over absolute ms, or add --rounds"
            for r in rows if r.get("error") is None and r["cv"] > limit]


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
    #: runs, wall_ms, sum_ms}; wall_ms - sum_ms is the timing loop's own cost.
    timeline: list[dict] = dataclasses.field(default_factory=list)

    def to_dict(self, *, samples: bool = False) -> dict:
        rows = [dict(r) if samples else {k: v for k, v in r.items() if k != "samples_ms"}
                for r in self.rows]
        for r in rows:
            if r.get("speedup_ci") is not None:
                r["speedup_ci"] = list(r["speedup_ci"])
        return {"machine": self.machine, "session_options": self.session_options,
                "settings": self.settings, "models": self.models, "rows": rows,
                "warnings": list(self.warnings)}

    def to_json(self, *, samples: bool = False, indent: int = 2) -> str:
        return json.dumps(self.to_dict(samples=samples), indent=indent) + "\n"

    def to_csv(self) -> str:
        keys = [k for k in ROW_KEYS if k not in ("samples_ms", "speedup_ci")]
        keys[keys.index("speedup") + 1:keys.index("speedup") + 1] = ["speedup_ci_low",
                                                                    "speedup_ci_high"]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            ci = r.get("speedup_ci") or (None, None)
            row = {k: r.get(k) for k in keys if k in r}
            row.update(speedup_ci_low=ci[0], speedup_ci_high=ci[1])
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return out.getvalue()

    def _table(self) -> tuple[list[str], list[list[str]]]:
        header = ["model", "threads", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms",
                  "img/s", "speedup [95% CI]", "peak RSS MB"]
        body = []
        for r in self.rows:
            rss = "" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"
            if r["error"] is not None:
                body.append([r["model"], str(r["threads"]), str(r["batch"]),
                             f"FAILED: {r['error']}", "", "", "", "", "", rss])
                continue
            speed = "—" if r["speedup"] is None else (
                f"{_ratio(r['speedup'])}x [{_ratio(r['speedup_ci'][0])}, "
                f"{_ratio(r['speedup_ci'][1])}]")
            body.append([r["model"], str(r["threads"]), str(r["batch"]), _ms(r["p50_ms"]),
                         _ms(r["p90_ms"]), _ms(r["p99_ms"]),
                         f"{_ms(r['mean_ms'])} ± {_ms(r['std_ms'])}",
                         f"{r['throughput_ips']:.1f}", speed, rss])
        return header, body

    def _footer(self) -> list[str]:
        s, o = self.settings, self.session_options
        return [
            f"machine: {machine_mod.stamp_line(self.machine)}",
            f"session: intra-op threads as listed, inter-op {o['inter_op_num_threads']}, "
            f"{o['execution_mode']}, {o['graph_optimization_level']}",
            f"method: {s.get('rounds')} interleaved rounds x {s.get('runs')} runs after "
            f"{s.get('warmup')} warm-up runs per segment; inputs: {s.get('inputs')}; "
            f"speedup = p50(first) / p50(model), 95% bootstrap CI over rounds",
        ]

    def to_text(self) -> str:
        header, body = self._table()
        ok = [row for row in [header, *body] if not row[3].startswith("FAILED")]
        widths = [max(len(row[i]) for row in (ok if i >= 3 else [header, *body]))
                  for i in range(len(header))]
        lines = []
        for row in [header, *body]:
            if row[3].startswith("FAILED"):  # a failure reason spans the number columns
                head = "  ".join(c.ljust(w) for c, w in zip(row[:3], widths[:3]))
                lines.append(f"{head}  {row[3]}")
                continue
            lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        lines.insert(1, "-" * sum(widths + [2 * (len(widths) - 1)]))
        return "\n".join([*lines, "", *self._footer()]) + "\n"

    def to_markdown(self) -> str:
        header, body = self._table()
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        notes = [f"- {line}" for line in self._footer()]
        notes += [f"- warning: {w}" for w in self.warnings]
        return "\n".join([*lines, "", *notes]) + "\n"


def _ms(value: float) -> str:
    return f"{value:.4g}"


def _ratio(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


# -- inputs -------------------------------------------------------------------------------------

def check_settings(*, threads, batch, warmup, runs, rounds, timeout=None, prefix: str = "") -> None:
    """UserError naming the setting (``prefix`` '--' for CLI flags) when a value is out of range."""
    for name, values in (("threads", threads), ("batch", batch)):
        if len(values) == 0:
            raise UserError(f"{prefix}{name}: no values given")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise UserError(f"{prefix}{name}: {v!r} is not an integer >= 1")
    for name, v, low in (("warmup", warmup, 0), ("runs", runs, 1), ("rounds", rounds, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise UserError(f"{prefix}{name}: {v!r} is not an integer >= {low}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise UserError(f"{prefix}timeout: {timeout!r} is not a number of seconds > 0")


def resolve_shape(spec: TensorSpec, path, batch: int, shapes: dict,
                  sample_shape: tuple | None = None) -> tuple[int, ...]:
    """The concrete shape to feed ``spec`` at ``batch``.

    Sources, in order: ``--shape NAME=...`` (the full shape), else the dataset's sample shape
    (batch dim + sample), else the model's own dims. A dynamic first dimension then takes
    ``batch``; any other dimension still not a number is an error naming the input.
    """
    where = f"{path}: input '{spec.name}'"
    model_dims = spec.dims
    given = shapes.get(spec.name)
    if given is None and sample_shape is not None:
        given = (batch, *sample_shape)
    if model_dims is None:  # rank unknown: only an explicit shape can say what to feed
        if given is None:
            raise UserError(f"{where} has an unknown shape; pass --shape {spec.name}=1x3x224x224")
        model_dims = (None,) * len(given)
    if given is not None:
        if len(given) != len(model_dims):
            raise UserError(f"{where} has rank {len(model_dims)} ({spec.shape_text()}) but "
                            f"{format_shape(given)} was given")
        for i, (want, got) in enumerate(zip(model_dims, given)):
            if isinstance(want, int) and want != got and not (i == 0 and spec.dynamic_batch):
                raise UserError(f"{where} has shape {spec.shape_text()} but "
                                f"{format_shape(given)} was given (dim {i} must be {want})")
        dims = list(given)
    else:
        dims = list(model_dims)
    if dims:
        if isinstance(model_dims[0], int):
            if model_dims[0] != batch:
                raise UserError(f"{where} has a fixed batch dimension of {model_dims[0]}, so "
                                f"batch {batch} cannot run (use --batch {model_dims[0]} or "
                                f"export with a dynamic batch)")
        dims[0] = batch
    unresolved = [f"{i}: {d or '?'}" for i, d in enumerate(dims) if not isinstance(d, int)]
    if unresolved:
        example = format_shape([d if isinstance(d, int) else 224 for d in dims])
        raise UserError(f"{where} has unresolved dynamic dims ({', '.join(unresolved)}) in "
                        f"{spec.shape_text()}; pass --shape {spec.name}={example}")
    return tuple(int(d) for d in dims)


def random_input(name: str, shape: tuple, dtype: np.dtype, seed: int) -> np.ndarray:
    """Deterministic input for (name, shape, dtype): every model with that input gets the same."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if dtype.kind == "f":
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if dtype.kind in "iu":
        # Small non-negative values: integer inputs are usually indices or token ids.
        return rng.integers(0, 8, shape).astype(dtype)
    raise UserError(f"input '{name}': element type {dtype} cannot be generated; "
                    f"pass --data with real samples")


def _data_batch(data, batch: int) -> np.ndarray:
    """The first ``batch`` samples of ``data`` (repeated when the set is smaller)."""
    parts, have = [], 0
    for x, _ in data.batches(batch):
        parts.append(np.asarray(x))
        have += len(x)
        if have >= batch:
            break
    if have == 0:
        raise UserError(f"--data {data.name}: the dataset is empty")
    x = np.concatenate(parts)
    return np.resize(x, (batch, *x.shape[1:])) if have < batch else x[:batch]


def _plan(path, specs: list[TensorSpec], batches, shapes, data, seed) -> dict[int, dict]:
    """{batch: {input name: array}} for one model; UserError on anything that cannot run."""
    if data is not None and len(specs) != 1:
        raise UserError(f"--data {data.name}: {path} has {len(specs)} inputs "
                        f"({', '.join(s.name for s in specs)}); a dataset feeds exactly one")
    feeds = {}
    for b in batches:
        feeds[b] = {}
        for spec in specs:
            if spec.dtype is None or spec.dtype.kind not in "fbiu":
                raise UserError(f"{path}: input '{spec.name}' has an element type the benchmark "
                                f"cannot feed")
            if data is not None:
                sample = tuple(data.sample_shape)
                if not fits_sample(spec, sample):
                    raise UserError(f"--data {data.name}: samples of shape "
                                    f"{format_shape(sample)} do not match {path} input "
                                    f"'{spec.name}' ({spec.shape_text()})")
                resolve_shape(spec, path, b, {}, sample)  # the batch dimension must fit too
                if spec.dtype.kind != "f":
                    raise UserError(f"--data {data.name}: float samples cannot feed {path} "
                                    f"input '{spec.name}' of type {spec.dtype}")
                feeds[b][spec.name] = _data_batch(data, b).astype(spec.dtype, copy=False)
            else:
                shape = resolve_shape(spec, path, b, shapes)
                feeds[b][spec.name] = random_input(spec.name, shape, spec.dtype, seed)
    return feeds


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
            optimization_level: str = "all", _entry=None) -> BenchResult:
    """Benchmark ``paths`` side by side (see module doc); speedups are vs ``paths[0]``.

    A model that cannot be loaded, crashes its worker or exceeds ``timeout`` seconds (its total
    time answering, after its interpreter started) gets rows with ``error`` set; the others
    complete. Bad settings, unresolvable input shapes and ``data`` that does not fit raise
    UserError before anything runs. ``_entry`` replaces the worker's main loop (tests only).
    """
    from tqdm import tqdm

    threads, batch = tuple(threads), tuple(batch)
    check_settings(threads=threads, batch=batch, warmup=warmup, runs=runs, rounds=rounds,
                   timeout=timeout)
    if optimization_level not in OPT_LEVELS:
        raise UserError(f"optimization_level: {optimization_level!r} is not one of "
                        f"{', '.join(OPT_LEVELS)}")
    if not paths:
        raise UserError("bench: no models given")
    paths = [str(p) for p in paths]
    names = _labels(paths, labels)
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
        plans[name] = _plan(path, specs, batch, shapes, data, seed)
    unknown = sorted(set(shapes) - known_inputs)
    if unknown and plans:
        raise UserError(f"--shape {unknown[0]}: no model has an input named {unknown[0]!r} "
                        f"(inputs: {', '.join(sorted(known_inputs))})")

    warnings: list[str] = []
    machine = machine_mod.stamp()
    if max(threads) > machine["cores"]:
        warnings.append(f"threads={max(threads)} exceeds the {machine['cores']} cores available: "
                        f"threads will time-share")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > machine["cores"]:
        warnings.append(f"load average {load:.1f} on {machine['cores']} cores: other work "
                        f"competes for the CPU, absolute latencies will be inflated")

    configs = [(t, b) for t in threads for b in batch]
    samples = {(n, t, b): [] for n in names for t, b in configs}
    errors: dict[tuple, str] = {}
    timeline: list[dict] = []
    workers: dict[str, Worker] = {}
    extra = {} if _entry is None else {"entry": _entry}
    bar = tqdm(total=rounds * len(configs) * len(names), desc="bench", unit="seg",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for name, path in zip(names, paths):
            if name in plans:
                workers[name] = Worker(path, optimization_level, budget=timeout, **extra)
        for name, worker in workers.items():
            try:
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
                    worker = workers[name]
                    try:
                        reply = worker.request(("measure", t, b, warmup, runs))
                    except WorkerFailure as e:
                        if worker.dead:  # nothing more can run in this worker
                            load_errors[name] = str(e)
                        else:
                            errors[(name, t, b)] = str(e)
                        continue
                    _, ns, wall_ns, _, load_s = reply
                    ms = ns / 1e6
                    samples[(name, t, b)].append(ms)
                    timeline.append({"round": r, "model": name, "threads": t, "batch": b,
                                     "runs": runs, "wall_ms": wall_ns / 1e6,
                                     "sum_ms": float(ms.sum()), "session_load_s": load_s})
    finally:
        bar.close()
        for worker in workers.values():
            worker.stop()

    rows = []
    for t, b in configs:
        base = names[0]
        base_ok = base not in load_errors and (base, t, b) not in errors
        for name in names:
            row = {"model": name, "threads": t, "batch": b, **dict.fromkeys(_STAT_KEYS),
                   "speedup": None, "speedup_ci": None,
                   "peak_rss_mb": workers[name].peak_rss_mb if name in workers else None,
                   "error": errors.get((name, t, b), load_errors.get(name)), "samples_ms": None}
            if row["error"] is None:
                per_round = samples[(name, t, b)]
                pooled = np.concatenate(per_round)
                row.update(summarize(pooled, b))
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
                "inputs": inputs, "timeout_s": timeout,
                "shapes": {k: list(v) for k, v in shapes.items()}}
    return BenchResult(rows=rows, machine=machine,
                       session_options=recorded_options(threads, optimization_level),
                       warnings=warnings, settings=settings,
                       models=[{"label": n, "path": p} for n, p in zip(names, paths)],
                       timeline=timeline)


def plot(result: BenchResult, path: str | os.PathLike, *,
         accuracy: dict[str, float] | None = None) -> None:
    """PNG of per-run latency per model; with ``accuracy`` ({label: top-1}) also latency vs
    accuracy. Written atomically."""
    from deployopt.measure.output import plot_latency

    plot_latency(result.rows, path, accuracy)


# -- CLI ----------------------------------------------------------------------------------------

def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a comma-separated list of integers") from None
    return values


def _int(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not an integer") from None


def _shape_args(items: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        if not sep or not name:
            raise UserError(f"--shape: {item!r} is not NAME=1x3x224x224")
        shapes[name] = parse_shape(dims, f"--shape {name}")
    return shapes


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="side-by-side latency on onnxruntime CPU",
        description="Latency of one or more ONNX models on onnxruntime CPU, measured in "
                    "interleaved rounds in one worker process per model; speedups are vs the "
                    "first model, with a 95% bootstrap interval.")
    p.add_argument("models", nargs="+", metavar="MODEL.onnx")
    # Numbers are parsed in the handler so that bad values give one-line errors (exit 2).
    p.add_argument("--threads", default="1", help="intra-op thread counts, e.g. 1,2 (default 1)")
    p.add_argument("--batch", default="1",
                   help="batch sizes, e.g. 1,8 (values > 1 need a dynamic batch dimension)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=1x3x224x224",
                   help="concrete shape for an input with dynamic dims (repeatable)")
    p.add_argument("--runs", default="100", help="timed runs per round (default 100)")
    p.add_argument("--rounds", default="3", help="interleaved rounds (default 3)")
    p.add_argument("--warmup", default="10",
                   help="untimed runs before each measured segment (default 10)")
    p.add_argument("--timeout", default=None, metavar="S",
                   help="seconds each model's worker may take in total before it is killed")
    p.add_argument("--seed", default="0", help="seed of the random inputs (default 0)")
    p.add_argument("--opt-level", default="all", choices=tuple(OPT_LEVELS),
                   help="onnxruntime graph optimization level (default all)")
    p.add_argument("--data", metavar="SPEC", help="feed real samples from a dataset spec "
                   "(digits, mnist, imagenet-samples, photos, folder:PATH, npy:PATH, npz:PATH)")
    p.add_argument("--labels", help="comma-separated display names, one per model")
    p.add_argument("--json", metavar="F", help="write results as JSON")
    p.add_argument("--csv", metavar="F", help="write rows as CSV")
    p.add_argument("--markdown", metavar="F", help="write the table as Markdown")
    p.add_argument("--plot", metavar="F.png", help="write the latency distribution plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--profile", action="store_true",
                   help="after the latency table, profile each model per node with onnxruntime's "
                        "profiler (first --threads and --batch value) and print its most "
                        "expensive nodes and op types")
    p.add_argument("--top", default=None, metavar="N",
                   help="with --profile: how many nodes and op types to print (default 10)")
    p.set_defaults(func=run_bench)
    return p


def _profiles(result: BenchResult, args, threads: int, batch: int, top: int, runs: int,
              warmup: int, shapes: dict, data, seed: int, timeout) -> tuple[list, list[str]]:
    """``bench --profile``: profile every model whose latency row at (threads, batch) succeeded,
    print each profile's top nodes and op types; return (profiles, one-line failures)."""
    from deployopt.measure.profile import profile_model

    ok = {r["model"] for r in result.rows
          if r["threads"] == threads and r["batch"] == batch and r["error"] is None}
    profiles, errors = [], []
    for model in result.models:
        if model["label"] not in ok:
            continue  # its latency row already says why it failed
        try:
            prof = profile_model(model["path"], threads=threads, batch=batch, runs=runs,
                                 warmup=warmup, shapes=shapes, seed=seed, data=data,
                                 optimization_level=args.opt_level, timeout=timeout,
                                 label=model["label"])
        except WorkFailed as e:
            errors.append(f"{model['label']}: {one_line(e)}")
            print(f"\nprofile of {model['label']}: FAILED: {one_line(e)}")
            continue
        profiles.append(prof)
        sys.stdout.write("\n" + prof.to_text(top))
    return profiles, errors


def run_bench(args) -> int:
    threads = _int_list("--threads", args.threads)
    batch = _int_list("--batch", args.batch)
    runs, rounds = _int("--runs", args.runs), _int("--rounds", args.rounds)
    warmup, seed = _int("--warmup", args.warmup), _int("--seed", args.seed)
    timeout = None
    if args.timeout is not None:
        try:
            timeout = float(args.timeout)
        except ValueError:
            raise UserError(f"--timeout: {args.timeout!r} is not a number of seconds") from None
    check_settings(threads=threads, batch=batch, warmup=warmup, runs=runs, rounds=rounds,
                   timeout=timeout, prefix="--")
    shapes = _shape_args(args.shape)
    labels = args.labels.split(",") if args.labels else None
    profile = getattr(args, "profile", False)
    top_text = getattr(args, "top", None)
    if top_text is not None and not profile:
        raise UserError("--top: only used with --profile")
    top = _int("--top", top_text) if top_text is not None else 10
    if top < 1:
        raise UserError(f"--top: {top} is not an integer >= 1")
    from deployopt.measure.output import check_writable, plot_latency, write_text

    outputs = {flag: check_writable(path, flag) for flag, path in
               (("--json", args.json), ("--csv", args.csv), ("--markdown", args.markdown),
                ("--plot", args.plot)) if path}
    if "--plot" in outputs and outputs["--plot"].suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UserError(f"--plot {outputs['--plot']}: use a .png (or .svg, .pdf) file name")
    # On the command line a file that is not a model is bad input (exit 2), not a failure row.
    specs = [input_specs(load_proto(path)) for path in args.models]
    data = open_data(args.data, specs[0], shapes) if args.data else None
    result = compare(args.models, labels=labels, threads=threads, batch=batch, warmup=warmup,
                     runs=runs, rounds=rounds, shapes=shapes, data=data, seed=seed,
                     timeout=timeout, progress=not args.no_progress,
                     optimization_level=args.opt_level)
    sys.stdout.write(result.to_text())
    profiles, profile_errors = (_profiles(result, args, threads[0], batch[0], top, runs, warmup,
                                          shapes, data, seed, timeout) if profile else ([], []))
    if "--json" in outputs:
        payload = result.to_dict()
        if profile:
            payload["profiles"] = [p.to_dict() for p in profiles]
        write_text(outputs["--json"], json.dumps(payload, indent=2) + "\n")
    if "--csv" in outputs:
        write_text(outputs["--csv"], result.to_csv())
    if "--markdown" in outputs:
        write_text(outputs["--markdown"], "\n".join([result.to_markdown(),
                                                     *(p.to_markdown(top) for p in profiles)]))
    if "--plot" in outputs:
        plot_latency(result.rows, outputs["--plot"])
    if profile_errors:
        raise WorkFailed(f"{len(profile_errors)} of {len(result.models)} profiles failed; "
                         f"{profile_errors[0]}")
    failed = [r for r in result.rows if r["error"] is not None]
    if failed:
        first = failed[0]
        raise WorkFailed(f"{len(failed)} of {len(result.rows)} benchmark rows failed; "
                         f"{first['model']} (threads={first['threads']}, "
                         f"batch={first['batch']}): {one_line(first['error'])}")
    return 0
