"""Weight refinement after QDQ insertion (deployopt.passes.quantize.refine): GPTQ rounding and bias
correction change only the integer weights and biases, and bring the int8 model closer to fp32."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from torch import nn

from deployopt.passes.context import PassContext
from deployopt.core.data import ArrayDataset
from deployopt.core.errors import UserError
from deployopt.passes.quantize import refine as qrefine
from deployopt.passes.quantize import QuantizePass
from tests._fixtures import digits_onnx


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
    proto = digits_onnx(lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),
        nn.Conv2d(16, 24, 1), nn.ReLU6(), nn.Flatten(), nn.Linear(24 * 64, 10)), x[:1400], y[:1400])
    return proto, x, y


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
    ({"rounding": "stochastic"}, "rounding: 'stochastic' is not one of gptq, nearest, adaround"),
    ({"bias_correction": "yes"}, "bias_correction: expected bool, got 'yes'"),
    ({"refine_samples": 0}, "refine_samples: 0 is outside [1, inf)"),
    ({"fallback_rank": "kl"}, "fallback_rank: 'kl' is not one of sensitivity, sqnr, depth"),
])
def test_bad_refinement_settings(settings, message):
    with pytest.raises(UserError) as e:
        QuantizePass(**settings)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("settings, low, high, depthwise", [
    ({"reduce_range": True}, -64, 64, (-127, 127)),  # depthwise weights keep 8 bits (cpu.py)
    ({"per_channel": False}, -127, 127, None),
    ({"symmetric_weights": False}, -128, 127, None),
    ({"weight_type": "uint8", "symmetric_weights": False}, 0, 255, None),
])
def test_refined_weights_stay_in_the_quantizer_range(digits_model, settings, low, high, depthwise):
    """GPTQ rounds on the grid onnxruntime chose (its scale, zero point and integer range), for
    every weight format, and the model still agrees with fp32. Whether GPTQ or nearest wins on a
    layer depends on the trained weights (the depthwise layer can go either way), so the test asks
    that GPTQ ran on most layers and that every layer lands in range whichever rounding won."""
    proto, x, _ = digits_model
    q, details = _quantize(proto, x, **settings)
    refinement = details["refinement"]
    assert refinement["layers_gptq"] >= 2 and refinement["layers_gptq"] + refinement["layers_nearest"] == 4
    producer = {o: n for n in q.graph.node for o in n.output}
    init = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    ranges = {}
    for n in q.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            grouped = any(a.name == "group" and a.i > 1 for a in n.attribute)
            ranges[n.name] = (init[producer[n.input[1]].input[0]], depthwise if grouped and depthwise else (low, high))
    assert len(ranges) == 4 and all(lo <= w.min() and w.max() <= hi for w, (lo, hi) in ranges.values())
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


# -- learned rounding (AdaRound) and range search (calibration: mse) ----------------------------------
def _digit_patches(images):
    """3x3 im2col patches (padding 1) of 8x8 digit images: a convolution's input rows."""
    from deployopt.passes.reconstruct import conv_patches
    return np.concatenate([conv_patches(images[i:i + 1], (3, 3), pads=(1, 1, 1, 1))[0]
                           for i in range(len(images))]).astype(np.float64)


def test_adaround_cuts_a_convolutions_output_error_on_held_out_digits(digits):
    """A 3x3 convolution (16 outputs, 7-bit weights) on digit patches: AdaRound learned on 200
    images' statistics has an output error on 400 other images below 0.6x round-to-nearest
    (measured 0.42x; GPTQ 0.54x), and every weight is the floor or the ceiling of w / s."""
    from deployopt.passes.quantize import rounding as qrounding
    x, _ = digits
    fit, held = _digit_patches(x[:200]), _digit_patches(x[1000:1400])
    w = np.random.default_rng(0).normal(size=(1, 16, 9)) * 0.3
    scale, zero = np.abs(w).max(axis=2) / 63, np.zeros((1, 16))
    hessian = (fit.T @ fit / len(fit))[None]
    out = qrounding.adaround(w, scale, zero, -64, 63, qrounding.damped(hessian, qrefine.DAMP), iterations=1000, reg=3.0)
    nearest = np.clip(np.round(w / scale[:, :, None]), -64, 63)

    def error(q):
        return float(np.mean((held @ (_grid(q, scale, zero) - w)[0].T) ** 2))
    assert out.iterations == 1000
    assert error(out.q) < 0.6 * error(nearest)
    floor = np.floor(w / scale[:, :, None])
    assert np.all((out.q == floor) | (out.q == floor + 1))


