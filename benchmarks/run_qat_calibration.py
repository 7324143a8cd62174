"""Quantize, then recover the int8 biases on the calibration crops themselves: what ``recover``'s
``trainable: biases`` buys when the training images are the user's own, measured on the fidelity
sets of ``peers.md``.

    .venv/bin/python -m benchmarks.run_qat_calibration [--archs efficientnet_lite0] [--max-kl 0.002]
        [--epochs 8] [--views 4] [--max-seconds 1500] [--runs 20] [--rounds 3]
        [--work runs/qat-calibration] [--out benchmarks/results/qat_calibration.md]

1. fp32: the real-weight export, with a dynamic batch (recover trains in mini-batches).
2. int8: ``deployopt.optimize`` with the recipe of peers.md's 'deployopt, KL fallback' entry:
   passes [cleanup, quantize (calibration auto, max_accuracy_drop ``--max-kl``)], metrics
   ``classification:score=kl``, data.calibration = data.evaluation = the 'photos' test split
   (110 crops).
3. int8 + recover: ``deployopt.optimize`` on the int8 file with passes [recover (teacher: the fp32
   file, trainable: biases, select_by: kl, patience: null, ``--epochs``/``--views``/
   ``--max-seconds``)], data.training = data.evaluation = the same 110 calibration crops: a user
   with one folder of images. Early stopping then judges crops whose unaugmented copies also train,
   so the held-out sets below are the only fair judges.
4. Fidelity of both against fp32 on onnxruntime (``run_qat.measure``): top-1 agreement [95% interval] and
   KL(fp32 || model) on peers.md's held-out crops (the 'photos' train split, 440 crops of the same
   25 photos) and its unseen photos (132 crops of 6 photos in no built-in dataset). Latency of both
   against fp32 (``deployopt.measure.latency.compare``, batch 1, 1 thread, interleaved rounds):
   recover changes only int32 biases, so the ratios should agree within noise.

Built models are kept under ``--work`` (``<arch>/int8``, ``<arch>/int8-recover``) and reused by a
rerun whose recipe is the same (compared with the recipe in their report.json), which then
measures again. Writes ``--out`` with the machine stamp and the command.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import deployopt  # noqa: E402
from deployopt.measure import machine  # noqa: E402

from benchmarks.run_peers import CALIBRATION, HELD_OUT, PREPROCESS, SHAPE, crops, unseen_photo_folder  # noqa: E402
from benchmarks.run_qat import fidelity_cells, measure, speed_cell  # noqa: E402


def _same_recipe(a: dict, b: dict) -> bool:
    """The same recipe up to where its model files lie (``model`` and a pass's ``teacher``)."""
    def strip(recipe: dict) -> dict:
        passes = [{name: {k: v for k, v in settings.items() if k != "teacher"} for name, settings in step.items()}
                  for step in recipe.get("passes", [])]
        return {**{k: v for k, v in recipe.items() if k != "model"}, "passes": passes}
    return strip(a) == strip(b)


def _optimize(recipe: dict, folder: pathlib.Path) -> tuple[pathlib.Path, float | None]:
    """``deployopt.optimize`` into ``folder`` unless the model there was made by the same recipe
    (its report.json says so); (model, seconds or None when reused)."""
    model, report = folder / "model.onnx", folder / "report.json"
    if model.exists() and report.exists() and _same_recipe(
            json.loads(report.read_text(encoding="utf-8"))["recipe"], recipe):
        return model, None
    t0 = time.perf_counter()
    deployopt.optimize(recipe, folder)
    return model, time.perf_counter() - t0


def _step(folder: pathlib.Path, name: str) -> dict:
    """The details of step ``name`` in the report.json of ``folder``."""
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    return next(s["details"] for s in report["steps"] if s["pass"] == name)


def run_arch(arch: str, work: pathlib.Path, args) -> dict:
    from deployopt import models
    from deployopt.models.export import export_model

    folder = work / arch
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "fp32.onnx"
    if not fp32.exists():
        export_model(models.build(arch, pretrained=True), fp32, SHAPE, dynamic_batch=True)
    data = {**CALIBRATION, "preprocess": PREPROCESS[arch]}
    print(f"[{arch}] quantize", file=sys.stderr)
    int8, int8_s = _optimize({"model": str(fp32), "data": {"calibration": data, "evaluation": data},
                              "metrics": "classification:score=kl",
                              "passes": [{"cleanup": {}}, {"quantize": {"calibration": "auto",
                                                                        "max_accuracy_drop": args.max_kl}}],
                              "benchmark": {"enabled": False}}, folder / "int8")
    print(f"[{arch}] recover", file=sys.stderr)
    settings = {"teacher": str(fp32), "trainable": "biases", "max_epochs": args.epochs, "views": args.views,
                "select_by": "kl", "patience": None, "max_seconds": args.max_seconds}
    recovered, recover_s = _optimize({"model": str(int8), "data": {"training": data, "evaluation": data},
                                      "metrics": "classification:score=kl", "passes": [{"recover": settings}],
                                      "benchmark": {"enabled": False}}, folder / "int8-recover")
    quantize, recover = _step(folder / "int8", "quantize"), _step(folder / "int8-recover", "recover")
    fallback = quantize.get("fallback") or {}
    rows = {"int8": {"seconds": int8_s, "float_nodes": len(fallback.get("nodes_to_float", []))},
            "int8 + recover": {"seconds": recover_s, **{k: recover.get(k) for k in (
                "epochs_run", "best_epoch", "train_seconds", "lr", "trainable_initializers", "samples", "views")},
                "history": [(h["epoch"], h["holdout_kl"]) for h in recover.get("history", [])]}}
    sets = {"held-out": crops(arch, HELD_OUT),
            "unseen": crops(arch, {"dataset": f"folder:{unseen_photo_folder(work / 'unseen-photos')}"})}
    warnings = measure(arch, fp32, {"int8": int8, "int8 + recover": recovered}, sets, rows, args.runs, args.rounds)
    return {"rows": rows, "warnings": warnings}


def markdown(command: str, stamp: dict, results: dict, args) -> str:
    lines = ["# Quantize, then recover the int8 biases on the calibration crops", "",
             f"Machine: {machine.stamp_line(stamp)}", "", f"Command: `{command}`", "",
             "Real ImageNet weights, 1x3x224x224 (run_qat_calibration.py's docstring). int8: peers.md's "
             f"'deployopt, KL fallback' recipe (max_accuracy_drop {args.max_kl:g} on exp(-KL), judged on the 110 "
             "calibration crops). int8 + recover: `recover` with `trainable: biases`, the fp32 model as teacher, "
             "trained and early-stopped (KL) on the same 110 calibration crops, "
             f"{args.views} views, at most {args.epochs} epochs and {args.max_seconds:g} s. held-out: 440 other "
             "crops of the calibration photos; unseen: 132 crops of 6 photos no step saw. agreement = top-1 "
             "agreement with fp32 [95% interval], KL = mean KL(fp32 || model), onnxruntime's integer kernels. "
             "speedup = p50(fp32) / p50(model), batch 1, 1 thread, interleaved rounds [95% interval]. A time of "
             "'reused' means the model was built by an earlier invocation with the same recipe.", ""]
    for arch, res in results.items():
        lines += [f"## {arch}", "",
                  "| model | held-out: agreement | KL | unseen: agreement | KL | speedup vs fp32 | time |",
                  "|---|---|---|---|---|---|---|"]
        for label, row in res["rows"].items():
            built = "reused" if row["seconds"] is None else f"{row['seconds']:.0f} s"
            what = (f"{built} ({row['float_nodes']} nodes returned to float by the fallback)" if label == "int8" else
                    f"{built} ({row['trainable_initializers']} bias vectors trained at lr {row['lr']:g}, "
                    f"{row['samples']} crops x {row['views']} views, {row['epochs_run']} epochs in "
                    f"{row['train_seconds']:.0f} s, best {row['best_epoch']})")
            cells = [label, *fidelity_cells(row["held-out"]), *fidelity_cells(row["unseen"]), speed_cell(row), what]
            lines.append("| " + " | ".join(cells) + " |")
        history = ", ".join(f"{kl:.2e}" for _, kl in res["rows"]["int8 + recover"]["history"])
        lines += ["", f"Early-stopping KL on the calibration crops, epoch 0 (the int8 model) onward: {history}."]
        if res["warnings"]:
            lines += ["", "Timing warnings: " + "; ".join(res["warnings"])]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="efficientnet_lite0")
    parser.add_argument("--max-kl", type=float, default=0.002)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=1500.0)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=str(ROOT / "runs" / "qat-calibration"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qat_calibration.md"))
    args = parser.parse_args(argv)
    work = pathlib.Path(args.work)
    results = {arch: run_arch(arch, work, args) for arch in args.archs.split(",")}
    command = "python -m benchmarks.run_qat_calibration " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(command.strip(), machine.stamp(), results, args)
    pathlib.Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
