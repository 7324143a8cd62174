"""Range equalization of depthwise inputs (equalize.py): which chains it takes, that the float
function is unchanged (exactly through Relu, on everything calibration saw through ReLU6), that
every channel then reaches the common range, and what the quantize pass records."""

from __future__ import annotations


import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from deployopt.core.data import ArrayDataset
from deployopt.passes.context import PassContext
from deployopt.passes.quantize import QuantizePass
from deployopt.passes.quantize.equalize import MAX_SCALE, channel_maxima, equalize, pairs, scales_for
from tests._fixtures import digits_onnx

N_TRAIN = 1400


def _chain(activation: str, *, extra_reader: bool = False, dense: bool = False, shared: bool = False):
    """x [n,4,6,6] -> Conv 'expand' (4 -> 8, channel c scaled by 4^-c) -> activation -> Conv 'dw'
    (depthwise, or dense with ``dense``) -> y."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4, 1, 1)).astype(np.float32) * (4.0 ** -np.arange(8, dtype=np.float32))[:, None, None, None]
    b = rng.normal(size=8).astype(np.float32) * 0.1
    dw = rng.normal(size=(8, 8 if dense else 1, 3, 3)).astype(np.float32)
    act = {"relu": helper.make_node("Relu", ["c"], ["a"], name="act"),
           "relu6": helper.make_node("Clip", ["c", "zero", "six"], ["a"], name="act"),
           "clip_neg": helper.make_node("Clip", ["c", "minus", "six"], ["a"], name="act")}[activation]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="expand"), act,
             helper.make_node("Conv", ["a", "w" if shared else "dw"], ["y"], name="dw", group=1 if dense else 8,
                              pads=[1, 1, 1, 1])]
    outputs = ["y"]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["a"], ["z"], name="other"))
        outputs.append("z")
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(dw, "dw"),
             *(numpy_helper.from_array(np.array(v, np.float32), k) for k, v in
               {"zero": 0.0, "six": 6.0, "minus": -1.0}.items())]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(proto: onnx.ModelProto, x: np.ndarray, outputs=None) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {"x": x})


def test_the_chains_it_takes():
    assert [(p.producer, p.depthwise, p.tensor) for p in pairs(_chain("relu"))] == [("expand", "dw", "a")]
    assert len(pairs(_chain("relu6"))) == 1
    assert pairs(_chain("clip_neg")) == []  # a negative minimum is not positively homogeneous
    assert pairs(_chain("relu", extra_reader=True)) == []  # the other reader would see scaled channels
    assert pairs(_chain("relu", dense=True)) == []  # a dense conv mixes channels
    assert pairs(_chain("relu", shared=True)) == []  # 'w' is read twice (and is no depthwise weight)


def test_scales_reach_the_common_range_capped():
    np.testing.assert_allclose(scales_for(np.array([4.0, 2.0, 1.0, 0.0, 4.0 / 1000])), [1, 2, 4, 1, MAX_SCALE])


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_function_kept_and_channels_equalized(activation):
    rng = np.random.default_rng(1)
    calibration, unseen = rng.normal(size=(16, 4, 6, 6)).astype(np.float32), rng.normal(size=(16, 4, 6, 6))
    proto = _chain(activation)
    equalized, summary = equalize(proto, [{"x": calibration[:8]}, {"x": calibration[8:]}], threads=1)
    assert summary["pairs"] == 1 and summary["channels"] == 8 and summary["max_scale"] > 100 ** 0.5

    before = channel_maxima(proto, ["a"], [{"x": calibration}], 1)["a"]
    after = channel_maxima(equalized, ["a"], [{"x": calibration}], 1)["a"]
    expected = np.minimum(before * scales_for(before), before.max())
    np.testing.assert_allclose(after, expected, rtol=1e-5)  # every channel at the common range, or x32
    assert after.max() == pytest.approx(before.max(), rel=1e-6)

    np.testing.assert_allclose(_run(equalized, calibration)[0], _run(proto, calibration)[0], rtol=1e-4, atol=1e-5)
    if activation == "relu":  # exact on any input
        x = (unseen * 3).astype(np.float32)
        np.testing.assert_allclose(_run(equalized, x)[0], _run(proto, x)[0], rtol=1e-4, atol=1e-4)
    assert numpy_helper.to_array(proto.graph.initializer[0]).shape == (8, 4, 1, 1)  # input untouched


@pytest.fixture(scope="module")
def mobilenet_block(digits_shuffled):
    """Conv-ReLU6, then a MobileNet block (1x1 expand, ReLU6, depthwise 3x3, ReLU6, 1x1 project),
    then a Linear, trained on 1,400 digits; exported to ONNX."""
    x, y = digits_shuffled
    return digits_onnx(lambda: nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 32, 1), nn.ReLU6(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU6(), nn.Conv2d(32, 8, 1), nn.Flatten(),
        nn.Linear(8 * 64, 10)), x[:N_TRAIN], y[:N_TRAIN])


def test_quantize_pass_equalizes_and_says_so(mobilenet_block, digits_shuffled):
    x, _ = digits_shuffled
    results = {}
    for on in (True, False):
        p = QuantizePass(latency_aware=False, equalize=on)
        p.context = PassContext(calibration=ArrayDataset(x[:256]))
        result = p(ir.from_proto(mobilenet_block))
        results[on] = ir.to_proto(result.model), result
    (q, step), (plain, plain_step) = results[True], results[False]
    eq = step.details["equalization"]
    assert eq["pairs"] == 1 and eq["channels"] == 32 and eq["channels_scaled"] > 0
    assert any(n.startswith("equalized the channel ranges of 1 depthwise") for n in step.notes)
    assert "equalization" not in plain_step.details
    # Same graph and int8 kernels; the depthwise input's uint8 step is the only activation scale that
    # may differ by design, and the int8 model still agrees with float on unseen digits.
    assert [n.op_type for n in q.graph.node] == [n.op_type for n in plain.graph.node]
    held = x[N_TRAIN:]
    reference = _logits(mobilenet_block, held)
    assert np.mean(_logits(q, held).argmax(1) == reference.argmax(1)) >= 0.97


def _logits(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_per_tensor_weights_are_not_equalized(mobilenet_block, digits_shuffled):
    """Per-tensor weights would change with the scaled channels: the pass says it did nothing."""
    x, _ = digits_shuffled
    p = QuantizePass(latency_aware=False, equalize=True, per_channel=False)
    p.context = PassContext(calibration=ArrayDataset(x[:64]))
    result = p(ir.from_proto(mobilenet_block))
    assert "equalize: not applied, it needs per-channel weights (per_channel: true)" in result.notes
    assert "equalization" not in result.details