def test_adaround_stays_within_floor_and_ceiling_and_the_integer_range():
    """Weights beyond the grid's ends (``w / s`` below qmin) clip to the range; every other weight
    is rounded down or up, never further; an exact layer needs no learning."""
    from deployopt.passes.quantize import rounding as qrounding
    rng = np.random.default_rng(2)
    w = rng.normal(size=(2, 6, 12))
    scale = np.abs(w).max(axis=2) / 60  # the largest weight lands at ±60, inside [-64, 63]
    w[0, 0, 0] = -70 * scale[0, 0]  # outside the range: clipped
    zero = np.zeros_like(scale)
    x = rng.normal(size=(2, 500, 12))
    hessian = np.einsum("gnk,gnl->gkl", x, x) / 500
    out = qrounding.adaround(w, scale, zero, -64, 63, qrounding.damped(hessian, 0.01), iterations=200, reg=3.0)
    ratio = w / scale[:, :, None]
    assert out.q.min() >= -64 and out.q.max() <= 63 and out.q[0, 0, 0] == -64
    inside = (ratio > -64) & (ratio < 63)
    assert np.all((out.q == np.floor(ratio)) | (out.q == np.ceil(ratio)) | ~inside)
    grid = scale[:, :, None] * np.clip(np.round(ratio), -64, 63)
    exact = qrounding.adaround(grid, scale, zero, -64, 63, qrounding.damped(hessian, 0.01), iterations=200, reg=3.0)
    assert exact.q is None and "exact" in exact.reason


def test_adaround_respects_its_time_budget():
    """A budget that cannot pay for ``MIN_ITERATIONS`` leaves the layer unlearned, with the reason."""
    from deployopt.passes.quantize import rounding as qrounding
    rng = np.random.default_rng(3)
    w = rng.normal(size=(1, 64, 256))
    scale = np.abs(w).max(axis=2) / 63
    x = rng.normal(size=(1, 2000, 256))
    hessian = np.einsum("gnk,gnl->gkl", x, x) / 2000
    out = qrounding.adaround(w, scale, np.zeros_like(scale), -64, 63, hessian, iterations=10_000, reg=3.0,
                             seconds=1e-4)
    assert out.q is None and out.reason.startswith("time budget:") and out.iterations == qrounding.PROBE_ITERATIONS


def test_adaround_pass_changes_only_integers_and_runs_without_torch(digits_model, monkeypatch):
    """``rounding: adaround`` learns every layer GPTQ applies to, keeps per layer the lower error
    of the two (so the mean reduction is at least GPTQ's), leaves the graph, scales and zero points
    as they are, and needs no torch (a base install)."""
    import sys
    proto, x, _ = digits_model
    gptq_model, gptq_details = _quantize(proto, x)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    ada_model, details = _quantize(proto, x, rounding="adaround")
    r = details["refinement"]
    assert r["rounding"] == "adaround" and r["adaround"]["layers_learned"] == 3
    assert r["adaround"]["layers_adaround"] + r["layers_gptq"] == 3 and r["layers_nearest"] == 1
    assert r["adaround"]["layers_adaround"] >= 1 and r["adaround"]["seconds"] < r["adaround"]["budget_s"]
    assert r["weight_output_error_reduction_db"] >= gptq_details["refinement"]["weight_output_error_reduction_db"]
    assert [(n.op_type, list(n.input)) for n in ada_model.graph.node] == \
        [(n.op_type, list(n.input)) for n in gptq_model.graph.node]
    a = {t.name: numpy_helper.to_array(t) for t in gptq_model.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in ada_model.graph.initializer}
    assert all(np.array_equal(a[k], b[k]) for k in a if a[k].dtype == np.float32)
    held = x[1400:]
    assert np.mean(_logits(ada_model, held).argmax(1) == _logits(proto, held).argmax(1)) >= 0.97


