"""Run a sweep: every trial an optimize run into DIR/trials/NNN, the candidates benchmarked on
each target, then DIR/sweep.json, sweep.md, pareto.png and DIR/best/ (best/<target>/ with targets).

The driver keeps ``workers`` trials in flight: it asks the search for the next trial whenever one
finishes (so TPE learns from every result as it comes), submits each finished candidate's
target benchmarks, and writes the outputs once everything has finished. A trial's own failure
(a pass that fails, a crashed worker) is a row of the table; a sweep whose every trial is bad
input (exit 2) is bad input itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import deployopt
from deployopt.core import io
from deployopt.core.errors import UserError
from deployopt.pipeline import prepare_out_dir
from deployopt.sweeps import results
from deployopt.sweeps.search import Proposer
from deployopt.sweeps.spec import SweepSpec, Target, Trial, build_trial_recipe, load_sweep, trial_mapping


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


#: Written into a sweep's folder when it starts: its trials/ and best/ are a sweep's to replace.
SWEEP_MARK = ".deployopt-sweep"


def _prepare(out_dir: pathlib.Path) -> pathlib.Path:
    """The output folder, created; an earlier sweep's trials/ and best/ in it are removed (its
    cache/ is kept: that is what a rerun reuses). A trials/ or best/ that no sweep wrote (no
    ``SWEEP_MARK``, no sweep.json beside it) is the user's: refused, never deleted."""
    stale = [out_dir / name for name in ("trials", "best") if (out_dir / name).exists()]
    if stale and not ((out_dir / SWEEP_MARK).exists() or (out_dir / "sweep.json").exists()):
        raise UserError(f"{stale[0]}: exists and no earlier sweep wrote it; choose a new or empty output folder")
    prepare_out_dir(out_dir)
    (out_dir / SWEEP_MARK).touch()
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return out_dir.resolve()


def _engine(spec: SweepSpec, out_dir: pathlib.Path):
    from deployopt.sweeps import engines

    if spec.engine == "ray":
        engine = engines.RayEngine(spec.workers, spec.address)
        try:
            engine.check_targets(spec.targets)
        except UserError:
            engine.close()
            raise
        return engine
    return engines.LocalEngine(spec.workers, out_dir)


def _objective(row: dict[str, Any]) -> float | None:
    """What random / TPE search maximises (see ``deployopt.sweeps.search``)."""
    if row["p50_ms"] is None:
        return None
    miss = row["gate_miss"] if row["gate_miss"] is not None else 1000.0
    return -row["p50_ms"] * (1.0 + miss)


def _target_task(spec: SweepSpec, trial: Trial, target: Target, out_dir: pathlib.Path) -> dict[str, Any]:
    """The target benchmark of a finished trial: its input and output model as bytes, the
    target's threads and batch (default: the recipe's) and the recipe's benchmark settings."""
    folder = out_dir / "trials" / trial.name
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    recipe = build_trial_recipe(spec, trial.model, trial.settings)
    bench = recipe.benchmark
    return {"input": pathlib.Path(report["input"]["path"]).read_bytes(), "output": (folder / "model.onnx").read_bytes(),
            "threads": list(target.threads or bench.threads), "batch": list(target.batch or bench.batch),
            "warmup": bench.warmup, "runs": bench.runs, "rounds": bench.rounds, "timeout": bench.timeout,
            "seed": recipe.seed, "shapes": {k: tuple(v) for k, v in recipe.shapes.items()}}


