"""Reproduce benchmarks/results/pruning.md: magnitude pruning and structured channel pruning.

    python -m benchmarks.run_pruning            # runs both scripts (about 5 minutes on 2 cores)
    python -m benchmarks.run_pruning --collect  # only rebuilds pruning.md from the two section files

Each script writes its own section file (pruning_magnitude.md, pruning_channel.md, with its
command and machine stamp); this one runs them and joins them into pruning.md.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

from deployopt.core import io

RESULTS = pathlib.Path(__file__).parent / "results"
SECTIONS = (("benchmarks.run_pruning_magnitude", "pruning_magnitude.md"),
            ("benchmarks.run_pruning_channel", "pruning_channel.md"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", action="store_true", help="do not rerun, only join the section files")
    args = parser.parse_args(argv)
    if not args.collect:
        for module, _ in SECTIONS:
            subprocess.run([sys.executable, "-m", module], check=True)
    parts = ["# Pruning: what zeros buy and what removed channels buy", "",
             "Command: `python -m benchmarks.run_pruning` (each section below names the script that made it).",
             "Zeroed weights shrink only the zipped file: onnxruntime's dense kernels run them at the same speed. "
             "Removing channels makes the model faster; least-squares reconstruction recovers the accuracy.", ""]
    for _, name in SECTIONS:
        text = (RESULTS / name).read_text()
        parts.append(text.replace("\n# ", "\n## ").replace("# ", "## ", 1) if text.startswith("# ") else text)
    io.atomic_write_text(RESULTS / "pruning.md", "\n".join(parts) + "\n")
    print(f"wrote {RESULTS / 'pruning.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
