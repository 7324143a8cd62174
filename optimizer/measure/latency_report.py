"""The latency table in its output formats: plain text, Markdown, CSV and JSON-ready dicts.

Input is a benchmark result (``deployopt.measure.latency.BenchResult``: rows, machine stamp,
session options, settings, warnings); the PNG plot of the same rows is
``deployopt.measure.output.plot_latency``. A failed row shows its one-line reason across the
number columns; speedups read ``ratio x [low, high]`` with the 95% bootstrap interval.
"""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING

from deployopt.measure.machine import stamp_line

if TYPE_CHECKING:
    from deployopt.measure.latency import BenchResult

#: The keys a report's ``benchmark`` rows carry.
REPORT_KEYS = ("model", "threads", "batch", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms",
               "throughput_ips", "speedup")
#: All keys of a row, in table order.
ROW_KEYS = ("model", "threads", "batch", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms",
            "std_ms", "min_ms", "cv", "throughput_ips", "speedup", "speedup_ci", "peak_rss_mb",
            "runtime", "runtime_version", "ep", "instances", "error", "samples_ms")
_HEADER = ["model", "threads", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "img/s",
           "speedup [95% CI]", "peak RSS MB"]
_FAILED = "FAILED: "


def result_dict(result: BenchResult, *, samples: bool = False) -> dict:
    """Plain data for JSON: the rows (without per-run samples unless ``samples``) and context."""
    rows = [dict(r) if samples else {k: v for k, v in r.items() if k != "samples_ms"}
            for r in result.rows]
    for r in rows:
        if r.get("speedup_ci") is not None:
            r["speedup_ci"] = list(r["speedup_ci"])
    return {"machine": result.machine, "session_options": result.session_options,
            "settings": result.settings, "models": result.models, "rows": rows,
            "warnings": list(result.warnings)}


def to_json(result: BenchResult, *, samples: bool = False, indent: int = 2) -> str:
    return json.dumps(result_dict(result, samples=samples), indent=indent) + "\n"


def to_csv(result: BenchResult) -> str:
    """One line per row; the interval as two columns, no per-run samples."""
    keys = [k for k in ROW_KEYS if k not in ("samples_ms", "speedup_ci")]
    after_speedup = keys.index("speedup") + 1
    keys[after_speedup:after_speedup] = ["speedup_ci_low", "speedup_ci_high"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in result.rows:
        ci = r.get("speedup_ci") or (None, None)
        row = {k: r.get(k) for k in keys if k in r}
        row.update(speedup_ci_low=ci[0], speedup_ci_high=ci[1])
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def to_text(result: BenchResult) -> str:
    """Aligned table (text left, numbers right), then the machine, session and method lines."""
    body = _body(result)
    rows = [_HEADER, *body]
    ok = [row for row in rows if not _failed(row)]
    widths = [max(len(row[i]) for row in (ok if i >= 3 else rows)) for i in range(len(_HEADER))]
    lines = []
    for row in rows:
        if _failed(row):  # a failure reason spans the number columns
            head = "  ".join(c.ljust(w) for c, w in zip(row[:3], widths[:3]))
            lines.append(f"{head}  {row[3]}")
            continue
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    lines.insert(1, "-" * sum(widths + [2 * (len(widths) - 1)]))
    return "\n".join([*lines, "", *_footer(result)]) + "\n"


def to_markdown(result: BenchResult) -> str:
    """Markdown table, then the footer lines and the warnings as a list."""
    lines = ["| " + " | ".join(_HEADER) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(_HEADER))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _body(result)]
    notes = [f"- {line}" for line in _footer(result)]
    notes += [f"- warning: {w}" for w in result.warnings]
    return "\n".join([*lines, "", *notes]) + "\n"


def _failed(row: list[str]) -> bool:
    return row[3].startswith(_FAILED)


def _body(result: BenchResult) -> list[list[str]]:
    body = []
    for r in result.rows:
        rss = "" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"
        if r["error"] is not None:
            body.append([r["model"], str(r["threads"]), str(r["batch"]),
                         f"{_FAILED}{r['error']}", "", "", "", "", "", rss])
            continue
        speed = "—" if r["speedup"] is None else (
            f"{_ratio(r['speedup'])}x [{_ratio(r['speedup_ci'][0])}, "
            f"{_ratio(r['speedup_ci'][1])}]")
        body.append([r["model"], str(r["threads"]), str(r["batch"]), _ms(r["p50_ms"]),
                     _ms(r["p90_ms"]), _ms(r["p99_ms"]),
                     f"{_ms(r['mean_ms'])} ± {_ms(r['std_ms'])}",
                     f"{r['throughput_ips']:.1f}", speed, rss])
    return body


def _footer(result: BenchResult) -> list[str]:
    s, o = result.settings, result.session_options
    runtimes = dict.fromkeys(f"{r['runtime']} {r['runtime_version']} ({r['ep']})"
                             for r in result.rows if r.get("runtime"))
    instances = s.get("instances") or 1
    load = (f"; {instances} concurrent instances per model, img/s is their aggregate throughput"
            if instances > 1 else "")
    return [
        f"machine: {stamp_line(result.machine)}",
        *([f"runtime: {', '.join(runtimes)}"] if runtimes else []),
        f"session: intra-op threads as listed, inter-op {o['inter_op_num_threads']}, "
        f"{o['execution_mode']}, {o['graph_optimization_level']}",
        f"method: {s.get('rounds')} interleaved rounds x {s.get('runs')} runs after "
        f"{s.get('warmup')} warm-up runs per segment{load}; inputs: {s.get('inputs')}; "
        f"speedup = p50(first) / p50(model), 95% bootstrap CI over rounds",
    ]


def _ms(value: float) -> str:
    return f"{value:.4g}"


def _ratio(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"
