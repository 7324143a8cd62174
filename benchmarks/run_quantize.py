"""Published numbers for the ``quantize`` pass: fp32 vs onnxruntime ``quantize_static`` with its
defaults vs deployopt, side by side in one run.

    .venv/bin/python -m benchmarks.run_quantize [--threads 1,2] [--runs 20] [--rounds 3]
        [--samples 110] [--memory-samples 64,1024] [--out benchmarks/results/quantize.md]

1. Builds ResNet-18 and MobileNetV2 (seeded random init: latency does not depend on the weights)
   and EfficientNet-Lite0 with its real ImageNet weights (models.build), exports each at
   1x3x224x224 with a dynamic batch (deployopt.models.export).
2. Quantizes each twice from the same ``--samples`` calibration images: ``quantize_static(fp32,
   out, reader)`` with every other argument at its default (what a user gets from the docs'
   first call), and ``QuantizePass()`` with its defaults. Calibration images: 'photos' crops
   (imagenet preprocessing; efficientnet-lite preprocessing for EfficientNet-Lite0, and only the
   crops of the 5 scikit-image photos, so no ImageNet sample used for scoring is calibrated on).
3. Times the three models of each architecture with ``deployopt.measure.latency.compare`` (separate
   worker processes, interleaved rounds, speedup = p50 ratio with a bootstrap 95% interval), at
   batch 1 and each ``--threads``; counts the fused int8 kernels vs unfused Q/DQ nodes in the
   graph onnxruntime runs.
4. EfficientNet-Lite0 accuracy (deployopt.measure.accuracy): top-1 agreement with fp32 on the 'photos'
   crops not used for calibration, and top-1 on the 20 labelled 'imagenet-samples'.
5. Memory: the deployopt pass on ResNet-18 run in a fresh process per calibration size in
   ``--memory-samples`` (minmax, batches of 8; 'photos' repeated to reach 1,024), reporting the
   highest RSS sampled while calibration ran and the process's peak RSS over the whole pass.

Writes ``benchmarks/results/quantize.md`` with the machine stamp and the command, and prints it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deployopt.measure import machine  # noqa: E402
from deployopt.core.data import Dataset, open_dataset  # noqa: E402

SHAPE = (1, 3, 224, 224)
ARCHS = ("resnet18", "mobilenet_v2", "efficientnet_lite0")
PREPROCESS = {"resnet18": "imagenet", "mobilenet_v2": "imagenet", "efficientnet_lite0": "efficientnet-lite"}
# 'photos' lists 22 crop variants of 25 photos, photo-major within each variant (deployopt.core.data):
# the first 5 of every 25 are the scikit-image photos, the other 20 the ImageNet samples.
PHOTOS_PER_VARIANT, SKIMAGE_PHOTOS = 25, 5


class _Subset(Dataset):
    """The samples of ``base`` whose position passes ``keep`` (streamed), repeated ``repeat`` times."""

    def __init__(self, base: Dataset, keep, repeat: int = 1, name: str = ""):
        self.base, self.keep, self.repeat = base, keep, repeat
        self.name = name or base.name
        self.labeled, self.sample_shape = base.labeled, base.sample_shape
        self._n = sum(1 for i in range(len(base)) if keep(i)) * repeat

    def __len__(self) -> int:
        return self._n

    def batches(self, batch_size: int = 32):
        for _ in range(self.repeat):
            start = 0
            for x, y in self.base.batches(batch_size):
                mask = np.array([self.keep(start + i) for i in range(len(x))])
                start += len(x)
                if mask.any():
                    yield x[mask], None if y is None else y[mask]


def _calibration(arch: str, limit: int | None = None) -> Dataset:
    photos = open_dataset({"dataset": "photos", "preprocess": PREPROCESS[arch]}, input_shape=SHAPE)
    if arch == "efficientnet_lite0":
        return _Subset(photos, lambda i: i % PHOTOS_PER_VARIANT < SKIMAGE_PHOTOS, name="photos (scikit-image crops)")
    return photos


class _Reader:
    """A CalibrationDataReader over the first ``n`` samples, one sample per call (the docs' way)."""

    def __init__(self, dataset: Dataset, n: int, input_name: str):
        self._it = (x[i:i + 1] for x, _ in dataset.batches(8) for i in range(len(x)))
        self.n, self.name, self.done = n, input_name, 0

    def get_next(self):
        if self.done >= self.n:
            return None
        x = next(self._it, None)
        self.done += 1
        return None if x is None else {self.name: x}


def _prepare(arch: str, tmp: pathlib.Path, samples: int) -> dict:
    from onnxruntime.quantization import quantize_static

    from deployopt import models
    from deployopt.core import io
    from deployopt.passes.context import PassContext
    from deployopt.models.export import export_model
    from deployopt.passes.quantize import QuantizePass
    from deployopt.passes.quantize.kernels import ort_kernels

    kwargs = {"pretrained": True} if arch == "efficientnet_lite0" else {}
    fp32 = tmp / f"{arch}.onnx"
    export_model(models.build(arch, **kwargs), fp32, SHAPE, dynamic_batch=True)
    cal = _calibration(arch)
    t0 = time.perf_counter()
    ort_default = tmp / f"{arch}-ort-default.onnx"
    quantize_static(str(fp32), str(ort_default), _Reader(cal, samples, "input"))
    ort_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = QuantizePass(samples=samples)
    p.context = PassContext(calibration=cal, work_dir=tmp)
    ours = tmp / f"{arch}-deployopt.onnx"
    result = p(io.load(fp32))
    io.save(result.model, ours)
    ours_seconds = time.perf_counter() - t0
    paths = {"fp32": fp32, "ort-default": ort_default, "deployopt": ours}
    if arch == "efficientnet_lite0":  # what the weight refinement buys: the same pass without it
        plain = QuantizePass(samples=samples, rounding="nearest", bias_correction=False)
        plain.context = PassContext(calibration=cal, work_dir=tmp)
        paths["deployopt-nearest"] = tmp / f"{arch}-deployopt-nearest.onnx"
        io.save(plain(io.load(fp32)).model, paths["deployopt-nearest"])
    kernels = {label: ort_kernels(path, tmp, 1) for label, path in
               (("fp32", fp32), ("ort-default", ort_default), ("deployopt", ours))}
    return {"paths": paths,
            "kernels": kernels, "seconds": {"ort-default": ort_seconds, "deployopt": ours_seconds},
            "details": result.details, "bytes": {k: pathlib.Path(v).stat().st_size for k, v in
                                                    (("fp32", fp32), ("ort-default", ort_default),
                                                     ("deployopt", ours))}}


def _latency(arch: str, paths: dict, threads, runs: int, rounds: int):
    from deployopt.measure.latency import compare

    labels = ["fp32", "ort-default", "deployopt"]
    return compare([paths[k] for k in labels], labels=[f"{arch} {k}" for k in labels],
                   threads=threads, batch=(1,), warmup=5, runs=runs, rounds=rounds, progress=False)


def _efficientnet_accuracy(paths: dict) -> dict:
    from deployopt.measure.accuracy import evaluate

    photos = open_dataset({"dataset": "photos", "preprocess": "efficientnet-lite"}, input_shape=SHAPE)
    held_out = _Subset(photos, lambda i: i % PHOTOS_PER_VARIANT >= SKIMAGE_PHOTOS,
                       name="photos (crops of the 20 ImageNet samples)")
    labelled = open_dataset({"dataset": "imagenet-samples", "preprocess": "efficientnet-lite"}, input_shape=SHAPE)
    out = {}
    for label in [k for k in paths if k != "fp32"]:
        agree = evaluate(paths[label], held_out, reference_path=paths["fp32"], progress=False)
        top1 = evaluate(paths[label], labelled, progress=False)
        out[label] = {"n": agree["n"], "agreement": agree["agreement"], "agreement_ci": agree["agreement_ci"],
                      "cosine": agree["cosine"], "kl": agree["kl"], "top1": top1["top1"],
                      "n_labelled": top1["n"]}
    out["fp32"] = {"top1": evaluate(paths["fp32"], labelled, progress=False)["top1"]}
    return out


def _memory_child(model: str, samples: int) -> None:
    """Run in a fresh process: the pass on ``model`` with ``samples`` calibration samples."""
    from deployopt.core import io
    from deployopt.passes.context import PassContext
    from deployopt.passes.quantize import QuantizePass

    photos = open_dataset({"dataset": "photos", "preprocess": "imagenet"}, input_shape=SHAPE)
    repeat = -(-samples // len(photos))
    cal = _Subset(photos, lambda i: True, repeat=repeat, name=f"photos x{repeat}")
    p = QuantizePass(samples=samples, batch_size=8)
    p.context = PassContext(calibration=cal, work_dir=pathlib.Path(model).parent)
    d = p(io.load(model)).details
    print(json.dumps({"samples": d["calibration"]["samples"], "calibration_seconds": d["calibration"]["seconds"],
                      "calibration_rss_mb": d["calibration"]["rss_peak_during_mb"], "peak_rss_mb": d["peak_rss_mb"]}))


def _memory(model: pathlib.Path, sizes) -> list[dict]:
    rows = []
    for n in sizes:
        done = subprocess.run([sys.executable, "-m", "benchmarks.run_quantize", "--memory-child", str(model), str(n)],
                              cwd=ROOT, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


NOTES = """## Notes on onnxruntime 1.32 that the pass works around

* Calibration memory: the pass feeds onnxruntime's own calibrators one batch at a time and lets
  them merge (minmax: elementwise min/max; percentile/entropy/distribution: histogram bins), so
  memory is bounded by one batch. `quantize_static`'s `CalibMaxIntermediateOutputs` is meant for
  this but in 1.32 clears each full chunk without merging it into the range
  (`MinMaxCalibrater.collect_data`), so it is not used. Handing `quantize_static` one reader over
  all samples makes the histogram calibrators keep every intermediate tensor of every sample.
* The histogram calibrators stack a chunk's outputs with `np.asarray`; a chunk that mixes batch
  sizes (a short last batch) fails (onnxruntime#11928). Chunks never mix shapes.
* The QDQ quantizer removes a Relu/Clip after a quantized node whenever activations are
  asymmetric, letting the output range do the clamping, without checking that the range starts
  at the clamp. 'distribution' calibration gives symmetric ranges, so a removed Relu lets negative
  values through; the pass clamps Relu/Clip output ranges to the activation's bounds first
  (tests/test_quantize.py::test_every_calibration_method checks the result against fp32).
"""


def _fmt_kernels(k: dict) -> str:
    fused = ", ".join(f"{op} {n}" for op, n in k["fused_int8"].items()) or "none"
    return f"{fused} | {k['unfused_quantize_linear']} / {k['unfused_dequantize_linear']}"


def _markdown(command: str, stamp: dict, arch_results: dict, accuracy: dict | None, memory: list | None) -> str:
    lines = ["# Static int8 quantization: fp32 vs quantize_static defaults vs deployopt", "",
             f"Machine: {machine.stamp_line(stamp)}", "", f"Command: `{command}`", "",
             "Models at 1x3x224x224, batch 1, onnxruntime CPU, graph optimization ORT_ENABLE_ALL, "
             "separate worker processes, interleaved rounds. speedup = p50(fp32) / p50(model) with a "
             "bootstrap 95% interval over rounds. `ort-default` is `quantize_static(fp32, out, reader)` "
             "with every other argument at its default (QDQ, int8 activations and weights, per-tensor); "
             "`deployopt` is `QuantizePass()` (QDQ, uint8 activations, int8 per-channel weights, "
             "quant_pre_process, minmax, GPTQ rounding and bias correction of the int8 weights). "
             "Both calibrate on the same images.", ""]
    lines += ["## Latency", "", "| model | threads | p50 ms | p90 ms | speedup vs fp32 [95% CI] | vs ort-default |",
              "|---|---|---|---|---|---|"]
    for arch, res in arch_results.items():
        rows = res["bench"].rows
        for t in sorted({r["threads"] for r in rows}):
            by = {r["model"].split(" ", 1)[1]: r for r in rows if r["threads"] == t}
            for label in ("fp32", "ort-default", "deployopt"):
                r = by[label]
                if r["error"]:
                    lines.append(f"| {arch} {label} | {t} | error: {r['error']} | | | |")
                    continue
                ci = r["speedup_ci"]
                vs = by["ort-default"]["p50_ms"] / r["p50_ms"] if not by["ort-default"]["error"] else float("nan")
                lines.append(f"| {arch} {label} | {t} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                             f"{r['speedup']:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}] | {vs:.2f}x |")
    lines += ["", "## What onnxruntime runs (after its graph optimization)", "",
              "| model | fused int8 kernels | unfused QuantizeLinear / DequantizeLinear | file MB | quantize s |",
              "|---|---|---|---|---|"]
    for arch, res in arch_results.items():
        for label in ("ort-default", "deployopt"):
            lines.append(f"| {arch} {label} | {_fmt_kernels(res['kernels'][label])} | "
                         f"{res['bytes'][label] / 1e6:.1f} | {res['seconds'][label]:.1f} |")
        lines.append(f"| {arch} fp32 | - | - | {res['bytes']['fp32'] / 1e6:.1f} | - |")
    lines += ["", "deployopt's float leftovers per model: " + "; ".join(
        f"{arch}: " + (", ".join(f"{e['node']} ({e['reason']})" for e in res["details"]["float_nodes"]) or "none")
        for arch, res in arch_results.items()), ""]
    if accuracy:
        lines += ["## EfficientNet-Lite0 (real ImageNet weights)", "",
                  "Fidelity to fp32 on the held-out 'photos' crops (the 20 ImageNet samples' crops; "
                  "calibration saw only the scikit-image photos' crops). `deployopt-nearest` is the same "
                  "pass with `rounding: nearest, bias_correction: false` (onnxruntime's round-to-nearest "
                  "weights): the difference is what the weight refinement buys.", "",
                  "| model | top-1 agreement with fp32 [95% CI] | mean cosine | KL | top-1 on imagenet-samples |",
                  "|---|---|---|---|---|"]
        fp32 = accuracy["fp32"]["top1"]
        n_l = accuracy["deployopt"]["n_labelled"]
        lines.append(f"| fp32 | - | - | - | {fp32 * n_l:.0f}/{n_l} |")
        for label in [k for k in accuracy if k != "fp32"]:
            a = accuracy[label]
            lo, hi = a["agreement_ci"]
            lines.append(f"| {label} | {a['agreement'] * 100:.1f}% of {a['n']} [{lo * 100:.1f}, {hi * 100:.1f}] | "
                         f"{a['cosine']:.5f} | {a['kl']:.2e} | {a['top1'] * n_l:.0f}/{n_l} |")
        lines.append("")
    if memory:
        base = memory[0]
        lines += ["## Calibration memory (ResNet-18, deployopt minmax, batches of 8, fresh process each)", "",
                  "| calibration samples | calibration s | peak RSS during calibration MB | ratio | process peak RSS, whole pass MB |",
                  "|---|---|---|---|---|"]
        for m in memory:
            lines.append(f"| {m['samples']} | {m['calibration_seconds']:.1f} | {m['calibration_rss_mb']:.0f} | "
                         f"{m['calibration_rss_mb'] / base['calibration_rss_mb']:.2f}x | {m['peak_rss_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def latency_page(text: str) -> str:
    """benchmarks/results/latency.md: the machine stamp, the command and
    the latency section of quantize.md, from the same run."""
    head, _, rest = text.partition("## Latency")
    table = rest.split("\n## ", 1)[0]
    head = head.replace("# Static int8 quantization: fp32 vs quantize_static defaults vs deployopt",
                        "# Latency on this CPU: fp32 vs onnxruntime quantize_static defaults vs deployopt", 1)
    return head + "## Latency" + table.rstrip() + "\n\nMore (fused kernels, accuracy, calibration memory): quantize.md\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=110)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--memory-samples", default="64,1024", help="'' to skip the memory runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantize.md"))
    ap.add_argument("--memory-child", nargs=2, metavar=("MODEL", "SAMPLES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        _memory_child(args.memory_child[0], int(args.memory_child[1]))
        return 0
    threads = tuple(int(t) for t in args.threads.split(","))
    archs = [a for a in args.archs.split(",") if a]
    command = "python -m benchmarks.run_quantize " + " ".join(argv if argv is not None else sys.argv[1:])
    results, accuracy, memory = {}, None, None
    with tempfile.TemporaryDirectory(prefix="run_quantize-") as name:
        tmp = pathlib.Path(name)
        for arch in archs:
            print(f"[{arch}] export + quantize", file=sys.stderr)
            results[arch] = _prepare(arch, tmp, args.samples)
            print(f"[{arch}] latency", file=sys.stderr)
            results[arch]["bench"] = _latency(arch, results[arch]["paths"], threads, args.runs, args.rounds)
        if "efficientnet_lite0" in results:
            print("[efficientnet_lite0] accuracy", file=sys.stderr)
            accuracy = _efficientnet_accuracy(results["efficientnet_lite0"]["paths"])
        sizes = [int(s) for s in args.memory_samples.split(",") if s]
        if sizes and "resnet18" in results:
            print(f"[resnet18] calibration memory {sizes}", file=sys.stderr)
            memory = _memory(results["resnet18"]["paths"]["fp32"], sizes)
        text = _markdown(command.strip(), machine.stamp(), results, accuracy, memory)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text += "\n" + NOTES
    out.write_text(text)
    (out.parent / "latency.md").write_text(latency_page(text))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
