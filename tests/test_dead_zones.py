"""Activation ranges cut to what their readers can tell apart (dead_zones.py): the rules on the
graph forms real exports write, the cases that must keep the whole range, and the cut through the
quantize pass on a digits-trained hardswish CNN (exact in function, finer int8 steps)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from deployopt.core.data import ArrayDataset
from deployopt.passes.context import PassContext
from deployopt.passes.quantize import QuantizePass, quantize_pass
from deployopt.passes.quantize.dead_zones import dead_zones
from tests._fixtures import digits_onnx

N_TRAIN = 1400


def _graph(nodes, *, outputs=("y",), scalars=None) -> onnx.ModelProto:
    """x [1,4,6,6] -> Conv -> 'c' -> ``nodes`` -> outputs, with scalar constants ``scalars``."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in (scalars or {}).items()]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), *nodes], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


PADDLE_HARDSWISH = [helper.make_node("Add", ["c", "three"], ["a"]),
                    helper.make_node("Clip", ["a", "zero", "six"], ["g"]),
                    helper.make_node("Mul", ["c", "g"], ["m"]),
                    helper.make_node("Div", ["m", "six"], ["h"]),
                    helper.make_node("Conv", ["h", "w"], ["y"])]
PADDLE_SCALARS = {"three": 3.0, "zero": 0.0, "six": 6.0}


def test_paddle_hardswish_input_is_cut_below_minus_three():
    bounds = dead_zones(_graph(PADDLE_HARDSWISH, scalars=PADDLE_SCALARS))
    assert bounds["c"] == (-3.0, math.inf)  # Add(+3) -> Clip(0, 6): [-3, 3]; Mul by a gate 0 below -3
    assert bounds["a"] == (0.0, 6.0)  # read by the Clip alone
    assert "h" not in bounds and "m" not in bounds and "y" not in bounds and "x" not in bounds


@pytest.mark.parametrize("nodes, expected", [
    ([helper.make_node("HardSigmoid", ["c"], ["g"], alpha=1 / 6, beta=0.5), helper.make_node("Mul", ["c", "g"], ["y"])],
     (-3.0, math.inf)),
    ([helper.make_node("HardSwish", ["c"], ["y"])], (-3.0, math.inf)),
    ([helper.make_node("Relu", ["c"], ["y"])], (0.0, math.inf)),
    # ReLU6 as older TensorFlow exports write it: the Max output is cut above 6, its input below 0
    ([helper.make_node("Max", ["c", "zero"], ["r"]), helper.make_node("Min", ["r", "six"], ["y"])], (0.0, math.inf)),
], ids=["hardsigmoid-mul", "hardswish", "relu", "max-min"])
def test_other_gates(nodes, expected):
    bounds = dead_zones(_graph(nodes, scalars=PADDLE_SCALARS))
    assert bounds["c"] == pytest.approx(expected, abs=1e-6)
    if nodes[0].op_type == "Max":
        assert bounds["r"] == (-math.inf, 6.0)


@pytest.mark.parametrize("case, nodes, outputs", [
    # a second reader that sees every value
    ("also read by a Conv", [*PADDLE_HARDSWISH, helper.make_node("Conv", ["c", "w"], ["y2"])], ("y", "y2")),
    # SiLU: x * sigmoid(x) is never exactly 0
    ("silu", [helper.make_node("Sigmoid", ["c"], ["g"]), helper.make_node("Mul", ["c", "g"], ["y"])], ("y",)),
    # the gate is not computed from the tensor it multiplies
    ("gate of another tensor", [helper.make_node("Relu", ["x"], ["g"]), helper.make_node("Mul", ["c", "g"], ["y"])],
     ("y",)),
    # a graph output is read by the user
    ("graph output", PADDLE_HARDSWISH, ("y", "c")),
])
def test_no_cut_where_a_reader_sees_the_values(case, nodes, outputs):
    assert "c" not in dead_zones(_graph(nodes, outputs=outputs, scalars=PADDLE_SCALARS)), case


# -- through the quantize pass ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hardswish_proto(digits) -> onnx.ModelProto:
    """Conv-Hardswish-Conv-Hardswish-Linear trained on 1,400 digits, exported at opset 17 (one
    HardSwish node per activation; pre-processing inlines it into HardSigmoid + Mul)."""
    x, y = digits
    return digits_onnx(lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.Hardswish(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.Hardswish(),
        nn.Flatten(), nn.Linear(32 * 16, 10)), x[:N_TRAIN], y[:N_TRAIN])


