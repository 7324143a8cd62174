"""Published numbers for quantization-aware recovery: ``quantize`` then ``recover`` on the int8
graph, against ``quantize`` alone, on real-weight models.

    .venv/bin/python -m benchmarks.run_qat [--archs efficientnet_lite0,mobilenet_v2] [--epochs 8]
        [--trainable biases|all|changed] [--lr 1e-4] [--views 2] [--max-seconds 1500]
        [--select-by kl|agreement] [--equalize mobilenet_v2] [--runs 20] [--rounds 3]
        [--out benchmarks/results/qat.md]

1. Exports EfficientNet-Lite0 and MobileNetV2 with their real ImageNet weights at 1x3x224x224,
   dynamic batch (``run_rounding``'s export).
2. Data as in ``run_rounding``: calibration = the 'photos' test-split crops of photos 1-15;
   'seen photos' = the train-split crops of those photos; 'unseen photos' = all crops of photos
   16-25, which neither calibration nor training saw.
3. ``QuantizePass(calibration='auto', latency_aware=False)`` on the calibration crops (the
   deployopt int8 of ``peers.md``; with ``equalize=True`` for the archs named by ``--equalize``),
   then ``RecoverPass`` on that int8 graph with the fp32 export as the teacher and
   ``--trainable``/``--epochs``/``--lr`` (default: the pass's own for ``--trainable``)/``--views``/
   ``--max-seconds``/``--select-by``. Training images:
   ``run_recover``'s training folder (random crops of pictures in neither held-out set, faces,
   thumbnails, and the even half of the calibration crops) without the crops of photos 16-25;
   early stopping (``data.evaluation``) on the odd half of the calibration crops of photos 1-15.
   Early stopping on a random tenth of the calibration crops instead (the pass's default without
   ``data.evaluation``) is leaky: a crop's mirror or a larger crop of the same photo is in
   training, and epochs that memorise them win.
4. Fidelity to fp32 of both int8 models on both held-out sets (onnxruntime, graph optimization
   on, so the integer kernels a user runs): top-1 agreement with its 95% interval and the mean
   KL(fp32 || int8). Latency of both against fp32 (``deployopt.measure.latency.compare``:
   worker processes, interleaved rounds, batch 1, one thread): recover changes only integers in
   the graph, so the ratios should match within noise.

Writes ``--out`` with the machine stamp and the command, and prints it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deployopt.measure import machine  # noqa: E402

from benchmarks.run_peers import PREPROCESS, REAL_WEIGHTS, SHAPE  # noqa: E402  (the same two real-weight models)
from benchmarks.run_recover import write_training_folder  # noqa: E402
from benchmarks.run_rounding import CALIBRATION_PHOTOS, PHOTOS, datasets, logits  # noqa: E402

HELD_OUT = ("seen photos", "unseen photos")


def _int8(fp32: pathlib.Path, out: pathlib.Path, cal, equalize: bool) -> dict:
    from deployopt.core import io
    from deployopt.passes.context import PassContext
    from deployopt.passes.quantize import QuantizePass

    step = QuantizePass(calibration="auto", latency_aware=False, equalize=equalize)
    step.context = PassContext(calibration=cal, work_dir=out.parent)
    t0 = time.perf_counter()
    result = step(io.load(fp32))
    io.save(result.model, out)
    return {"seconds": time.perf_counter() - t0, "chosen": result.details["calibration"].get("method"),
            "equalize": equalize}


def training_folders(tmp: pathlib.Path, crops: int) -> tuple[pathlib.Path, pathlib.Path]:
    """(training folder, early-stopping folder) of step 3 in the module docstring."""
    train, stop = tmp / "training", tmp / "early-stopping"
    write_training_folder(train, crops, stop)
    for folder in (train, stop):  # calibration crops are 'photo_<index>.png'; the photo is index % 25
        for path in folder.glob("photo_*.png"):
            if int(path.stem.split("_")[1]) % PHOTOS >= CALIBRATION_PHOTOS:
                path.unlink()
    return train, stop


def _recover(arch: str, fp32: pathlib.Path, int8: pathlib.Path, out: pathlib.Path, folders, settings: dict) -> dict:
    from deployopt.core import io
    from deployopt.core.data import open_dataset
    from deployopt.passes.context import PassContext
    from deployopt.passes.recover import RecoverPass

    train, stop = (open_dataset({"dataset": f"folder:{f}", "preprocess": PREPROCESS[arch]}, input_shape=SHAPE)
                   for f in folders)
    step = RecoverPass(**settings)
    step.context = PassContext(training=train, evaluation=stop, reference=io.load(fp32), seed=0,
                               work_dir=out.parent, threads=2)
    t0 = time.perf_counter()
    result = step(io.load(int8))
    io.save(result.model, out)
    d = result.details
    return {"seconds": time.perf_counter() - t0, "modified": result.modified, "failure": result.failure,
            "stop_samples": len(stop),
            **{k: d.get(k) for k in ("epochs_run", "best_epoch", "train_seconds", "teacher_seconds", "samples",
                                     "views", "relative_rms_diff", "agreement_before", "agreement_after",
                                     "kl_before", "kl_after", "lr", "trainable_initializers")}}


def run_arch(arch: str, tmp: pathlib.Path, folders, settings: dict, equalize: bool, runs: int, rounds: int) -> dict:
    from deployopt import models
    from deployopt.models.export import export_model

    fp32 = tmp / f"{arch}.onnx"
    export_model(models.build(arch, pretrained=True), fp32, SHAPE, dynamic_batch=True)
    data = datasets(arch)
    held_out = {held: np.concatenate([x for x, _ in data[held].batches(16)]) for held in HELD_OUT}
    int8, recovered = tmp / f"{arch}-int8.onnx", tmp / f"{arch}-int8-recover.onnx"
    print(f"[{arch}] quantize", file=sys.stderr)
    rows = {"int8": _int8(fp32, int8, data["calibration"], equalize)}
    print(f"[{arch}] recover", file=sys.stderr)
    rows["int8 + recover"] = _recover(arch, fp32, int8, recovered, folders, settings)
    warnings = measure(arch, fp32, {"int8": int8, "int8 + recover": recovered}, held_out, rows, runs, rounds)
    return {"rows": rows, "sizes": {k: len(v) for k, v in data.items()}, "warnings": warnings}


def measure(arch: str, fp32: pathlib.Path, paths: dict, held_out: dict, rows: dict, runs: int, rounds: int) -> list:
    """Fidelity to ``fp32`` of each model of ``paths`` ({label: file}) on each set of ``held_out``
    ({name: crops}) into ``rows[label][name]``, and their latency against fp32 (one interleaved
    run, batch 1, one thread) into ``rows[label]["latency"]``; returns the timing warnings."""
    from deployopt.measure.latency import compare
    from deployopt.measure.metrics import fidelity

    for held, x in held_out.items():
        reference = logits(fp32, x, 1)
        for label, path in paths.items():
            r = fidelity(logits(path, x, 1), reference)
            rows[label][held] = {"n": len(x), **{k: r[k] for k in ("agreement", "agreement_ci", "kl")}}
            print(f"[{arch}] {label} {held}: agreement {r['agreement']:.4f} KL {r['kl']:.3e}", file=sys.stderr)
    bench = compare([fp32, *paths.values()], labels=["fp32", *paths], threads=(1,), batch=(1,), warmup=5,
                    runs=runs, rounds=rounds, progress=False)
    for r in bench.rows:
        if r["model"] in rows:
            rows[r["model"]]["latency"] = r
    return list(bench.warnings)


def fidelity_cells(entry: dict) -> tuple[str, str]:
    """(agreement [95% interval], KL) table cells of one fidelity entry."""
    lo, hi = entry["agreement_ci"]
    return f"{100 * entry['agreement']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]", f"{entry['kl']:.2e}"


def speed_cell(row: dict) -> str:
    lat = row.get("latency")
    if lat is None or lat["error"]:
        return "error"
    return f"{lat['speedup']:.2f}x [{lat['speedup_ci'][0]:.2f}, {lat['speedup_ci'][1]:.2f}]"


def markdown(command: str, stamp: dict, results: dict, settings: dict) -> str:
    lines = ["# Quantization-aware recovery: quantize, then recover on the int8 graph", "",
             f"Machine: {machine.stamp_line(stamp)}", "", f"Command: `{command}`", "",
             "Real ImageNet weights, 1x3x224x224. int8: `QuantizePass(calibration='auto', latency_aware=False)` ("
             "with `equalize=True` where the time column says so) on "
             "the 'photos' test-split crops of photos 1-15. int8 + recover: `RecoverPass` on that int8 graph, the "
             "fp32 export as teacher, trained on run_recover's training folder without photos 16-25, early "
             f"stopping on the odd half of the calibration crops ({json.dumps(settings)}). 'seen photos': the "
             "train-split crops of photos 1-15; 'unseen photos': all crops of photos 16-25, in no calibration or "
             "training set. agreement = top-1 agreement with fp32 "
             "[95% interval], KL = mean KL(fp32 || int8), both from onnxruntime's integer kernels. speedup = "
             "p50(fp32) / p50(model), batch 1, 1 thread, interleaved rounds [95% interval].", ""]
    for arch, res in results.items():
        lines += [f"## {arch}", "", f"{res['sizes']['calibration']} calibration crops, "
                  f"{res['sizes']['seen photos']} seen-photo crops, {res['sizes']['unseen photos']} unseen-photo "
                  "crops.", "",
                  "| model | seen photos: agreement | KL | unseen photos: agreement | KL | speedup vs fp32 | time |",
                  "|---|---|---|---|---|---|---|"]
        for label, row in res["rows"].items():
            seen, unseen = fidelity_cells(row["seen photos"]), fidelity_cells(row["unseen photos"])
            what = (f"{row['seconds']:.0f} s (calibration {row['chosen']}"
                    f"{', equalize' if row['equalize'] else ''})" if label == "int8" else
                    f"{row['seconds']:.0f} s ({row['trainable_initializers']} initializers trained at lr "
                    f"{row['lr']:g}, {row['samples']} samples x {row['views']} views, {row['epochs_run']} "
                    f"epochs, best {row['best_epoch']}; early-stopping agreement {row['agreement_before']:.3f} -> "
                    f"{row['agreement_after']:.3f}, KL {row['kl_before']:.2e} -> {row['kl_after']:.2e} on "
                    f"{row['stop_samples']} crops)"
                    if row.get("epochs_run") is not None else
                    f"{row['seconds']:.0f} s: {row.get('failure')}")
            cells = [label, *seen, *unseen, speed_cell(row), what]
            lines.append("| " + " | ".join(cells) + " |")
        if res["rows"]["int8 + recover"].get("best_epoch") == 0:
            lines += ["", "recover kept the int8 model: no epoch beat it on the early-stopping crops, so both rows "
                      "are the same weights and their speedups differ by timing noise alone."]
        if res["warnings"]:
            lines += ["", "Timing warnings: " + "; ".join(res["warnings"])]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(REAL_WEIGHTS))
    parser.add_argument("--trainable", choices=("biases", "all", "changed"), default="biases",
                        help="recover's trainable: biases (int8 weights fixed), the only one that trains an int8 "
                             "graph in benchmarks/results/qat_probes.md")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: recover's own for --trainable")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--crops", type=int, default=24, help="random crops per large training picture")
    parser.add_argument("--max-seconds", type=float, default=1500.0)
    parser.add_argument("--select-by", choices=("agreement", "kl"), default="kl",
                        help="recover's early-stopping score on the early-stopping crops")
    parser.add_argument("--equalize", default="", help="comma-separated archs quantized with equalize=True")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qat.md"))
    args = parser.parse_args(argv)
    settings = {"trainable": args.trainable, "max_epochs": args.epochs, "lr": args.lr, "views": args.views,
                "max_seconds": args.max_seconds, "patience": None, "select_by": args.select_by}
    equalized = set(filter(None, args.equalize.split(",")))
    results = {}
    with tempfile.TemporaryDirectory(prefix="deployopt-qat-") as tmp:
        folders = training_folders(pathlib.Path(tmp), args.crops)
        for arch in args.archs.split(","):
            results[arch] = run_arch(arch, pathlib.Path(tmp), folders, settings, arch in equalized, args.runs,
                                     args.rounds)
    command = "python -m benchmarks.run_qat " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(command.strip(), machine.stamp(), results, settings)
    pathlib.Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
