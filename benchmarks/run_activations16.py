"""Should quantize put 16-bit activations on its most damaging tensors? Measured on both runtimes.

    .venv/bin/python -m benchmarks.run_activations16 [--counts 4 12] [--runs 40] [--rounds 5]
        [--out benchmarks/results/activations16.md]

EfficientNet-Lite0 with its real ImageNet weights (the demo's export), quantized by onnxruntime's
``quantize_static`` (QDQ, uint8 activations, int8 per-channel weights, ``reduce_range`` as deployopt
chooses for this CPU, MinMax ranges) on the demo's calibration crops ('photos' split test). Its
activation tensors are ranked by the output error each one's quantization adds
(``passes.quantize.sensitivity``, on 32 calibration crops), and for the ``K`` most damaging:

* ``uint16 x K``: the same call with ``TensorQuantOverrides`` giving those tensors uint16
  (onnxruntime's quantizer then raises the model to opset 21, whose QuantizeLinear has 16 bits);
* ``float x K``: the uint8 model with those tensors' Q/DQ pairs removed (``sensitivity.without``),
  so their readers run in float. Like the uint16 form's readers, they still read their int8
  weights through DequantizeLinear (quantize's fallback instead excludes the nodes from
  quantization, so their weights stay float: fallback.md measures that).

Every form is timed on onnxruntime's CPU EP and on the OpenVINO runtime in one
``deployopt.measure.latency.compare`` run (worker per entry, interleaved rounds, 1 thread, batch
1; speedup = p50(fp32 on onnxruntime) / p50(entry)), and its top-1 agreement and KL against fp32
(run on the same runtime) measured on the 440 held-out crops ('photos' split train).
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from benchmarks import run_peers  # noqa: E402
from deployopt.measure import machine  # noqa: E402
from deployopt.measure.latency import compare  # noqa: E402
from deployopt.passes.quantize.cpu import auto_reduce_range  # noqa: E402
from deployopt.passes.quantize.report import folded_activations  # noqa: E402
from deployopt.passes.quantize.sensitivity import most_sensitive, pairs, tensor_sensitivity, without  # noqa: E402

ARCH = "efficientnet_lite0"
SENSITIVITY_SAMPLES = 32


def quantize(fp32: pathlib.Path, out: pathlib.Path, samples: list[np.ndarray], uint16: list[str]) -> None:
    """onnxruntime's U8S8 per-channel QDQ, with ``uint16`` activations on the named tensors."""
    from onnxruntime.quantization import QuantFormat, QuantType

    reduce_range, _ = auto_reduce_range()
    overrides = {t: [{"quant_type": QuantType.QUInt16}] for t in uint16}
    run_peers.ort_quantize(fp32, out, samples, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                           weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                           extra_options={"TensorQuantOverrides": overrides} if overrides else {})


def in_float(fp32: pathlib.Path, qdq: pathlib.Path, out: pathlib.Path, tensors: list[str]) -> None:
    """``qdq`` with the Q/DQ pairs of ``tensors`` removed (their readers run in float)."""
    model = onnx.load(str(qdq))
    folded = folded_activations(onnx.load(str(fp32)), model)
    for tensor in tensors:
        q, dqs = pairs(model)[tensor]
        model = without(model, tensor, q, dqs, folded.get(tensor))
    onnx.save(model, str(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[4, 12], help="how many tensors get 16 bits or float")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", help="keep the models in this folder (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "activations16.md"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        fp32 = run_peers.fp32_model(ARCH, work)
        samples = run_peers.calibration_samples(ARCH)
        base = work / f"{ARCH}-uint8.onnx"
        quantize(fp32, base, samples, [])
        name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
        feeds = [{name: x} for x in samples[:SENSITIVITY_SAMPLES]]
        ranked = most_sensitive(tensor_sensitivity(fp32, base, feeds, threads=2))
        forms = {"fp32": fp32, "uint8": base}
        for k in args.counts:
            forms[f"uint16 x {k}"] = work / f"{ARCH}-uint16-{k}.onnx"
            quantize(fp32, forms[f"uint16 x {k}"], samples, ranked[:k])
            forms[f"float x {k}"] = work / f"{ARCH}-float-{k}.onnx"
            in_float(fp32, base, forms[f"float x {k}"], ranked[:k])
        entries = [(label, path, runtime) for runtime in ("onnxruntime", "openvino") for label, path in forms.items()]
        result = compare([p for _, p, _ in entries], labels=[f"{label} [{rt}]" for label, _, rt in entries],
                         targets=[(rt, None) for _, _, rt in entries], threads=(1,), batch=(1,), runs=args.runs,
                         rounds=args.rounds, warmup=10, progress=False).to_dict()
        rows = {r["model"]: r for r in result["rows"]}
        held_out = {**run_peers.HELD_OUT, "preprocess": run_peers.PREPROCESS[ARCH]}
        scores = {(label, runtime): run_peers.fidelity_against(path, fp32, held_out, runtime)
                  for label, path, runtime in entries if label != "fp32"}
        lines = _table(entries, rows, scores, ranked, args.counts)
        lines += ["", f"Latency warnings: {'; '.join(result.get('warnings') or []) or 'none'}"]
    stamp = machine.stamp(runtimes=True)
    command = "python -m benchmarks.run_activations16 " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(["# 16-bit activations on the most damaging tensors, against returning them to float", "",
                      f"Machine: {machine.stamp_line(stamp)}", "", f"Command: `{command.strip()}`", "",
                      "\n\n".join(__doc__.split("\n\n")[2:]).strip(), "", *lines, ""])
    pathlib.Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


def _table(entries: list, rows: dict, scores: dict, ranked: list[str], counts: list[int]) -> list[str]:
    lines = [f"Tensors by output sensitivity, most damaging first: {', '.join(ranked[:max(counts)])}", "",
             "| form | runtime | p50 ms | speedup vs fp32 on onnxruntime [95% CI] | agreement, held-out (n=440) | KL |",
             "|---|---|---:|---:|---:|---:|"]
    for label, _, runtime in entries:
        row = rows.get(f"{label} [{runtime}]", {})
        speed = (f"{row['speedup']:.2f}x [{row['speedup_ci'][0]:.2f}, {row['speedup_ci'][1]:.2f}]"
                 if row.get("speedup") else row.get("error", "-"))
        p50 = f"{row['p50_ms']:.2f}" if row.get("p50_ms") else "-"
        if label == "fp32":
            agreement, kl = "reference", "0"
        else:
            f = scores[(label, runtime)]
            agreement = f.get("error") or f"{f['agreement']:.1%}"
            kl = f"{f['kl']:.4f}" if "kl" in f else ""
        lines.append(f"| {label} | {runtime} | {p50} | {speed} | {agreement} | {kl} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
