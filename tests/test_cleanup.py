"""passes.cleanup: what it folds/removes, what it must leave, outputs equal to the input model.

Numbers: every cleaned model is compared with its input in onnxruntime with graph optimizations
disabled, ``max |Δ| <= 1e-5 · max(1, max |y|)`` (float32 rounding grows with the output scale).
"""

from __future__ import annotations

import collections
import io as bytes_io
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from deployopt.passes.base import StepResult
from deployopt.passes.context import PassContext
from deployopt.core.errors import UserError
from deployopt.passes.cleanup import CleanupPass

TOL = 1e-5
RNG = np.random.default_rng(0)


# -- helpers ------------------------------------------------------------------------------------
def _f32(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _bn_params(prefix: str, c: int) -> list[onnx.TensorProto]:
    return [_f32(f"{prefix}_g", RNG.uniform(0.5, 2, c)), _f32(f"{prefix}_b", RNG.normal(size=c)),
            _f32(f"{prefix}_m", RNG.normal(size=c)), _f32(f"{prefix}_v", RNG.uniform(0.5, 2, c))]


def _bn(prefix: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization",
                            [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y],
                            name=prefix, **attrs)


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _x(name="x", shape=("N", 3, 8, 8)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _clean(proto: onnx.ModelProto, **fields) -> tuple[onnx.ModelProto, StepResult, bool]:
    cleanup = CleanupPass(**fields)
    cleanup.context = PassContext()
    result = cleanup(ir.from_proto(proto))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out, result, result.modified


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # the input models carry unused initializers on purpose
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> float:
    worst = 0.0
    for ya, yb in zip(_run(a, feeds), _run(b, feeds), strict=True):
        diff = float(np.max(np.abs(ya.astype(np.float64) - yb)))
        assert diff <= TOL * max(1.0, float(np.max(np.abs(ya)))), diff
        worst = max(worst, diff)
    return worst


def _ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def _init(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)


# -- a graph with one foldable BN, one that must stay, Identity, Dropouts and dead code ---------------
@pytest.fixture(scope="module")
def mixed_model() -> onnx.ModelProto:
    inits = [_f32("W1", RNG.normal(size=(4, 3, 3, 3))), _f32("B1", RNG.normal(size=4)),
             _f32("W2", RNG.normal(size=(4, 3, 3, 3))), *_bn_params("bn1", 4),
             *_bn_params("bn2", 4), _f32("unused", np.ones(7)),
             _f32("ratio", 0.3), numpy_helper.from_array(np.array(False), "train")]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1"),
        _bn("bn1", "c1", "n1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu_shared"),  # conv1 also feeds this
        helper.make_node("Add", ["n1", "r1"], ["a1"], name="add1"),
        helper.make_node("Conv", ["x", "W2"], ["c2"], name="conv2"),  # no bias
        _bn("bn2", "c2", "n2"),
        helper.make_node("Identity", ["n2"], ["i2"], name="ident"),
        helper.make_node("Dropout", ["i2", "ratio", "train"], ["d2"], name="drop_eval"),
        helper.make_node("Add", ["a1", "d2"], ["a2"], name="add2"),
        helper.make_node("Dropout", ["a2"], ["y"], name="drop_plain"),
        helper.make_node("Relu", ["x"], ["dead"], name="dead_relu"),
    ]
    return _model(nodes, [_x()], [_x("y", ("N", 4, 6, 6))], inits)


@pytest.fixture(scope="module")
def mixed_cleaned(mixed_model):
    return _clean(mixed_model)


def test_bn_folded_into_conv_with_the_formula(mixed_model, mixed_cleaned):
    out, result, modified = mixed_cleaned
    assert modified
    conv2 = next(n for n in out.graph.node if n.name == "conv2")  # the fused Conv keeps its name
    assert len(conv2.input) == 3  # a bias appeared
    g, b, m, v = (_init(mixed_model, f"bn2_{k}") for k in "gbmv")
    s = g / np.sqrt(v + 1e-5)
    np.testing.assert_allclose(_init(out, conv2.input[1]),
                               _init(mixed_model, "W2") * s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(_init(out, conv2.input[2]), (0 - m) * s + b, rtol=1e-6, atol=1e-7)
    assert result.details["batchnorm_folded"] == [
        {"batchnorm": "bn2", "into": "conv2", "op": "Conv"}]
    assert "folded 1 BatchNormalization into 1 Conv" in result.notes


def test_bn_on_shared_conv_output_is_kept_and_noted(mixed_model, mixed_cleaned):
    out, result, _ = mixed_cleaned
    assert [n.name for n in out.graph.node if n.op_type == "BatchNormalization"] == ["bn1"]
    np.testing.assert_array_equal(_init(out, "W1"), _init(mixed_model, "W1"))  # untouched
    reason = "the output of Conv 'conv1' also feeds Relu 'relu_shared'"
    assert result.details["batchnorm_skipped"] == [{"batchnorm": "bn1", "reason": reason}]
    assert f"kept BatchNormalization 'bn1': {reason}" in result.notes


def test_identity_dropout_dead_code_removed(mixed_cleaned):
    out, result, _ = mixed_cleaned
    assert _ops(out) == {"Conv": 2, "BatchNormalization": 1, "Relu": 1, "Add": 2}
    names = {t.name for t in out.graph.initializer}
    assert not names & {"unused", "ratio", "train", "bn2_g", "bn2_b", "bn2_m", "bn2_v"}
    assert [o.name for o in out.graph.output] == ["y"]  # the graph output keeps its name
    details = result.details
    assert details["nodes_before"] == {"Add": 2, "BatchNormalization": 2, "Conv": 2, "Dropout": 2,
                                       "Identity": 1, "Relu": 2}
    assert details["nodes_after"] == {"Add": 2, "BatchNormalization": 1, "Conv": 2, "Relu": 1}
    assert (details["node_count_before"], details["node_count_after"]) == (11, 6)
    assert "removed nodes: 1 BatchNormalization, 2 Dropout, 1 Identity, 1 Relu" in result.notes


def test_mixed_outputs_equal(mixed_model, mixed_cleaned):
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    _assert_same_outputs(mixed_model, mixed_cleaned[0], {"x": x})


def test_gemm_bn_folded():
    inits = [_f32("Wg", RNG.normal(size=(5, 6))), _f32("Cg", RNG.normal(size=5)), *_bn_params("bng", 5)]
    nodes = [helper.make_node("Gemm", ["x", "Wg", "Cg"], ["g"], name="fc", transB=1, beta=0.5),
             _bn("bng", "g", "y")]
    model = _model(nodes, [_x("x", ("N", 6))], [_x("y", ("N", 5))], inits)
    out, result, _ = _clean(model)
    assert _ops(out) == {"Gemm": 1}
    assert result.details["batchnorm_folded"] == [{"batchnorm": "bng", "into": "fc", "op": "Gemm"}]
    _assert_same_outputs(model, out, {"x": RNG.normal(size=(3, 6)).astype(np.float32)})


def test_bn_with_runtime_params_is_kept():
    # The BN scale is a graph input: its value is only known at run time.
    inits = [_f32("W", RNG.normal(size=(4, 3, 3, 3))), *_bn_params("bn", 4)[1:]]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), _bn("bn", "c", "y")]
    model = _model(nodes, [_x(), helper.make_tensor_value_info("bn_g", TensorProto.FLOAT, [4])],
                   [_x("y", ("N", 4, 6, 6))], inits)
    out, result, _ = _clean(model)
    assert _ops(out)["BatchNormalization"] == 1
    assert result.notes[0] == (
        "kept BatchNormalization 'bn': its parameter 'bn_g' is a graph input (may change at run time)")
    feeds = {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32),
             "bn_g": RNG.uniform(0.5, 2, 4).astype(np.float32)}
    _assert_same_outputs(model, out, feeds)