def _paddle_form(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every HardSwish node written as Paddle's exporter writes it: x * Clip(x + 3, 0, 6) / 6."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = []
    for i, node in enumerate(out.graph.node):
        if node.op_type != "HardSwish":
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        nodes += [helper.make_node("Add", [x, "three"], [f"hs{i}_add"], name=f"hs{i}_add"),
                  helper.make_node("Clip", [f"hs{i}_add", "zero", "six"], [f"hs{i}_clip"], name=f"hs{i}_clip"),
                  helper.make_node("Mul", [x, f"hs{i}_clip"], [f"hs{i}_mul"], name=f"hs{i}_mul"),
                  helper.make_node("Div", [f"hs{i}_mul", "six"], [y], name=f"hs{i}_div")]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), k) for k, v in PADDLE_SCALARS.items())
    return out


def _quantize(proto: onnx.ModelProto, cal) -> tuple[onnx.ModelProto, object]:
    p = QuantizePass(latency_aware=False)
    p.context = PassContext(calibration=cal)
    result = p(ir.from_proto(proto))
    return ir.to_proto(result.model), result


def _conv_output_scales(proto: onnx.ModelProto) -> list[float]:
    """Scales of the QuantizeLinear nodes reading a Conv output, in graph order."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    conv_out = {n.output[0] for n in proto.graph.node if n.op_type == "Conv"}
    return [float(inits[n.input[1]]) for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in conv_out]


def _logits(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]


def _conv_output_lows(proto: onnx.ModelProto, x: np.ndarray) -> list[float]:
    """The float model's lowest value of each Conv output on ``x``, in graph order."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    convs = [n.output[0] for n in probe.graph.node if n.op_type == "Conv"]
    probe.graph.output.extend(onnx.ValueInfoProto(name=c) for c in convs)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return [float(v.min()) for v in session.run(convs, {"input": x})]


@pytest.mark.parametrize("form", ["hardswish node", "paddle"])
def test_cut_ranges_through_the_quantize_pass(hardswish_proto, digits, monkeypatch, form):
    """The second conv output reaches below -4 on the calibration digits (the first stays above -3):
    cut, its range starts at -3, so its int8 step is finer by the ratio of the range widths, the
    first conv's is unchanged, and the int8 model's output error on 397 unseen digits is lower
    than with the calibrated ranges (and so is its local SQNR in the report)."""
    x, _ = digits
    proto = hardswish_proto if form == "hardswish node" else _paddle_form(hardswish_proto)
    cal = ArrayDataset(x[:256])
    lows = _conv_output_lows(proto, x[:256])
    assert lows[0] > -3 > lows[1] + 1  # the premise: the second range reaches past -4
    cut, step = _quantize(proto, cal)
    # Paddle's form also cuts the second Add(+3) output, read by Clip(0, 6) alone, to [0, 6]
    cuts = 1 if form == "hardswish node" else 2
    cut_ranges = step.details["calibration"]["ranges_cut_to_readers"]
    assert len(cut_ranges) == cuts
    assert any(f"{cuts} calibration ranges cut to the values their readers can tell apart" in n for n in step.notes)
    monkeypatch.setattr(quantize_pass, "dead_zones", lambda proto: {})
    whole, whole_step = _quantize(proto, cal)
    assert whole_step.details["calibration"]["ranges_cut_to_readers"] == {}
    (c0, c1), (w0, w1) = _conv_output_scales(cut), _conv_output_scales(whole)
    assert c0 == w0
    # scale = (hi - lo) / 255 with the range widened to hold 0: lo -3 instead of the calibrated low
    high = w1 * 255 + lows[1]
    assert c1 == pytest.approx((high + 3) / 255, rel=1e-4)
    conv2 = [n.output[0] for n in proto.graph.node if n.op_type == "Conv"][1]
    assert cut_ranges[conv2] == pytest.approx(c1 / w1, abs=1e-4)  # the step ratio the report gives
    # the report's local SQNR does not count the cut (values below -3 read as -3) as noise
    local_cut, local_whole = ({r["tensor"]: r["sqnr_db"] for r in s.details["worst_sqnr"]} for s in (step, whole_step))
    assert local_cut[conv2] > local_whole[conv2]
    unseen = x[N_TRAIN:]
    ref = _logits(proto, unseen)
    err_cut, err_whole = (float(np.linalg.norm(_logits(q, unseen) - ref)) for q in (cut, whole))
    assert err_cut < err_whole