def test_mse_range_search_beats_minmax_on_a_heavy_tailed_activation():
    """A Gaussian activation with one outlier at ±50σ per million values (the rare extremes of a
    large feature map): the searched range's quantize-dequantize error on fresh samples of the same
    distribution is below 0.5x minmax's (the outliers stretch minmax's step 20-fold), and a
    tensor without outliers (uniform) keeps its minmax range."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    from deployopt.passes.quantize import ranges as qranges
    from deployopt.passes.quantize.calibration import Activations, searched_ranges
    rng = np.random.default_rng(0)

    def heavy(n):
        x = rng.normal(size=n)
        x[rng.choice(n, n // 1_000_000, replace=False)] = 50 * rng.choice([-1, 1], n // 1_000_000)
        return x
    collector = HistogramCollector("entropy", False, qranges.HIST_BINS, 128, 99.99, "same")
    for _ in range(2):  # chunk by chunk, as the calibration streams
        collector.collect({"heavy": [heavy(1_000_000).astype(np.float32)],
                           "flat": [rng.uniform(-1, 2, size=100_000).astype(np.float32)]})
    summary: dict = {}
    found = searched_ranges(collector.histogram_dict, Activations(0, 255, False), summary)
    assert summary["tensors_clipped"] == 1 and summary["tensor_error_reduction_db"] > 1.5
    lo, hi = (float(v) for v in found["heavy"].range_value)
    mn, mx = (float(collector.histogram_dict["heavy"][i]) for i in (2, 3))
    assert mn < lo < 0 < hi < mx

    def error(values, low, high):
        return float(qranges.qdq_mse(values, np.ones(len(values)), np.array([low]), np.array([high]), 0, 255)[0])
    fresh = heavy(1_000_000)
    assert error(fresh, lo, hi) < 0.5 * error(fresh, mn, mx)
    flat = [float(v) for v in found["flat"].range_value]
    assert flat == [float(collector.histogram_dict["flat"][2]), float(collector.histogram_dict["flat"][3])]


def test_mse_calibration_writes_the_searched_ranges_into_the_graph(digits_model):
    """``calibration: mse``: every activation scale is at most minmax's (ranges only shrink), some
    are smaller, the report says how many, and the model still agrees with fp32."""
    proto, x, _ = digits_model
    minmax, _ = _quantize(proto, x)
    searched, details = _quantize(proto, x, calibration="mse")
    search = details["calibration"]["range_search"]
    assert details["calibration"]["method"] == "mse" and search["tensors_clipped"] >= 1

    def activation_scales(model):
        init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n.input[1]: float(init[n.input[1]]) for n in model.graph.node
                if n.op_type == "QuantizeLinear" and init[n.input[1]].ndim == 0}
    a, b = activation_scales(minmax), activation_scales(searched)
    assert a.keys() == b.keys() and all(b[k] <= a[k] * (1 + 1e-6) for k in a)
    assert sum(b[k] < 0.999 * a[k] for k in a) >= 1
    held = x[1400:]
    assert np.mean(_logits(searched, held).argmax(1) == _logits(proto, held).argmax(1)) >= 0.97


def _output_sqnr_db(a, b, x):
    ya, yb = _logits(a, x).astype(np.float64), _logits(b, x).astype(np.float64)
    return 10 * np.log10(np.sum(ya ** 2) / np.sum((yb - ya) ** 2))


def test_auto_calibration_keeps_the_method_whose_model_is_closest_to_float(digits_model):
    """``calibration: auto`` makes the minmax, mse and entropy models, scores each by output SQNR
    on the first refine_samples calibration samples, and returns the best one: the very model
    that method gives alone, with the scores in the report."""
    proto, x, _ = digits_model
    auto, details = _quantize(proto, x, calibration="auto")
    choice = details["calibration"]["choice"]
    scores = choice["output_sqnr_db"]
    assert list(scores) == ["minmax", "mse", "entropy"] and choice["samples"] == 64
    chosen = details["calibration"]["method"]
    assert scores[chosen] == max(scores.values())
    alone = {m: _quantize(proto, x, calibration=m)[0] for m in scores}
    for method, model in alone.items():  # the scores are the models' own, within rounding and kernels
        assert abs(_output_sqnr_db(proto, model, x[:64]) - scores[method]) < 1.0
    assert [numpy_helper.to_array(t).tobytes() for t in auto.graph.initializer] == \
        [numpy_helper.to_array(t).tobytes() for t in alone[chosen].graph.initializer]


@pytest.mark.parametrize("settings, message", [
    ({"calibration": "kl"}, "calibration: 'kl' is not one of minmax, percentile, entropy, distribution, mse, auto"),
    ({"adaround_iterations": 10}, "adaround_iterations: 10 is outside [50, 100000]"),
    ({"adaround_iterations": 1.5}, "adaround_iterations: expected int, got 1.5"),
    ({"adaround_budget_s": 0}, "adaround_budget_s: 0 is outside (0, inf)"),
])
def test_bad_rounding_and_range_settings(settings, message):
    with pytest.raises(UserError) as e:
        QuantizePass(**settings)
    assert str(e.value) == message and e.value.exit_code == 2
