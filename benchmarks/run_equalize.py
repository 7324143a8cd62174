"""What range equalization (``passes/quantize/equalize.py``) buys: int8 fidelity with and without it.

    .venv/bin/python -m benchmarks.run_equalize [--work runs/equalize] [--out benchmarks/results/equalize.md]

EfficientNet-Lite0 and MobileNetV2 with real ImageNet weights, quantized by ``deployopt.optimize``
with the demo's passes (cleanup, quantize with ``calibration: auto``) on the demo's calibration
set, with ``latency_aware: false`` so that every form is all-int8 and the rows differ in the
equalization alone. Per model:

* the fp32 model equalized (the float function the int8 model is made from: equal on everything
  calibration saw, clipped per channel beyond it);
* int8 with ``equalize: false`` and with ``equalize: true``.

Fidelity against the fp32 export (``deployopt.evaluate``, onnxruntime, 1 thread): top-1 agreement
(Wilson 95% interval) and KL(fp32 || form) on the held-out crops of the calibration photos and on
the unseen photos of ``run_peers`` (132 crops of 6 photos no built-in dataset holds). No timing:
equalization changes no kernel (the same graph, the same int8 ops).
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from benchmarks import run_peers  # noqa: E402
from deployopt.core.data import open_dataset  # noqa: E402
from deployopt.measure import machine  # noqa: E402
from deployopt.passes.quantize.data import feeds, model_inputs  # noqa: E402
from deployopt.passes.quantize.equalize import HEADROOM, MAX_SCALE, equalize  # noqa: E402

MODELS = ("efficientnet_lite0", "mobilenet_v2")


def equalized_fp32(arch: str, fp32: pathlib.Path, out: pathlib.Path) -> dict:
    """The fp32 model equalized on the calibration set, as the quantize pass does; its summary."""
    proto = onnx.load(str(fp32))
    data = open_dataset({**run_peers.CALIBRATION, "preprocess": run_peers.PREPROCESS[arch]},
                        input_shape=run_peers.SHAPE)
    batches = (feed for feed, _ in feeds(data, model_inputs(proto), None, 8))
    equalized, summary = equalize(proto, batches, threads=1)
    onnx.save(equalized, str(out))
    return summary


def fidelity_cells(path: pathlib.Path, fp32: pathlib.Path, datasets: dict) -> list[str]:
    cells = []
    for spec in datasets.values():
        r = run_peers.fidelity_against(path, fp32, spec, "onnxruntime")
        if "error" in r:
            cells += [r["error"], ""]
            continue
        lo, hi = r["agreement_ci"]
        cells += [f"{100 * r['agreement']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]", f"{r['kl']:.4f}"]
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=pathlib.Path, default=ROOT / "runs" / "equalize")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "equalize.md")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.run_equalize " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    lines = ["# Range equalization: int8 fidelity with and without it", "",
             f"Machine: {machine.stamp_line(machine.stamp(runtimes=True))}", "", f"Command: `{command}`", "",
             f"Settings: HEADROOM {HEADROOM:g}, MAX_SCALE {MAX_SCALE:g} (equalize.py). "
             "Every int8 form: the demo's passes with `latency_aware: false` (all-int8). Agreement: top-1 with the "
             "fp32 export (Wilson 95% interval); KL(fp32 || form); held-out crops: the 'photos' train split (440 "
             "crops of the calibration photos); unseen photos: 132 crops of 6 photos no built-in dataset holds.", ""]
    for arch in MODELS:
        fp32 = run_peers.fp32_model(arch, args.work)
        preprocess = run_peers.PREPROCESS[arch]
        datasets = {"held-out": {**run_peers.HELD_OUT, "preprocess": preprocess},
                    "unseen": {"dataset": f"folder:{run_peers.unseen_photo_folder(args.work / 'unseen-photos')}",
                               "preprocess": preprocess}}
        run_peers.log(f"{arch}: equalizing the fp32 model")
        summary = equalized_fp32(arch, fp32, args.work / f"{arch}-equalized.onnx")
        rows = [("fp32, equalized", args.work / f"{arch}-equalized.onnx")]
        for on in (False, True):
            out = args.work / f"{arch}-int8-equalize={on}.onnx"
            if not out.exists():
                run_peers.log(f"{arch}: quantizing with equalize: {str(on).lower()}")
                run_peers.deployopt_int8(arch, fp32, out, latency_aware=False, equalize=on)
            rows.append((f"int8, equalize: {str(on).lower()}", out))
        lines += [f"## {arch}", "",
                  f"{summary['pairs']} depthwise inputs, {summary['channels_scaled']} of {summary['channels']} "
                  f"channels scaled (median x{summary.get('median_scale', 1):g}, at most "
                  f"x{summary.get('max_scale', 1):g}).", "",
                  "| form | agreement, held-out | KL held-out | agreement, unseen photos | KL unseen |",
                  "|---|---:|---:|---:|---:|"]
        for label, path in rows:
            run_peers.log(f"{arch}: fidelity of {label}")
            lines.append("| " + " | ".join([label, *fidelity_cells(path, fp32, datasets)]) + " |")
        lines.append("")
    lines.append(f"Wall time {time.time() - start:.0f} s.")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
