"""Weight refinement after QDQ insertion (deployopt.passes.quantize.refine): GPTQ rounding and bias
correction change only the integer weights and biases, and bring the int8 model closer to fp32."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from deployopt.passes.context import PassContext
from deployopt.core.data import ArrayDataset
from deployopt.core.errors import UserError
from deployopt.passes.quantize import refine as qrefine
from deployopt.passes.quantize import QuantizePass
from tests._fixtures import train_classifier


def _grid(q, s, z):
    return s[:, :, None] * (q - z[:, :, None])


def test_gptq_cuts_output_error_on_held_out_inputs_and_stays_on_the_grid():
    """Correlated inputs (32 features driven by 8 sources plus 10% noise, like neighbouring pixels of
    a patch): GPTQ's output error E‖ΔW x‖² on inputs it never saw is at least 2x below
    round-to-nearest, and every weight is an integer in range."""
    rng = np.random.default_rng(0)
    g, r, k = 2, 16, 32
    w = rng.normal(size=(g, r, k))
    mix = rng.normal(size=(g, k, 8))

    def inputs(n):
        return np.einsum("gkl,gnl->gnk", mix, rng.normal(size=(g, n, 8))) + 0.1 * rng.normal(size=(g, n, k))
    fit, held = inputs(4000), inputs(4000)
    hessian = np.einsum("gnk,gnl->gkl", fit, fit) / fit.shape[1]
    scale = np.abs(w).max(axis=2) / 127
    zero = np.zeros_like(scale)
    q = qrefine.gptq(w, scale, zero, -127, 127, hessian, damp=0.01)
    nearest = np.clip(np.round(w / scale[:, :, None]), -127, 127)
    assert np.array_equal(q, np.round(q)) and q.min() >= -127 and q.max() <= 127

    def error(qq):
        return float(np.sum(np.einsum("grk,gnk->gnr", _grid(qq, scale, zero) - w, held) ** 2))
    assert error(q) < 0.5 * error(nearest)


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    """Uncorrelated inputs of equal energy: no column can absorb another's error, so GPTQ must
    reduce to plain rounding (a check of the update's algebra)."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(1, 8, 16))
    scale, zero = np.abs(w).max(axis=2) / 127, np.zeros((1, 8))
    q = qrefine.gptq(w, scale, zero, -127, 127, np.eye(16)[None], damp=0.0)
    assert np.array_equal(q, np.clip(np.round(w / scale[:, :, None]), -127, 127))


# -- on a trained model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_model(digits):
    """A trained digits CNN with a depthwise layer (the case refinement is for), exported to ONNX."""
    x, y = digits
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU6(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),
                        nn.Conv2d(16, 24, 1), nn.ReLU6(),
                        nn.Flatten(), nn.Linear(24 * 64, 10))
    train_classifier(net, x[:1400], y[:1400], epochs=15)
    import io
    buf = io.BytesIO()
    torch.onnx.export(net.eval(), torch.zeros(1, 1, 8, 8), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue()), x, y


def _quantize(proto, x, **settings):
    p = QuantizePass(latency_aware=False, **settings)
    p.context = PassContext(calibration=ArrayDataset(x[:256]))
    result = p(ir.from_proto(proto))
    return ir.to_proto(result.model), result.details


def _logits(proto, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_refinement_changes_only_integer_values_and_brings_int8_closer_to_fp32(digits_model):
    proto, x, _ = digits_model
    plain, _ = _quantize(proto, x, rounding="nearest", bias_correction=False)
    refined, details = _quantize(proto, x)
    # The same graph, scales and zero points: only int8 weights and int32 biases differ.
    assert [(n.op_type, n.name, list(n.input)) for n in plain.graph.node] == \
        [(n.op_type, n.name, list(n.input)) for n in refined.graph.node]
    a = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in refined.graph.initializer}
    changed = {k for k in a if not np.array_equal(a[k], b[k])}
    assert changed and all(a[k].dtype in (np.int8, np.int32) for k in changed)
    assert all(np.array_equal(a[k], b[k]) for k in a if a[k].dtype == np.float32)
    r = details["refinement"]
    assert r["layers_gptq"] == 3 and r["layers_nearest"] == 1  # the Gemm: 64 samples < 1,536 inputs
    assert r["biases_corrected"] == 4 and r["weight_output_error_reduction_db"] > 1.0
    # On held-out digits the refined model is closer to fp32 (logit MSE).
    held = x[1400:]
    ref = _logits(proto, held)
    mse_plain = np.mean((_logits(plain, held) - ref) ** 2)
    mse_refined = np.mean((_logits(refined, held) - ref) ** 2)
    assert mse_refined < 0.99 * mse_plain  # activations dominate here; EfficientNet: benchmarks/results/quantize.md