def run_sweep(source: str | os.PathLike | dict[str, Any], out_dir: str | os.PathLike | None = None, *,
              engine: str | None = None, workers: int | None = None, address: str | None = None,
              cache: bool = True) -> results.SweepResult:
    """Run the sweep file (or mapping) ``source`` into ``out_dir`` (see the module doc)."""
    started = time.time()
    spec = load_sweep(source, engine=engine, workers=workers, address=address)
    default = pathlib.Path("runs") / (spec.path.stem if spec.path else "sweep")
    out = pathlib.Path(out_dir) if out_dir is not None else default
    runner = _engine(spec, out.resolve())  # a cluster that cannot run the sweep is refused first
    try:
        out = _prepare(out)
    except UserError:
        runner.close()
        raise
    cache_dir = out / "cache" if cache else None
    base_path = str(spec.base_path.resolve()) if spec.base_path else None
    proposer = Proposer(spec)
    rows: dict[int, dict[str, Any]] = {}
    trials: dict[int, Trial] = {}
    in_flight: dict[Any, tuple] = {}
    target_names = [t.name for t in spec.targets] or [results.LOCAL]
    try:
        while True:
            while sum(1 for kind in in_flight.values() if kind[0] == "trial") < spec.workers:
                trial = proposer.ask()
                if trial is None:
                    break
                trials[trial.index] = trial
                task = {"recipe": trial_mapping(spec, trial.model, trial.settings), "base_path": base_path,
                        "out_dir": str(out / "trials" / trial.name), "cache": str(cache_dir) if cache_dir else None}
                in_flight[runner.submit_trial(task)] = ("trial", trial)
                _log(f"sweep: trial {trial.name} started: {trial.model_label} {json.dumps(trial.settings)}")
            if not in_flight:
                break
            handle, outcome = runner.wait(list(in_flight))
            kind = in_flight.pop(handle)
            if kind[0] == "trial":
                trial = kind[1]
                row = results.summarize(trial, trial.settings, outcome, out)
                rows[trial.index] = row
                proposer.tell(trial, _objective(row))
                _log(f"sweep: trial {trial.name} {row['status']} (exit {row['exit_code']}"
                     + (f", speedup {row['speedup']:.2f}" if row["speedup"] else "")
                     + (f", {row['reason']}" if row["reason"] else "") + ")")
                if not spec.targets:
                    results.local_target(row)
                elif row["status"] in ("met", "missed"):
                    for target in spec.targets:
                        task = _target_task(spec, trial, target, out)
                        in_flight[runner.submit_target(target, task)] = ("target", trial, target)
                else:
                    for target in spec.targets:
                        results.add_target(row, target.name, {"error": "the trial produced no model"})
            else:
                _, trial, target = kind
                results.add_target(rows[trial.index], target.name, outcome)
                speed = rows[trial.index]["targets"][target.name]["speedup"]
                _log(f"sweep: trial {trial.name} on target {target.name}: "
                     + (f"speedup {speed:.2f}" if speed else f"not measured: {outcome.get('error')}"))
    finally:
        runner.close()
    ordered = [rows[i] for i in sorted(rows)]
    if ordered and all(r["status"] == "error" for r in ordered):
        raise UserError(f"trial {ordered[0]['trial']}: {ordered[0]['reason']}")
    return _publish(spec, out, ordered, target_names, cache_dir, time.time() - started)


def _publish(spec: SweepSpec, out: pathlib.Path, rows: list[dict[str, Any]], target_names: list[str],
             cache_dir: pathlib.Path | None, seconds: float) -> results.SweepResult:
    from deployopt.measure.machine import stamp

    best, closest, best_dirs = {}, {}, {}
    for name in target_names:
        winner, near = results.choose(rows, name)
        best[name] = winner and winner["trial"]
        closest[name] = near and near["trial"]
        best_dirs[name] = "best" if target_names == [results.LOCAL] else f"best/{name}"
        if winner is not None:
            results.publish_best(out, winner, out / best_dirs[name])
    missing = [name for name in target_names if best[name] is None]
    reason = None
    if missing:
        reason = "no trial meets the gates" + ("" if target_names == [results.LOCAL] else f" on {', '.join(missing)}")
        near = [closest[n] for n in missing if closest[n]]
        if near:
            reason += f"; closest: trial {near[0]}"
    for row in rows:
        row.pop("pass_failed", None)
        for entry in row["targets"].values():
            if isinstance(entry.get("gate_miss"), float) and math.isinf(entry["gate_miss"]):
                entry["gate_miss"] = None
    hits = sum(r["cache"]["hits"] for r in rows)
    misses = sum(r["cache"]["misses"] for r in rows)
    doc = {
        "version": deployopt.__version__, "machine": stamp(),
        "sweep": str(spec.path) if spec.path else "sweep", "base": str(spec.base_path) if spec.base_path else None,
        "models": spec.labels, "space": spec.space, "search": dataclasses.asdict(spec.search),
        "engine": spec.engine, "workers": spec.workers, "address": spec.address,
        "targets": target_names, "target_settings": [dataclasses.asdict(t) for t in spec.targets],
        "cache": {"enabled": cache_dir is not None, "folder": "cache" if cache_dir else None,
                  "hits": hits, "misses": misses},
        "seconds": round(seconds, 1), "trials": rows, "best": best, "closest": closest,
        "best_dirs": {n: d for n, d in best_dirs.items() if best[n] is not None},
        "exit_code": 1 if missing else 0, "reason": reason, "warnings": [],
    }
    io.atomic_write_text(out / "sweep.json", json.dumps(doc, indent=2, default=str) + "\n")
    io.atomic_write_text(out / "sweep.md", results.to_markdown(doc))
    results.plot_pareto(doc, out / "pareto.png")
    return results.SweepResult(out_dir=out, trials=rows, targets=target_names, best=best, closest=closest,
                               exit_code=doc["exit_code"], reason=reason, doc=doc)