def test_bn_in_training_mode_is_kept():
    inits = [_f32("W", RNG.normal(size=(4, 3, 3, 3))), *_bn_params("bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"],
                              ["y", "mean_out", "var_out"], name="bn", training_mode=1)]
    model = _model(nodes, [_x()], [_x("y", ("N", 4, 6, 6))], inits, opset=15)
    out, result, _ = _clean(model)
    assert _ops(out) == {"Conv": 1, "BatchNormalization": 1}
    np.testing.assert_array_equal(_init(out, "W"), _init(model, "W"))
    assert result.details["batchnorm_skipped"] == [
        {"batchnorm": "bn", "reason": "it runs in training mode (training_mode=1)"}]


def test_dropout_with_used_mask():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"], name="drop"),
             helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["d", "m"], ["y"])]
    model = _model(nodes, [_x()], [_x("y")], [])
    feeds = {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)}
    # onnxscript's folding knows the inference mask is all true and replaces it by a constant
    out, _, _ = _clean(model)
    assert _ops(out)["Dropout"] == 0
    _assert_same_outputs(model, out, feeds)
    # the by-hand Dropout removal (folding off) must keep a Dropout whose mask is read
    out, result, _ = _clean(model, fold_constants=False)
    assert _ops(out)["Dropout"] == 1
    assert "kept Dropout 'drop': its mask output 'mask' is used" in result.notes
    _assert_same_outputs(model, out, feeds)


def test_switches_off_leave_the_model_alone(mixed_model):
    out, result, modified = _clean(mixed_model, fold_constants=False, fold_batchnorm=False,
                                    remove_identity=False, remove_unused=False)
    assert not modified
    assert _ops(out) == _ops(mixed_model)
    assert result.details["nodes_before"] == result.details["nodes_after"]
    out, _, _ = _clean(mixed_model, fold_batchnorm=False)
    assert _ops(out)["BatchNormalization"] == 2


