"""Magnitude pruning (+ reconstruction): structure, numbers and refusals.

The trained fixture is a small CNN (Conv-Conv-Gemm-Gemm) fitted for a few seconds on sklearn's
8x8 digits; numbers are compared with onnxruntime with graph optimizations off.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from deployopt.passes.base import StepResult
from deployopt.passes.context import PassContext
from deployopt.core.data import ArrayDataset
from deployopt.core.errors import UserError
from deployopt.passes.reconstruct import GramAccumulator
from deployopt.passes.prune import MagnitudePrunePass
from tests._fixtures import train_classifier

LAYERS = ("/0/Conv", "/2/Conv", "/6/Gemm", "/8/Gemm")
WEIGHTS = ("0.weight", "2.weight", "6.weight", "8.weight")


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_cnn(digits_shuffled):
    """(proto, x_train, y_train, x_test, y_test): a CNN trained on 1,400 digits, 397 held out."""
    x, y = digits_shuffled
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(256, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    train_classifier(net, x[:1400], y[:1400], epochs=15, threads=1)
    buffer = io.BytesIO()
    torch.onnx.export(net.eval(), torch.zeros(1, 1, 8, 8), buffer, dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(buffer.getvalue()))
    assert [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm")] == list(LAYERS)
    return proto, x[:1400], y[:1400], x[1400:], y[1400:]


def _session(model, outputs=None):
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    if outputs:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        del proto.graph.output[:]
        proto.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _top1(model, x, y) -> float:
    return float((_session(model).run(None, {"x": x})[0].argmax(1) == y).mean())


def _initializers(model) -> dict[str, onnx.TensorProto]:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return {t.name: t for t in proto.graph.initializer}


def _run(proto, calibration=None, **params) -> tuple[ir.Model, StepResult, bool]:
    step = MagnitudePrunePass(**params)
    step.context = PassContext(calibration=calibration)
    model = ir.from_proto(proto)
    result = step(model)
    return result.model, result, result.modified


# -- structure: exact sparsity, untouched tensors -------------------------------------------------
def test_layer_scope_prunes_each_tensor_exactly(digits_cnn):
    proto = digits_cnn[0]
    model, result, modified = _run(proto, sparsity=0.7, skip_first_last=False, min_elements=0)
    assert modified
    after, before = _initializers(model), _initializers(proto)
    rows = {r["name"]: r for r in result.details["layers"]}
    assert list(rows) == list(LAYERS)
    for layer, weight in zip(LAYERS, WEIGHTS):
        dense = numpy_helper.to_array(before[weight])
        pruned = numpy_helper.to_array(after[weight])
        k = int(0.7 * dense.size + 0.5)
        assert np.count_nonzero(pruned == 0) == k  # exactly k zeros (the trained weights had none)
        kept = pruned != 0
        np.testing.assert_array_equal(pruned[kept], dense[kept])  # survivors untouched
        assert np.abs(dense[~kept]).max() <= np.abs(dense[kept]).min()  # the smallest went
        assert rows[layer]["elements"] == dense.size
        assert rows[layer]["sparsity"] == pytest.approx(k / dense.size, abs=0)
        assert rows[layer]["op_type"] == layer.split("/")[-1]
    for name in ("0.bias", "2.bias", "6.bias", "8.bias"):  # biases: byte-identical
        assert after[name].SerializeToString() == before[name].SerializeToString()
    assert "/2/Conv (Conv, 1152) 70.0%" in " ".join(result.notes)


def test_global_scope_one_threshold_exact_total(digits_cnn):
    proto = digits_cnn[0]
    model, result, _ = _run(proto, sparsity=0.6, scope="global", skip_first_last=False,
                          min_elements=0)
    after, before = _initializers(model), _initializers(proto)
    dense = np.concatenate([numpy_helper.to_array(before[w]).ravel() for w in WEIGHTS])
    pruned = np.concatenate([numpy_helper.to_array(after[w]).ravel() for w in WEIGHTS])
    assert np.count_nonzero(pruned == 0) == int(0.6 * dense.size + 0.5)
    assert np.abs(dense[pruned == 0]).max() <= np.abs(dense[pruned != 0]).min()
    per_layer = [r["sparsity"] for r in result.details["layers"]]
    assert len(set(per_layer)) > 1  # layers of smaller weights lose more
    assert result.details["sparsity"] == pytest.approx(int(0.6 * dense.size + 0.5)
                                                             / dense.size)


def test_defaults_skip_first_last_and_small_tensors_byte_identical(digits_cnn):
    proto = digits_cnn[0]
    model, result, _ = _run(proto, sparsity=0.5, min_elements=2000)
    after, before = _initializers(model), _initializers(proto)
    assert [r["name"] for r in result.details["layers"]] == ["/6/Gemm"]
    for name in before:
        if name != "6.weight":
            assert after[name].SerializeToString() == before[name].SerializeToString(), name
    notes = "\n".join(result.notes)
    assert "/0/Conv (Conv): not pruned, it is the first weight layer (skip_first_last)" in notes
    assert "/8/Gemm (Gemm): not pruned, it is the last weight layer (skip_first_last)" in notes
    assert ("/2/Conv (Conv): not pruned, its 1152 weights are fewer than min_elements=2000"
            in notes)


def test_overrides_glob_and_regex_win_over_defaults(digits_cnn):
    proto = digits_cnn[0]
    _, result, _ = _run(proto, sparsity=0.5, overrides={"/0/*": 0.25, r"8\.w.*": 0.8})
    rows = {r["name"]: r for r in result.details["layers"]}
    assert rows["/0/Conv"]["sparsity"] == int(0.25 * 72 + 0.5) / 72  # glob on the node name
    assert rows["/8/Gemm"]["sparsity"] == int(0.8 * 320 + 0.5) / 320  # regex on the weight name
    assert rows["/2/Conv"]["sparsity"] == 0.5 and rows["/6/Gemm"]["sparsity"] == 0.5


def test_size_and_speed_are_reported_honestly(digits_cnn):
    proto = digits_cnn[0]
    _, result, _ = _run(proto, sparsity=0.9, skip_first_last=False, min_elements=0)
    details = result.details
    before, after = details["size"]["before"], details["size"]["after"]
    assert after["bytes"] == before["bytes"]  # zeros are still stored
    assert after["bytes_zip"] < 0.5 * before["bytes_zip"]
    assert after["nonzero_params"] < 0.2 * before["nonzero_params"]
    assert "no faster than the dense one" in details["speed"]
    assert details["sparse_storage"]["coo_bytes"] < details["sparse_storage"]["dense_bytes"]
    # At 50%, COO (4 value + 8 index bytes per nonzero) is larger than dense: not offered.
    _, result, _ = _run(proto, sparsity=0.5, skip_first_last=False, min_elements=0)
    assert result.details["sparse_storage"] is None
    assert any("the zipped size is the saving" in n for n in result.notes)
    assert not any("sparse" in n.lower() for n in result.notes)


# -- graphs built in code: shared, graph-input and Constant-node weights --------------------------
def _matmul_model(weights: dict[str, np.ndarray], nodes, inputs=(),
                  constants=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(constants) + nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])] + list(inputs),
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y1", "y2", "y3")],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def test_shared_initializer_and_graph_input_skipped_and_noted():
    rng = np.random.default_rng(0)
    shared, own, fed = (rng.normal(size=(16, 16)).astype(np.float32) for _ in range(3))
    nodes = [helper.make_node("MatMul", ["x", "W_shared"], ["y1"], name="mm1"),
             helper.make_node("MatMul", ["x", "W_shared"], ["y2"], name="mm2"),
             helper.make_node("MatMul", ["x", "W_own"], ["h"], name="mm3"),
             helper.make_node("MatMul", ["h", "W_fed"], ["y3"], name="mm4")]
    proto = _matmul_model({"W_shared": shared, "W_own": own, "W_fed": fed}, nodes,
                          inputs=[helper.make_tensor_value_info("W_fed", TensorProto.FLOAT,
                                                                [16, 16])])
    model, result, modified = _run(proto, sparsity=0.5, skip_first_last=False, min_elements=0)
    assert modified
    after, before = _initializers(model), _initializers(proto)
    assert after["W_shared"].SerializeToString() == before["W_shared"].SerializeToString()
    assert after["W_fed"].SerializeToString() == before["W_fed"].SerializeToString()
    assert np.count_nonzero(numpy_helper.to_array(after["W_own"]) == 0) == 128
    notes = "\n".join(result.notes)
    assert ("mm1 (MatMul): not pruned, weight 'W_shared' is shared by 2 uses (changing it would "
            "change the other layers)") in notes
    assert "mm4 (MatMul): not pruned, weight 'W_fed' is a graph input" in notes
    assert {s["name"] for s in result.details["skipped"]} == {"mm1", "mm2", "mm4"}
    assert [r["name"] for r in result.details["layers"]] == ["mm3"]


def test_constant_node_weights_are_pruned_and_run():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 16)).astype(np.float32)
    constant = helper.make_node("Constant", [], ["Wc"], name="const",
                                value=numpy_helper.from_array(w, "Wc"))
    nodes = [helper.make_node("MatMul", ["x", "Wc"], ["y1"], name="mm"),
             helper.make_node("Relu", ["y1"], ["y2"]), helper.make_node("Neg", ["y2"], ["y3"])]
    proto = _matmul_model({}, nodes, constants=[constant])
    model, result, modified = _run(proto, sparsity=0.75, skip_first_last=False, min_elements=0)
    assert modified and result.details["layers"][0]["sparsity"] == 0.75
    pruned = [n for n in ir.to_proto(model).graph.node if n.op_type == "Constant"][0]
    w_pruned = numpy_helper.to_array(pruned.attribute[0].t)
    assert np.count_nonzero(w_pruned == 0) == 192
    x = rng.normal(size=(5, 16)).astype(np.float32)
    np.testing.assert_allclose(_session(model).run(["y1"], {"x": x})[0], x @ w_pruned,
                               rtol=1e-5, atol=1e-5)


def test_constant_node_weight_reconstructed_without_shape_information():
    """A Constant-node weight in a model without value_info (no shape inference) is re-solved,
    and the dense targets come from the original Constant, not the pruned one."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w, "Wc")),
             helper.make_node("MatMul", ["x", "Wc"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    x = (rng.normal(size=(200, 1)) + 0.3 * rng.normal(size=(200, 16))).astype(np.float32)
    model, result, _ = _run(proto, ArrayDataset(x), sparsity=0.5, skip_first_last=False,
                          min_elements=0, reconstruct=True)
    row = result.details["layers"][0]
    assert row["sparsity"] == 0.5
    assert row["output_error_reconstructed"] < 0.2 * row["output_error_pruned"]
    dense_y = _session(proto).run(None, {"x": x})[0]
    fixed_y = _session(model).run(None, {"x": x})[0]
    measured = np.sum((fixed_y - dense_y) ** 2) / np.sum(dense_y ** 2)
    assert row["output_error_reconstructed"] == pytest.approx(measured, rel=1e-3)


def test_nothing_prunable_leaves_model_unchanged_with_note():
    nodes = [helper.make_node("Relu", ["x"], ["y1"]), helper.make_node("Neg", ["x"], ["y2"]),
             helper.make_node("MatMul", ["y1", "y2t"], ["y3"], name="act_mm"),
             helper.make_node("Transpose", ["y2"], ["y2t"])]
    nodes = nodes[:2] + [nodes[3], nodes[2]]
    proto = _matmul_model({}, nodes)
    model, result, modified = _run(proto, sparsity=0.5)
    assert not modified
    assert ir.to_proto(model).graph.SerializeToString() == \
        ir.to_proto(ir.from_proto(proto)).graph.SerializeToString()
    assert result.details["layers"] == []
    assert ("nothing to prune: the model has no Conv/Gemm/MatMul weight this pass may change; "
            "the model is unchanged") in result.notes
    assert "act_mm (MatMul): not pruned, operand 1 'y2t' is computed at run time " \
        "(by a Transpose node)" in result.notes


# -- reconstruction -------------------------------------------------------------------------------
def test_reconstruction_lowers_layer_error_and_recovers_accuracy(digits_cnn):
    proto, x_train, _, x_test, y_test = digits_cnn
    calibration = ArrayDataset(x_train[:512], name="digits-train")
    params = dict(sparsity=0.7, skip_first_last=False, min_elements=0)
    plain, _, _ = _run(proto, **params)
    fixed, result, _ = _run(proto, calibration, reconstruct=True, **params)

    dense_top1, plain_top1, fixed_top1 = (_top1(m, x_test, y_test) for m in (proto, plain, fixed))
    assert dense_top1 >= 0.95
    assert plain_top1 < dense_top1 - 0.1  # 70% on every layer hurts ...
    assert fixed_top1 >= dense_top1 - 0.01  # ... and reconstruction wins it back (<= 1 point)

    # Each layer's output on held-out data is closer to the dense layer's.
    outputs = [n.output[0] for n in proto.graph.node if n.name in LAYERS]
    dense_out = _session(proto, outputs).run(outputs, {"x": x_test})
    for name, dense_y, plain_y, fixed_y in zip(
            outputs, dense_out, _session(plain, outputs).run(outputs, {"x": x_test}),
            _session(fixed, outputs).run(outputs, {"x": x_test})):
        plain_err = np.sum((plain_y - dense_y) ** 2) / np.sum(dense_y ** 2)
        fixed_err = np.sum((fixed_y - dense_y) ** 2) / np.sum(dense_y ** 2)
        assert fixed_err < 0.5 * plain_err, name

    # The mask is kept: pruned entries stay zero, sparsity is exactly the target.
    for layer, row in zip(LAYERS, result.details["layers"]):
        assert row["sparsity"] == pytest.approx(int(0.7 * row["elements"] + 0.5)
                                                / row["elements"])
        assert row["output_error_reconstructed"] < row["output_error_pruned"]
    assert any("inputs from the pruned model, targets from the dense model;" in n
               for n in result.notes)


def _conv_model(attrs: dict, groups: int, bias: bool, batch) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    w = rng.normal(size=(12, 6 // groups, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=12).astype(np.float32), "B"))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=groups, **attrs)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             [batch, 6, 11, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("attrs, groups, bias, batch", [
    ({"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}, 2, True, "n"),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 1, False, "n"),
    ({"pads": [1, 1, 1, 1]}, 3, True, 4),  # static batch 4: 10 samples -> 8 used
])
def test_reconstruction_error_matches_onnxruntime_for_conv_geometry(attrs, groups, bias, batch):
    """The in-sample error the pass reports (from its im2col Gram statistics) equals the error
    onnxruntime measures between the reconstructed and the dense Conv on the same samples, so
    stride, padding, dilation and groups are read the way onnxruntime reads them."""
    proto = _conv_model(attrs, groups, bias, batch)
    rng = np.random.default_rng(3)
    # Channels that share a common part, as in real feature maps: kept weights can stand in
    # for pruned ones.
    x = (rng.normal(size=(10, 1, 11, 9)) + 0.3 * rng.normal(size=(10, 6, 11, 9))).astype(np.float32)
    used = x[:8] if batch == 4 else x
    model, result, _ = _run(proto, ArrayDataset(x), sparsity=0.6, skip_first_last=False,
                          min_elements=0, reconstruct=True, ridge=0.0)
    row = result.details["layers"][0]

    def run(m):
        session = _session(m)
        return np.concatenate([session.run(None, {"x": used[i:i + 4]})[0]
                               for i in range(0, len(used), 4)])

    dense_y, fixed_y = run(proto), run(model)
    measured = np.sum((fixed_y - dense_y) ** 2) / np.sum(dense_y ** 2)
    assert row["output_error_reconstructed"] == pytest.approx(measured, rel=1e-3, abs=1e-7)
    assert row["output_error_reconstructed"] < 0.8 * row["output_error_pruned"]
    assert any(f"on {len(used)} calibration samples" in n for n in result.notes)


def test_reconstruction_gemm_with_alpha_beta_and_matmul_rows():
    rng = np.random.default_rng(4)
    b = rng.normal(size=(12, 16)).astype(np.float32)  # transB=1: [N, K]
    c = rng.normal(size=12).astype(np.float32)
    w = rng.normal(size=(12, 5)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["y1"], name="gemm", alpha=0.5, beta=2.0,
                              transB=1),
             helper.make_node("Unsqueeze", ["y1", "axes"], ["y2"]),
             helper.make_node("MatMul", ["y2", "W"], ["y3"], name="mm")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y3", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in
         {"B": b, "C": c, "W": w, "axes": np.array([1], dtype=np.int64)}.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    x = rng.normal(size=(300, 16)).astype(np.float32)
    model, result, _ = _run(proto, ArrayDataset(x), sparsity=0.5, skip_first_last=False,
                          min_elements=0, reconstruct=True, ridge=0.0)
    after = _initializers(model)
    b2, c2 = numpy_helper.to_array(after["B"]), numpy_helper.to_array(after["C"])
    assert np.count_nonzero(b2 == 0) == 96 and not np.array_equal(c2, c)  # bias re-solved
    # The re-solved Gemm is the least-squares fit of each output row on its kept inputs.
    y = 0.5 * x @ b.T + 2.0 * c
    for o in range(12):
        kept = b2[o] != 0
        design = np.c_[x[:, kept], np.ones(len(x))]
        theta = np.linalg.lstsq(design.astype(np.float64), y[:, o], rcond=None)[0]
        np.testing.assert_allclose(0.5 * b2[o, kept], theta[:-1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(2.0 * c2[o], theta[-1], rtol=1e-4, atol=1e-4)
    errors = {r["name"]: r["output_error_reconstructed"] for r in result.details["layers"]}
    dense_y3 = _session(proto).run(None, {"x": x})[0]
    fixed_y3 = _session(model).run(None, {"x": x})[0]
    measured = np.sum((fixed_y3 - dense_y3) ** 2) / np.sum(dense_y3 ** 2)
    assert errors["mm"] == pytest.approx(measured, rel=1e-3)  # 3-D MatMul input read as rows


def test_gram_accumulator_streams_to_the_direct_solution():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(400, 7))
    y = x @ rng.normal(size=(7, 3)) + 0.1 * rng.normal(size=(400, 3)) + 2.0
    acc = GramAccumulator(7, 3)
    for chunk in np.array_split(np.arange(400), 3):  # streamed in uneven chunks
        acc.add(x[chunk], y[chunk])
    design = np.c_[x, np.ones(400)]
    keep = rng.random((3, 7)) > 0.4
    w, b = acc.solve(0.0, keep)
    for o in range(3):
        cols = np.append(np.flatnonzero(keep[o]), 7)
        theta = np.linalg.lstsq(design[:, cols], y[:, o], rcond=None)[0]
        np.testing.assert_allclose(np.r_[w[o, keep[o]], b[o]], theta, rtol=1e-9, atol=1e-9)
        assert np.all(w[o, ~keep[o]] == 0)
        assert acc.squared_error(w, b)[o] == pytest.approx(
            np.sum((design[:, cols] @ theta - y[:, o]) ** 2), rel=1e-9)
    # Ridge toward a prior: (G_K + λI) w = C_K + λ w0 on the weights, the bias unshrunk.
    prior = rng.normal(size=(3, 7))
    lam = 0.5 * np.mean(np.sum(x * x, axis=0))
    w, b = acc.solve(0.5, np.ones(7, dtype=bool), prior=prior)
    gram, cross = design.T @ design, design.T @ y
    for o in range(3):
        a_mat = gram + np.diag(np.r_[np.full(7, lam), 0.0])
        theta = np.linalg.solve(a_mat, cross[:, o] + np.r_[lam * prior[o], 0.0])
        np.testing.assert_allclose(np.r_[w[o], b[o]], theta, rtol=1e-9, atol=1e-9)


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, message", [
    ({"sparsity": 1.0}, "sparsity: 1.0 is outside [0, 1)"),
    ({"sparsity": -0.1}, "sparsity: -0.1 is outside [0, 1)"),
    ({"scope": "model"}, "scope: 'model' is not one of layer, global"),
    ({"overrides": {"conv*": 1.5}}, "overrides['conv*']: 1.5 is outside [0, 1)"),
    ({"overrides": ["conv*"]}, "overrides: expected dict[str, float], got ['conv*']"),
    ({"op_types": ["Conv", "LSTM"]}, "op_types: 'LSTM' is not one of Conv, Gemm, MatMul"),
    ({"min_elements": -1}, "min_elements: -1 is outside [0, inf)"),
    ({"samples": 0}, "samples: 0 is outside [1, inf)"),
    ({"ridge": -1e-3}, "ridge: -0.001 is outside [0, inf)"),
    ({"reconstruct": "yes"}, "reconstruct: expected bool, got 'yes'"),
])
def test_bad_parameters_are_refused_with_the_field_named(params, message):
    with pytest.raises(UserError) as error:
        MagnitudePrunePass(**params)
    assert str(error.value) == message


def test_pattern_matching_no_layer_is_refused(digits_cnn):
    with pytest.raises(UserError) as error:
        _run(digits_cnn[0], overrides={"/9/*": 0.5})
    assert str(error.value) == ("overrides: pattern '/9/*' matches no Conv/Gemm/MatMul layer "
                                "(layers: /0/Conv, /2/Conv, /6/Gemm, /8/Gemm)")


def test_reconstruction_without_calibration_is_refused(digits_cnn):
    step = MagnitudePrunePass(reconstruct=True)
    assert step.needs_calibration and not MagnitudePrunePass().needs_calibration
    model = ir.from_proto(digits_cnn[0])
    with pytest.raises(UserError) as error:
        step(model)
    assert str(error.value) == ("data.calibration: prune with reconstruct: true needs "
                                "calibration data, and the recipe sets none")
    assert _initializers(model)["2.weight"].SerializeToString() == \
        _initializers(digits_cnn[0])["2.weight"].SerializeToString()  # nothing was touched


def test_calibration_of_the_wrong_shape_is_refused(digits_cnn):
    with pytest.raises(UserError) as error:
        _run(digits_cnn[0], ArrayDataset(np.zeros((4, 1, 28, 28))), reconstruct=True)
    assert str(error.value) == ("data.calibration: samples of shape [1, 28, 28] do not fit "
                                "model input 'x' of shape ['n', 1, 8, 8]")
