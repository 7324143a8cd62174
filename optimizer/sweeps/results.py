"""A sweep's results: one row per trial from its report.json, the best trial per target, and
sweep.json, sweep.md and the Pareto plot.

Per target, a trial *meets the gates* when its run finished, no pass missed its own tolerance and
every gate of its recipe holds, with ``min_speedup`` read from that target's benchmark. The best
trial of a target is the fastest that meets them: the lowest output p50 latency (ms) at the
target's first threads / batch setting; models differ, so latency, not the ratio to each model's
own input, decides (unmeasured trials rank last). When none meets them, the closest is the trial with the smallest gate miss:

    gate_miss = sum over missed gates of  (drop - limit)          for max_accuracy_drop
                                          (limit - speedup)/limit for min_speedup
                                          (size - limit)/limit    for max_size_mb

(an unmeasured gate, a failed pass or a failed run miss by infinity).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
from typing import Any

from deployopt.core import io

#: The implicit target of a sweep without ``targets``: the trial's own benchmark, on this machine.
LOCAL = "local"


def gate_miss(gates: list[dict[str, Any]], speedup: float | None = None) -> float:
    """How far a trial misses its gates (0 when it meets them); ``speedup`` replaces the
    report's min_speedup value (a target's own measurement)."""
    miss = 0.0
    for gate in gates:
        value, limit = gate["value"], gate["limit"]
        if gate["name"] == "min_speedup" and speedup is not None:
            value = speedup
        if value is None:
            return math.inf
        if gate["name"] == "max_accuracy_drop":
            miss += max(0.0, value - limit)
        elif gate["name"] == "min_speedup":
            miss += max(0.0, (limit - value) / limit)
        else:
            miss += max(0.0, (value - limit) / limit)
    return miss


def _output_row(rows: list[dict[str, Any]]) -> tuple[dict | None, dict | None]:
    """The output and input rows at the first threads/batch setting measured."""
    if not rows:
        return None, None
    first = (rows[0].get("threads"), rows[0].get("batch"))
    at = {r.get("model"): r for r in rows if (r.get("threads"), r.get("batch")) == first}
    return at.get("output"), at.get("input")


def summarize(trial, settings_out: dict[str, Any], outcome: dict[str, Any], out_dir: pathlib.Path) -> dict[str, Any]:
    """The sweep row of a finished trial, from its report.json (when the run wrote one)."""
    folder = out_dir / "trials" / trial.name
    row: dict[str, Any] = {
        "trial": trial.name, "dir": f"trials/{trial.name}", "model": trial.model_label,
        "settings": settings_out, "exit_code": outcome.get("exit_code", 1), "reason": outcome.get("error"),
        "status": "failed", "p50_ms": None, "input_p50_ms": None, "speedup": None, "metric": None,
        "metric_value": None, "drop": None, "score": None, "size_mb": None, "gate_miss": None, "gates": [],
        "cache": {"hits": outcome.get("cache_hits", 0), "misses": outcome.get("cache_misses", 0)},
        "seconds": round(outcome.get("seconds", 0.0), 2), "node": outcome.get("node"), "targets": {},
    }
    if outcome.get("exit_code") == 2:
        row["status"] = "error"
    report_path = folder / "report.json"
    if outcome.get("error") is None and report_path.is_file():
        doc = json.loads(report_path.read_text(encoding="utf-8"))
        out, inp = _output_row(doc.get("benchmark") or [])
        accuracy = doc.get("accuracy") or {}
        metric = accuracy.get("metric")
        output_acc = accuracy.get("output") or {}
        pass_failed = any(step.get("status") == "failed" for step in doc.get("steps") or [])
        row.update(exit_code=doc["exit_code"], reason=doc.get("reason"),
                   p50_ms=out and out.get("p50_ms"), input_p50_ms=inp and inp.get("p50_ms"),
                   speedup=out and out.get("speedup"), metric=metric,
                   metric_value=output_acc.get(metric) if metric in ("top1", "agreement", "cosine") else None,
                   drop=accuracy.get("drop"), score=output_acc.get("score"),
                   size_mb=(doc.get("output") or {}).get("bytes", 0) / 1e6, gates=doc.get("gates") or [],
                   pass_failed=pass_failed)
        miss = math.inf if pass_failed else gate_miss(row["gates"])
        row["gate_miss"] = None if math.isinf(miss) else miss
        row["status"] = "met" if doc["exit_code"] == 0 else "missed"
    return row


def add_target(row: dict[str, Any], target: str, result: dict[str, Any]) -> None:
    """A target benchmark's figures on the row, and whether the trial meets its gates there."""
    out, inp = _output_row(result.get("rows") or [])
    speedup = out and out.get("speedup")
    entry = {"p50_ms": out and out.get("p50_ms"), "input_p50_ms": inp and inp.get("p50_ms"),
             "speedup": speedup, "error": result.get("error"), "node": result.get("node"),
             "node_id": result.get("node_id")}
    if result.get("error") or row["status"] in ("failed", "error") or row.get("pass_failed"):
        miss = math.inf
    else:
        miss = gate_miss(row["gates"], speedup)
    entry["gate_miss"] = None if math.isinf(miss) else miss
    entry["met"] = miss == 0.0
    row["targets"][target] = entry