def test_second_run_changes_nothing(mixed_cleaned):
    again, result, modified = _clean(mixed_cleaned[0])
    assert not modified
    assert _ops(again) == _ops(mixed_cleaned[0])
    assert len(again.graph.initializer) == len(mixed_cleaned[0].graph.initializer)
    assert result.details["nodes_before"] == result.details["nodes_after"]


def test_dedupe_initializers():
    same = RNG.normal(size=(4, 3, 3, 3))
    inits = [_f32("Wa", same), _f32("Wb", same)]
    nodes = [helper.make_node("Conv", ["x", "Wa"], ["a"]), helper.make_node("Conv", ["x", "Wb"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    model = _model(nodes, [_x()], [_x("y", ("N", 4, 6, 6))], inits)
    assert len(_clean(model)[0].graph.initializer) == 2  # off by default
    out, _, _ = _clean(model, dedupe_initializers=True)
    assert len(out.graph.initializer) == 1
    _assert_same_outputs(model, out, {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)})


@pytest.mark.parametrize("field", ["fold_constants", "fold_batchnorm", "remove_identity",
                                   "remove_unused", "dedupe_initializers"])
def test_refuses_non_boolean(field):
    with pytest.raises(UserError) as e:
        CleanupPass(**{field: "yes"})
    assert str(e.value) == f"{field}: expected bool, got 'yes'"


# -- models exported from torch ---------------------------------------------------------------------
def _randomize_bn(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics, so that folding really changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                c = bn.num_features
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=g) * 0.2)


def _torchscript_unfolded(module: torch.nn.Module, shape, dynamic_batch=False) -> onnx.ModelProto:
    # Without constant folding the TorchScript exporter keeps explicit BatchNormalization nodes
    # (and Identity nodes for deduplicated initializers); the dynamo exporter and
    # deployopt.models.export fold BN themselves.
    buffer = bytes_io.BytesIO()
    with warnings.catch_warnings():  # TorchScript export is deprecated; here it is on purpose
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(*shape),), buffer, dynamo=False,
                          do_constant_folding=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic_batch else None)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("name", ["seed_cnn", "resnet18", "mobilenet_v2", "efficientnet_lite0"])
def test_reference_models_bn_folded_outputs_equal(name):
    from deployopt import models

    module = models.build(name)
    _randomize_bn(module)
    shape = (1, 3, 32, 32) if name == "seed_cnn" else (1, 3, 64, 64)
    model = _torchscript_unfolded(module, shape)
    out, result, _ = _clean(model)
    before, after = _ops(model), _ops(out)
    n_bn = before["BatchNormalization"]
    assert after["BatchNormalization"] == 0
    assert after["Conv"] == before["Conv"]
    assert len(result.details["batchnorm_folded"]) == n_bn
    assert after["Identity"] == 0 and after["Constant"] == 0
    if n_bn:
        assert any(note.startswith(f"folded {n_bn} BatchNormalization") for note in result.notes)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    _assert_same_outputs(model, out, {"x": x})


def test_dynamic_batch_survives_folding():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3)
            self.bn = torch.nn.BatchNorm2d(6)
            self.fc = torch.nn.Linear(6 * 6 * 6, 4)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            return self.fc(y.reshape(y.shape[0], -1))  # exports as a Shape/Gather/Concat chain

    net = Net()
    _randomize_bn(net)
    model = _torchscript_unfolded(net, (1, 3, 8, 8), dynamic_batch=True)
    out, _, _ = _clean(model)
    assert _ops(out)["BatchNormalization"] == 0
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for batch in (1, 3):
        x = RNG.normal(size=(batch, 3, 8, 8)).astype(np.float32)
        _assert_same_outputs(model, out, {"x": x})


def test_export_model_output_stays_equal(tmp_path):
    """The project's own export path (dynamo, BN already folded): cleanup keeps it equal."""
    from deployopt import models
    from deployopt.core import io
    from deployopt.models.export import export_model

    path = tmp_path / "seed_cnn.onnx"
    export_model(models.build("seed_cnn"), path, (1, 3, 32, 32), dynamic_batch=True)
    original = io.load_proto(path)
    result = CleanupPass()(io.load(path))
    cleaned = io.load_proto(io.save(result.model, tmp_path / "clean.onnx", input_path=path))
    assert _ops(cleaned)["Conv"] == _ops(original)["Conv"] == 2
    assert _ops(cleaned)["Gemm"] == _ops(original)["Gemm"] == 2
    input_name = original.graph.input[0].name
    for batch in (1, 4):
        x = np.random.default_rng(2).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        _assert_same_outputs(original, cleaned, {input_name: x})
