"""Published numbers for the quantize pass's weight rounding and activation ranges:
``rounding: nearest | gptq | adaround`` x ``calibration: minmax | mse`` on real-weight models.

    .venv/bin/python -m benchmarks.run_rounding [--archs efficientnet_lite0,mobilenet_v2]
        [--runs 20] [--rounds 3] [--budget 300] [--out benchmarks/results/rounding.md]

1. Exports EfficientNet-Lite0 and MobileNetV2 with their real ImageNet weights (models.build
   ``pretrained=True``) at 1x3x224x224, dynamic batch.
2. Data: 'photos' (22 crop variants of 25 photos; efficientnet-lite preprocessing for
   EfficientNet-Lite0, imagenet for MobileNetV2) cut by photo. Calibration: the crops of the
   'test' split (the demo's calibration split) of the first 15 photos. Held out, two sets:
   'seen photos': the 'train' split crops (the demo's fidelity split) of those 15 photos, other
   crops of photos calibration saw; 'unseen photos': all 22 crops of the other 10 photos, which
   calibration never saw.
3. Quantizes each model six times, ``QuantizePass(rounding=r, calibration=c, latency_aware=False)``
   with everything else at its defaults (bias correction on), and records the time and what the
   refinement and the range search did.
4. Fidelity to fp32 on both held-out sets (deployopt.measure.metrics.fidelity on logits from
   onnxruntime, graph optimization on): top-1 agreement with its 95% interval and the mean
   KL(fp32 || int8) of the softmax.
5. Latency of every quantized model against fp32 (deployopt.measure.latency.compare: separate
   worker processes, interleaved rounds, batch 1, one thread): rounding and ranges change only
   numbers in the graph, so the ratios should match within noise.

Writes ``benchmarks/results/rounding.md`` with the machine stamp and the command, and prints it.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deployopt.core.data import open_dataset  # noqa: E402
from deployopt.measure import machine  # noqa: E402

from benchmarks.run_peers import PREPROCESS, REAL_WEIGHTS, SHAPE  # noqa: E402  (the same two real-weight models)

PHOTOS, CALIBRATION_PHOTOS = 25, 15  # 'photos' lists its 22 crop variants photo-major: source i is photo i % 25
ROUNDINGS = ("nearest", "gptq", "adaround")
CALIBRATIONS = ("minmax", "mse")


def _photos(arch: str, split: str, keep, name: str):
    data = open_dataset({"dataset": "photos", "split": split, "preprocess": PREPROCESS[arch]}, input_shape=SHAPE)
    subset = copy.copy(data)
    subset.indices = np.array([i for i in data.indices if keep(int(i) % PHOTOS)])
    subset.name = name
    return subset


def datasets(arch: str) -> dict:
    seen = lambda p: p < CALIBRATION_PHOTOS  # noqa: E731
    return {"calibration": _photos(arch, "test", seen, "photos test split, photos 1-15"),
            "seen photos": _photos(arch, "train", seen, "photos train split, photos 1-15"),
            "unseen photos": _photos(arch, "all", lambda p: not seen(p), "photos, all crops of photos 16-25")}


def logits(path: pathlib.Path, x: np.ndarray, threads: int) -> np.ndarray:
    from deployopt.core.session import open_session

    sess = open_session(path, threads=threads, what=str(path.name))
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 8]})[0] for i in range(0, len(x), 8)])


def _quantize(fp32: pathlib.Path, out: pathlib.Path, cal, rounding: str, calibration: str, budget: float) -> dict:
    from deployopt.core import io
    from deployopt.passes.context import PassContext
    from deployopt.passes.quantize import QuantizePass

    p = QuantizePass(rounding=rounding, calibration=calibration, latency_aware=False,
                              adaround_budget_s=budget)
    p.context = PassContext(calibration=cal, work_dir=out.parent)
    t0 = time.perf_counter()
    result = p(io.load(fp32))
    seconds = time.perf_counter() - t0
    io.save(result.model, out)
    d = result.details
    return {"seconds": seconds, "refinement": d.get("refinement", {}),
            "range_search": d["calibration"].get("range_search"), "samples": d["calibration"]["samples"]}


def run_arch(arch: str, tmp: pathlib.Path, budget: float, threads: int, runs: int, rounds: int) -> dict:
    from deployopt import models
    from deployopt.measure.latency import compare
    from deployopt.measure.metrics import fidelity
    from deployopt.models.export import export_model

    fp32 = tmp / f"{arch}.onnx"
    export_model(models.build(arch, pretrained=True), fp32, SHAPE, dynamic_batch=True)
    data = datasets(arch)
    held_out = {held: np.concatenate([x for x, _ in data[held].batches(16)])
                for held in ("seen photos", "unseen photos")}
    reference = {held: logits(fp32, x, threads) for held, x in held_out.items()}
    rows, paths = {}, {}
    for calibration in CALIBRATIONS:
        for rounding in ROUNDINGS:
            label = f"{rounding} / {calibration}"
            print(f"[{arch}] quantize {label}", file=sys.stderr)
            path = tmp / f"{arch}-{rounding}-{calibration}.onnx"
            rows[label] = _quantize(fp32, path, data["calibration"], rounding, calibration, budget)
            paths[label] = path
            for held, x in held_out.items():
                r = fidelity(logits(path, x, threads), reference[held])
                rows[label][held] = {"n": len(x), **{k: r[k] for k in ("agreement", "agreement_ci", "kl")}}
                print(f"[{arch}]   {held}: agreement {r['agreement']:.4f} KL {r['kl']:.3e}", file=sys.stderr)
    print(f"[{arch}] latency", file=sys.stderr)
    labels = list(paths)
    bench = compare([fp32, *paths.values()], labels=["fp32", *labels], threads=(threads,), batch=(1,), warmup=5,
                    runs=runs, rounds=rounds, progress=False)
    for r in bench.rows:
        if r["model"] in rows:
            rows[r["model"]]["latency"] = r
    return {"rows": rows, "sizes": {k: len(v) for k, v in data.items()}}


def _refined(row: dict) -> str:
    r = row["refinement"]
    parts = []
    if r.get("adaround"):
        a = r["adaround"]
        parts.append(f"AdaRound {a['layers_adaround']}")
    if r.get("layers_gptq") or r.get("rounding") in ("gptq", "adaround"):
        parts.append(f"GPTQ {r.get('layers_gptq', 0)}")
    parts.append(f"nearest {r.get('layers_nearest', 0)}")
    text = ", ".join(parts)
    if r.get("adaround"):
        a = r["adaround"]
        text += (f" (learned {a['layers_learned']} layers, {a['mean_iterations']:.0f} iterations each, "
                 f"{a['seconds']:.0f} s)")
    return text


def _markdown(command: str, stamp: dict, results: dict, budget: float) -> str:
    lines = ["# Weight rounding and activation ranges: nearest / GPTQ / AdaRound x minmax / mse", "",
             f"Machine: {machine.stamp_line(stamp)}", "", f"Command: `{command}`", "",
             "Real ImageNet weights, 1x3x224x224. Calibration: the 'photos' test-split crops of photos 1-15; "
             "'seen photos': the train-split crops of the same 15 photos (other crops of photos calibration "
             "saw, like the demo's fidelity set); 'unseen photos': all 22 crops of photos 16-25, never "
             "calibrated on. Each model is `QuantizePass(rounding=..., calibration=..., latency_aware=False)`, "
             "bias correction on, 64 refinement samples, `adaround_budget_s` "
             f"{budget:g}. agreement = top-1 agreement with fp32 [95% interval]; KL = mean KL(fp32 || int8) of "
             "the softmax. Latency: batch 1, separate worker processes, interleaved rounds; ratio = "
             "p50(fp32) / p50(int8) [95% interval].", ""]
    for arch, res in results.items():
        sizes = res["sizes"]
        lines += [f"## {arch}", "",
                  f"{sizes['calibration']} calibration crops, {sizes['seen photos']} seen-photo crops, "
                  f"{sizes['unseen photos']} unseen-photo crops.", "",
                  "| rounding / calibration | seen photos: agreement | KL | unseen photos: agreement | KL | "
                  "speedup vs fp32 | layers by rounding | clipped ranges | quantize s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, row in res["rows"].items():
            cells = []
            for held in ("seen photos", "unseen photos"):
                a = row[held]
                lo, hi = a["agreement_ci"]
                cells += [f"{a['agreement'] * 100:.1f}% [{lo * 100:.1f}, {hi * 100:.1f}]", f"{a['kl']:.2e}"]
            lat = row.get("latency")
            speed = "error" if lat is None or lat["error"] else \
                f"{lat['speedup']:.2f}x [{lat['speedup_ci'][0]:.2f}, {lat['speedup_ci'][1]:.2f}]"
            rs = row["range_search"]
            clipped = "-" if not rs else f"{rs['tensors_clipped']} ({rs['tensor_error_reduction_db']:.1f} dB)"
            lines.append(f"| {label} | {' | '.join(cells)} | {speed} | {_refined(row)} | {clipped} | "
                         f"{row['seconds']:.0f} |")
        lines.append("")
    lines += ["`layers by rounding`: how many quantized Conv/Gemm layers kept each rounding (AdaRound keeps, "
              "per layer, the lower output error of AdaRound and GPTQ on the calibration statistics; layers "
              "with fewer data rows than inputs, the classifier here, stay nearest). `clipped ranges`: "
              "activation ranges the mse search set inside minmax, and the mean drop of their "
              "quantize-dequantize error on the calibration histograms.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=",".join(REAL_WEIGHTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=300.0, help="adaround_budget_s")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rounding.md"))
    ap.add_argument("--save", metavar="JSON", help="also save the results (to compose one page from several runs)")
    ap.add_argument("--compose", metavar="JSON", nargs="+", help="write the page from saved results, run nothing")
    args = ap.parse_args(argv)
    command = "python -m benchmarks.run_rounding " + " ".join(argv if argv is not None else sys.argv[1:])
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.compose:  # models measured by separate (concurrent) runs, each with its own command
        saved = [json.loads(pathlib.Path(p).read_text()) for p in args.compose]
        results = {arch: res for run in saved for arch, res in run["results"].items()}
        commands = "`; `".join(run["command"] for run in saved)
        text = _markdown(commands, saved[0]["stamp"], results, saved[0]["budget"])
        out.write_text(text)
        print(text)
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="run_rounding-") as name:
        for arch in [a for a in args.archs.split(",") if a]:
            results[arch] = run_arch(arch, pathlib.Path(name), args.budget, args.threads, args.runs, args.rounds)
            stamp = machine.stamp()
            text = _markdown(command.strip(), stamp, results, args.budget)
            out.write_text(text)  # after each model: a partial page survives an interrupted run
            if args.save:
                pathlib.Path(args.save).write_text(json.dumps(
                    {"command": command.strip(), "stamp": stamp, "budget": args.budget, "results": results},
                    default=_plain))
    print(text)
    return 0


def _plain(value):
    """JSON for numpy scalars and arrays in the saved results."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


if __name__ == "__main__":
    sys.exit(main())
