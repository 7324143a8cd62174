"""Published numbers for runtimes as targets: fp32 and deployopt int8 on onnxruntime (CPU EP) and
OpenVINO (CPU), side by side in one interleaved run.

    .venv/bin/python -m benchmarks.run_runtimes [--runs 30] [--rounds 3] [--threads 1]
        [--out benchmarks/results/runtimes.md]

1. Models with real ImageNet weights: EfficientNet-Lite0 (the demo's export spec, 1x3x224x224)
   and MobileNetV2 (torchvision weights), exported by ``run_peers.fp32_model``.
2. int8: ``run_peers.deployopt_int8``, ``deployopt.optimize`` with the demo's passes (cleanup,
   quantize with minmax calibration) on the demo's calibration data ('photos' test split), no
   benchmark.
3. Latency: the four (model, runtime) pairs of each architecture in one
   ``deployopt.measure.latency.compare`` run (one worker process each, interleaved rounds, a
   target per entry), at ``--threads`` intra-op threads and batch 1; ratio = p50(onnxruntime fp32)
   / p50(entry) with its bootstrap 95% interval.
4. Agreement: top-1 of each (model, runtime) against fp32 on onnxruntime on the held-out crops
   (the 'photos' train split, which calibration never saw), with a Wilson 95% interval.

Writes ``--out`` with the machine stamp and the command, and prints it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deployopt.core.data import open_dataset  # noqa: E402
from deployopt.measure import machine  # noqa: E402
from deployopt.measure.latency import compare  # noqa: E402
from deployopt.measure.metrics import wilson_interval  # noqa: E402
from deployopt.measure.runtime import open_runtime  # noqa: E402

from benchmarks.run_peers import PREPROCESS, SHAPE, deployopt_int8, fp32_model  # noqa: E402  (the same models)

TARGETS = (("onnxruntime", None), ("openvino", None))


def _top1(path, runtime: str, data) -> np.ndarray:
    model = open_runtime(path, runtime, threads=2)
    name = model.inputs[0]
    # one sample per run: the exports have a fixed batch of 1
    return np.concatenate([np.argmax(model.run(None, {name: x[i:i + 1]})[0], axis=1)
                           for x, _ in data.batches(16) for i in range(len(x))])


def _run(arch: str, folder: pathlib.Path, threads: int, runs: int, rounds: int) -> list[dict]:
    fp32 = fp32_model(arch, folder)
    int8 = folder / f"{arch}-int8.onnx"
    deployopt_int8(arch, fp32, int8)
    entries = [(f"{kind} {runtime}", path, (runtime, ep)) for kind, path in (("fp32", fp32), ("int8", int8))
               for runtime, ep in TARGETS]
    result = compare([p for _, p, _ in entries], labels=[e[0] for e in entries], targets=[t for _, _, t in entries],
                     threads=(threads,), runs=runs, rounds=rounds, warmup=10, progress=False)
    held_out = open_dataset({"dataset": "photos", "split": "train", "preprocess": PREPROCESS[arch]},
                            input_shape=SHAPE)
    reference = _top1(fp32, "onnxruntime", held_out)
    rows = []
    for (label, path, (runtime, _)), row in zip(entries, result.rows):
        agree = int(np.sum(_top1(path, runtime, held_out) == reference))
        rows.append({"arch": arch, "label": label, "row": row, "agree": agree, "n": len(reference),
                     "ci": wilson_interval(agree, len(reference))})
    return rows, result


def _markdown(command: str, stamp: dict, rows: list[dict], threads: int) -> str:
    lines = ["# Runtimes: onnxruntime (CPU EP) vs OpenVINO (CPU), fp32 and deployopt int8", "",
             f"Machine: {machine.stamp_line(stamp)}", "", f"Command: `{command}`", "",
             f"Latency at batch 1, {threads} intra-op thread(s), one interleaved run per architecture "
             "(four worker processes; ratio = p50(fp32 onnxruntime) / p50(entry), bootstrap 95% CI over "
             "rounds). Agreement: top-1 with fp32 on onnxruntime on the held-out 'photos' crops (train "
             "split; calibration used the test split), Wilson 95% CI.", "",
             "| model | entry | runtime | p50 ms | p99 ms | ratio vs fp32 onnxruntime [95% CI] | "
             "top-1 agreement with fp32 [95% CI] |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        row = r["row"]
        if row["error"] is not None:
            lines.append(f"| {r['arch']} | {r['label']} | {row['runtime']} | FAILED: {row['error']} | | | |")
            continue
        low, high = row["speedup_ci"]
        lines.append(f"| {r['arch']} | {r['label']} | {row['runtime']} {row['runtime_version']} ({row['ep']}) | "
                     f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['speedup']:.2f}x [{low:.2f}, {high:.2f}] | "
                     f"{r['agree'] / r['n']:.1%} ({r['agree']}/{r['n']}) [{r['ci'][0]:.1%}, {r['ci'][1]:.1%}] |")
    lines += ["", "OpenVINO compiles a float model with INFERENCE_PRECISION_HINT f32 and an int8 (Q/DQ) model "
              "with its default precision (deployopt.measure.runtime); the int8 models are the same files on "
              "both runtimes, quantized by deployopt for onnxruntime's kernels (the latency-aware search "
              "measured on onnxruntime)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtimes.md"))
    args = parser.parse_args(argv)
    command = "python -m benchmarks.run_runtimes " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, stamp = [], None
    with tempfile.TemporaryDirectory(prefix="deployopt-runtimes-") as tmp:
        for arch in ("efficientnet_lite0", "mobilenet_v2"):
            arch_rows, result = _run(arch, pathlib.Path(tmp), args.threads, args.runs, args.rounds)
            rows += arch_rows
            stamp = result.machine
    text = _markdown(command.strip(), stamp, rows, args.threads)
    pathlib.Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