def test_bias_correction_removes_the_mean_shift_of_the_weights(digits_model):
    """With round-to-nearest weights, bias correction alone makes the mean of every corrected
    layer's output over the calibration samples equal to fp32's up to activation quantization."""
    proto, x, _ = digits_model
    plain, _ = _quantize(proto, x, rounding="nearest", bias_correction=False)
    corrected, details = _quantize(proto, x, rounding="nearest")
    assert details["refinement"]["layers_gptq"] == 0 and details["refinement"]["biases_corrected"] == 4
    ref = _logits(proto, x[:64])
    shift_plain = np.abs((_logits(plain, x[:64]) - ref).mean(0)).mean()
    shift_corrected = np.abs((_logits(corrected, x[:64]) - ref).mean(0)).mean()
    assert shift_corrected < 0.7 * shift_plain


def test_refinement_off_leaves_onnxruntime_rounding(digits_model):
    proto, x, _ = digits_model
    q, details = _quantize(proto, x, rounding="nearest", bias_correction=False)
    assert "refinement" not in details
    init = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    w = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name, value in w.items():
        if value.ndim == 4 and name + "_quantized" in init:
            s = init[name + "_scale"].reshape(-1, 1, 1, 1)
            assert np.array_equal(init[name + "_quantized"], np.clip(np.round(value / s), -127, 127))


@pytest.mark.parametrize("settings, message", [
    ({"rounding": "adaround"}, "rounding: 'adaround' is not one of gptq, nearest"),
    ({"bias_correction": "yes"}, "bias_correction: expected bool, got 'yes'"),
    ({"refine_samples": 0}, "refine_samples: 0 is outside [1, inf)"),
    ({"fallback_rank": "kl"}, "fallback_rank: 'kl' is not one of sensitivity, sqnr"),
])
def test_bad_refinement_settings(settings, message):
    with pytest.raises(UserError) as e:
        QuantizePass(**settings)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("settings, low, high", [
    ({"reduce_range": True}, -64, 64),
    ({"per_channel": False}, -127, 127),
    ({"symmetric_weights": False}, -128, 127),
    ({"weight_type": "uint8", "symmetric_weights": False}, 0, 255),
])
def test_refined_weights_stay_in_the_quantizer_range(digits_model, settings, low, high):
    """GPTQ rounds on the grid onnxruntime chose (its scale, zero point and integer range), for
    every weight format, and the model still agrees with fp32."""
    proto, x, _ = digits_model
    q, details = _quantize(proto, x, **settings)
    assert details["refinement"]["layers_gptq"] == 3
    producer = {o: n for n in q.graph.node for o in n.output}
    init = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    weights = [init[producer[n.input[1]].input[0]] for n in q.graph.node if n.op_type in ("Conv", "Gemm")]
    assert weights and all(w.min() >= low and w.max() <= high for w in weights)
    held = x[1400:]
    assert np.mean(_logits(q, held).argmax(1) == _logits(proto, held).argmax(1)) >= 0.97


def test_bias_free_convolutions_get_a_fused_int32_bias(digits_model, tmp_path):
    """Conv without bias (conv + BatchNorm exports, bias=False layers): bias correction adds an int32
    bias in the form onnxruntime fuses, so the int8 kernel count is unchanged."""
    from deployopt.passes.quantize.kernels import ort_kernels

    proto, x, _ = digits_model
    bias_free = onnx.ModelProto()
    bias_free.CopyFrom(proto)
    for node in bias_free.graph.node:
        if node.op_type == "Conv":
            del node.input[2:]
    plain, _ = _quantize(bias_free, x, rounding="nearest", bias_correction=False)
    corrected, details = _quantize(bias_free, x, rounding="nearest")
    assert details["refinement"]["biases_corrected"] == 4  # 3 new Conv biases + the Gemm's own
    convs = [n for n in corrected.graph.node if n.op_type == "Conv"]
    assert all(len(n.input) == 3 and n.input[2].endswith("_bias_correction") for n in convs)
    kernels = {}
    for label, model in (("plain", plain), ("corrected", corrected)):
        onnx.save(model, tmp_path / f"{label}.onnx")
        kernels[label] = ort_kernels(tmp_path / f"{label}.onnx", tmp_path, 1)
    assert kernels["corrected"]["fused_int8"] == kernels["plain"]["fused_int8"]
    assert kernels["corrected"]["unfused_dequantize_linear"] == kernels["plain"]["unfused_dequantize_linear"]
    ref = _logits(bias_free, x[:64])
    shift = {label: np.abs((_logits(m, x[:64]) - ref).mean(0)).mean() for label, m in
             (("plain", plain), ("corrected", corrected))}
    assert shift["corrected"] < 0.7 * shift["plain"]


def test_layers_left_to_nearest_say_why(digits_model):
    proto, x, _ = digits_model
    _, details = _quantize(proto, x)
    assert list(details["refinement"]["nearest"].values()) == ["64 data rows < 1536 columns"]