def local_target(row: dict[str, Any]) -> None:
    """Without ``targets``: the trial's own benchmark is the one target."""
    row["targets"][LOCAL] = {"p50_ms": row["p50_ms"], "input_p50_ms": row["input_p50_ms"], "speedup": row["speedup"],
                             "error": None, "node": row.get("node"), "gate_miss": row["gate_miss"],
                             "met": row["status"] == "met"}


def choose(rows: list[dict[str, Any]], target: str) -> tuple[dict | None, dict | None]:
    """(best, closest) of a target: the fastest that meets the gates, else the smallest miss."""
    met = [r for r in rows if r["targets"].get(target, {}).get("met")]
    if met:  # a trial without a benchmark (benchmark.enabled false) ranks after every measured one
        return min(met, key=lambda r: (r["targets"][target]["p50_ms"] or math.inf, r["trial"])), None
    missed = [r for r in rows if r["targets"].get(target, {}).get("gate_miss") is not None]
    if not missed:
        return None, None
    return None, min(missed, key=lambda r: (r["targets"][target]["gate_miss"],
                                            r["targets"][target]["p50_ms"] or math.inf, r["trial"]))


def publish_best(out_dir: pathlib.Path, row: dict[str, Any], folder: pathlib.Path) -> None:
    """Copy the trial's model and report into ``folder`` (replacing an earlier best)."""
    source = out_dir / row["dir"]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in ("model.onnx", "report.json", "report.md"):
        if (source / name).is_file():
            io.atomic_write_bytes(folder / name, (source / name).read_bytes())
    io.atomic_write_text(folder / "trial.txt", f"trial {row['trial']} ({row['dir']})\n")


