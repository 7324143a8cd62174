"""Reproduce benchmarks/results/reliability.md: the bad-input suite and a fuzzing campaign.

    python -m benchmarks.run_reliability [--cases 400]

Runs tests/test_reliability.py, tests/test_fuzz.py and tests/test_reproducible.py (pytest, junit
XML) and a larger fuzzing campaign than the test's, then tabulates how every case ended.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import numpy as np

from benchmarks.fuzz import CHECKOUT, run_campaign, uncaught_exception
from benchmarks.tiny_resnet import export_tiny_resnet
from deployopt.core import io
from deployopt.measure.machine import stamp, stamp_line

RESULTS = pathlib.Path(__file__).parent / "results" / "reliability.md"
SUITES = ["tests/test_reliability.py", "tests/test_fuzz.py", "tests/test_reproducible.py"]


def _suite(tmp: pathlib.Path) -> list[tuple[str, str, int]]:
    rows = []
    for suite in SUITES:
        junit = tmp / (pathlib.Path(suite).stem + ".xml")
        subprocess.run([sys.executable, "-m", "pytest", "-q", suite, f"--junitxml={junit}"],
                       capture_output=True, text=True, cwd=CHECKOUT)
        root = ET.parse(junit).getroot()
        cases = root.iter("testcase")
        counts = collections.Counter()
        for case in cases:
            outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else (
                "skipped" if case.find("skipped") is not None else "passed")
            counts[outcome] += 1
        rows.append((suite, ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), sum(counts.values())))
    return rows


def _outcome(result: dict) -> str:
    if result["code"] == 0:
        return "exit 0"
    if uncaught_exception(result["stderr"]):
        return f"exit {result['code']} (uncaught exception)"
    return f"exit {result['code']} (clean error)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=400)
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        suite_rows = _suite(tmp)
        seed = export_tiny_resnet(tmp / "seed.onnx")
        calibration = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
        t0 = time.time()
        records = run_campaign(seed, tmp / "fuzz", args.cases, calibration)
        fuzz_seconds = time.time() - t0
    families = collections.defaultdict(collections.Counter)
    for r in records:
        family = ("bit flips" if "bit flip" in r["mutation"] else "truncation" if "truncated" in r["mutation"]
                  else "field changes")
        for verb in ("inspect", "optimize"):
            if "hang" in r:
                families[(family, verb)]["hang"] += 1
            else:
                families[(family, verb)][_outcome(r[verb])] += 1
        if "driver_crash" in r:
            families[(family, "in-process driver crashes (replayed contained)")]["crash"] += 1
    lines = ["# Reliability", "",
             f"Command: `python -m benchmarks.run_reliability --cases {args.cases}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - started:.0f} s)", "",
             f"Machine: {stamp_line(stamp())}", "", "## Test suites (part of `make test`)", "",
             "| suite | outcome | cases |", "|---|---|---|"]
    lines += [f"| `{s}` | {o} | {n} |" for s, o, n in suite_rows]
    lines += ["", "Each bad-input case checks: exit 2 (1 once work started), exactly one `deployopt: error:` line "
              "naming the file and cause, no traceback, inputs byte-identical, no partial output.", "",
              f"## Fuzzing: {args.cases} mutants of a ResNet-style model ({fuzz_seconds:.0f} s)", "",
              "Each mutant goes through `inspect` and through `optimize` with cleanup + quantize.", "",
              "| mutation family | verb | outcomes |", "|---|---|---|"]
    for (family, verb), counts in sorted(families.items()):
        lines.append(f"| {family} | {verb} | " + ", ".join(f"{v} × {k}" for k, v in sorted(counts.items())) + " |")
    clean = sum(1 for r in records if "hang" not in r and all(
        "uncaught" not in _outcome(r[v]) for v in ("inspect", "optimize")))
    lines += ["", f"Ended cleanly (exit 0 with a valid model, or exit 1/2 with one error line): "
              f"**{clean} / {len(records)}** cases."]
    io.atomic_write_text(RESULTS, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