@dataclasses.dataclass
class SweepResult:
    """sweep.json as an object; ``exit_code`` 0 when every target has a trial that meets the gates."""

    out_dir: pathlib.Path
    trials: list[dict[str, Any]]
    targets: list[str]
    best: dict[str, str | None]  # target -> trial name
    closest: dict[str, str | None]
    exit_code: int
    reason: str | None
    doc: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        return self.doc


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def to_markdown(doc: dict[str, Any]) -> str:
    by_name = {r["trial"]: r for r in doc["trials"]}
    targets = doc["targets"]
    keys = doc["space"]
    lines = [f"# Sweep {doc['sweep']}", "",
             f"{len(doc['trials'])} trials, strategy {doc['search']['strategy']} (seed {doc['search']['seed']}), "
             f"engine {doc['engine']}, {doc['workers']} workers, {doc['seconds']:.1f} s; step cache: "
             + (f"{doc['cache']['hits']} hits, {doc['cache']['misses']} misses" if doc["cache"]["enabled"] else "off"),
             ""]
    for target in targets:
        best, closest = doc["best"][target], doc["closest"][target]
        where = f"target {target}: " if targets != [LOCAL] else ""
        if best is not None:
            lines.append(f"- {where}best: trial {best} (copied to {doc['best_dirs'][target]})")
        elif closest is not None:
            lines.append(f"- {where}no trial meets the gates; closest: trial {closest} "
                         f"(gate miss {_fmt(by_name[closest]['targets'][target]['gate_miss'])})")
        else:
            lines.append(f"- {where}no trial meets the gates, and none was measured")
    lines += ["", "Pareto plot: pareto.png (output p50 latency vs the task metric).", ""]
    head = ["trial", "model", *keys, "status", "exit", "speedup", "p50 ms", "metric", "drop", "score", "MB",
            "gate miss", "cached steps"]
    head += [f"{t} speedup" for t in targets if t != LOCAL]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row in doc["trials"]:
        metric = f"{row['metric']} {_fmt(row['metric_value'], '.4f')}" if row["metric"] else "-"
        cells = [row["trial"], row["model"], *(_fmt(row["settings"].get(k)) for k in keys), row["status"],
                 str(row["exit_code"]), _fmt(row["speedup"], ".2f"), _fmt(row["p50_ms"], ".3f"), metric,
                 _fmt(row["drop"], ".4f"), _fmt(row["score"], ".4f"), _fmt(row["size_mb"], ".3f"),
                 _fmt(row["gate_miss"], ".3g"), f"{row['cache']['hits']}/{row['cache']['hits'] + row['cache']['misses']}"]
        cells += [_fmt(row["targets"].get(t, {}).get("speedup"), ".2f") for t in targets if t != LOCAL]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in doc["trials"] if r["reason"]]
    if failed:
        lines += ["", "## Why trials failed or missed", ""]
        lines += [f"- trial {r['trial']}: {r['reason']}" for r in failed]
    if doc.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in doc["warnings"]]
    return "\n".join(lines) + "\n"


def plot_pareto(doc: dict[str, Any], path: pathlib.Path) -> None:
    """Output p50 latency vs the task metric per trial, the Pareto front (faster and better) and
    the best trial of the first target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r["trial"]: r for r in doc["trials"]}
    points = [r for r in doc["trials"] if r["p50_ms"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for model in dict.fromkeys(r["model"] for r in points):
        mine = [r for r in points if r["model"] == model]
        ax.scatter([r["p50_ms"] for r in mine], [r["metric_value"] if r["metric_value"] is not None else math.nan
                                                 for r in mine], label=model, alpha=0.8)
    scored = sorted((r for r in points if r["metric_value"] is not None), key=lambda r: (r["p50_ms"], -r["metric_value"]))
    front, top = [], -math.inf
    for r in scored:
        if r["metric_value"] > top:
            front.append(r)
            top = r["metric_value"]
    if front:
        ax.plot([r["p50_ms"] for r in front], [r["metric_value"] for r in front], "k--", lw=1, drawstyle="steps-post",
                label="Pareto front")
    best = doc["best"].get(doc["targets"][0]) if doc["targets"] else None
    if best is not None and by_name[best]["metric_value"] is not None:
        row = by_name[best]
        ax.scatter([row["p50_ms"]], [row["metric_value"]], marker="*", s=220, c="gold", edgecolors="k",
                   label=f"best (trial {best})", zorder=3)
    metric = next((r["metric"] for r in points if r["metric"]), None)
    ax.set_xlabel("output p50 latency (ms)")
    ax.set_ylabel(f"task metric ({metric})" if metric else "task metric")
    ax.set_title(f"Sweep: {len(doc['trials'])} trials")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
