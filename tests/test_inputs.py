"""Models beyond one fixed-size input: dynamic dims the data fixes, several inputs, several outputs.

Structure: a text-line model with a dynamic width is quantized from fixed-width samples and the
report says where the width came from; a two-input model is fed from an npz with one array per
input and from images plus constants; a two-output model is scored on all its outputs.
Numbers: fidelity of the quantized models to the float ones within stated tolerances.
Refusals: the exact one-line message and exit code 2 for data that does not fix a dim, a missing
input, a bad constant and a bad ``shapes`` key.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from deployopt import api
from deployopt.cli import main
from deployopt.core.data import open_model_data
from deployopt.core.errors import UserError
from deployopt.measure import accuracy, latency
from deployopt.core.session import open_session
from deployopt.measure.model_io import input_specs
from deployopt.measure.metrics import row_cosine
from deployopt.passes.quantize.data import feeds, model_inputs


def output_cosine(sess, float_sess, stream) -> float:
    """Mean per-sample cosine of all of ``sess``'s outputs to ``float_sess``'s, each sample's
    outputs flattened and concatenated: this test's check over every output at once."""
    total, count = 0.0, 0
    for feed in stream:
        rows = [np.concatenate([np.asarray(o, np.float64).reshape(len(o), -1) for o in s.run(None, feed)], axis=1)
                for s in (sess, float_sess)]
        total += float(row_cosine(*rows).sum())
        count += len(rows[0])
    return total / count



def _conv_net(inputs, extra_nodes=(), outputs=None, *, width="image_width", seed=0, opset=13):
    """x [1, 1, 16, width] -> Conv 3x3 (6 ch) -> Relu -> GlobalAveragePool -> Flatten -> Gemm (5)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 1, 3, 3)).astype(np.float32) * 0.5, "w"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32) * 0.1, "b"),
             numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32) * 0.1, "fc_b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
             *extra_nodes]
    outputs = outputs or [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16, width])
    graph = helper.make_graph(nodes, "net", [x, *inputs], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _save(model, path):
    onnx.save(model, str(path))
    return path


def _recipe(root, model, calibration, **extra):
    recipe = {"model": str(model), "data": {"calibration": calibration},
              "passes": [{"cleanup": {}}, {"quantize": {"samples": 8, "refine_samples": 8, "latency_aware": False,
                                                         "min_step_speedup": None}}],
              "benchmark": {"runs": 5, "rounds": 1, "warmup": 1}, **extra}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- dynamic dims the data fixes --------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_line(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_line")
    model = _save(_conv_net([]), root / "crnn.onnx")
    x = np.random.default_rng(1).standard_normal((8, 1, 16, 96)).astype(np.float32)
    np.save(root / "cal.npy", x)
    return root, model, x


def test_dynamic_width_is_taken_from_fixed_width_data(text_line, tmp_path, capsys):
    root, model, x = text_line
    recipe = _recipe(tmp_path, model, f"npy:{root / 'cal.npy'}")
    assert main(["optimize", str(recipe), "-o", str(tmp_path / "out"), "--in-process"]) == 0
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    note = "input 'x' (1x1x16ximage_width): dynamic dim 3 (image_width) taken from the data: " \
           "every sample of data.calibration is 1x16x96"
    assert doc["steps"][0]["notes"][0] == note
    assert [r["error"] for r in doc["benchmark"]] == [None, None]
    quantized = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert quantized.graph.input[0].type.tensor_type.shape.dim[3].dim_param == "image_width"  # still dynamic
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    # the output model still takes other widths, and stays close to the float model on the data
    result = accuracy.evaluate(tmp_path / "out" / "model.onnx", open_model_data(
        f"npy:{root / 'cal.npy'}", input_specs(onnx.load(str(model)))), reference_path=model, progress=False)
    assert result["n"] == 8 and result["cosine"] > 0.98


def test_mixed_widths_are_refused_naming_the_recipe_key(tmp_path, text_line, capsys):
    _, model, _ = text_line
    folder = tmp_path / "lines"
    folder.mkdir()
    for i, width in enumerate((80, 120)):
        Image.fromarray(np.full((16, width), 40 * i, np.uint8)).save(folder / f"{i}.png")
    recipe = _recipe(tmp_path, model, {"dataset": f"folder:{folder}", "preprocess": {"grayscale": True}})
    assert main(["optimize", str(recipe), "-o", str(tmp_path / "out"), "--in-process"]) == 2
    assert _error(capsys) == (
        "deployopt: error: data.calibration: folder samples differ in size (1x16x80 and 1x16x120), so they do "
        "not fix the dynamic dims of model input 'x' (1x1x16ximage_width); set shapes.x in the recipe "
        "(--set shapes.x=[1,1,16,224])")
    assert not (tmp_path / "out" / "model.onnx").exists()
    # the flag it names works: the images are resized to the given width
    assert main(["optimize", str(recipe), "-o", str(tmp_path / "out"), "--in-process",
                 "--set", "shapes.x=[1,1,16,64]"]) == 0
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["steps"][1]["details"]["calibration"]["samples"] == 2


def test_same_size_images_fix_the_width(tmp_path, text_line):
    _, model, _ = text_line
    folder = tmp_path / "lines"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 72), 30 * i, np.uint8)).save(folder / f"{i}.png")
    data = open_model_data({"dataset": f"folder:{folder}", "preprocess": {"grayscale": True}},
                           input_specs(onnx.load(str(model))))
    assert data.sample_shape == (1, 16, 72) and len(data) == 3


def test_no_data_for_a_dynamic_dim_names_the_shapes_key(tmp_path, text_line, capsys):
    _, model, _ = text_line
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(model), "passes": [{"cleanup": {}}],
                                      "benchmark": {"runs": 5, "rounds": 1, "warmup": 1}}))
    assert main(["optimize", str(recipe), "-o", str(tmp_path / "out"), "--in-process"]) == 2
    assert _error(capsys) == ("deployopt: error: model input 'x' (1x1x16ximage_width) has dynamic dims that no "
                              "dataset of the recipe fixes; set shapes.x in the recipe (--set shapes.x=[1,1,16,224])")
    assert main(["optimize", str(recipe), "-o", str(tmp_path / "out"), "--in-process",
                 "--set", "shapes.x=[1,1,16,48]"]) == 0
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["benchmark"][0]["error"] is None


@pytest.mark.parametrize("value, message", [
    ("[1,1,16,0]", "shapes.x: 0 is outside [1, inf)"),
    ("[1,1,32,64]", "shapes.x: [1, 1, 32, 64] does not fit model input 'x' (1x1x16ximage_width)"),
    ("{}", "shapes: expected dict[str, list[int]], got {'x': {}}"),
])
def test_bad_shapes_are_refused(tmp_path, text_line, capsys, value, message):
    root, model, _ = text_line
    recipe = _recipe(tmp_path, model, f"npy:{root / 'cal.npy'}")
    assert main(["optimize", str(recipe), "-o", str(tmp_path / "out"), "--in-process", "--set",
                 f"shapes.x={value}"]) == 2
    assert message in _error(capsys)


def test_eval_and_bench_take_shape(tmp_path, text_line, capsys):
    _, model, _ = text_line
    folder = tmp_path / "lines"
    folder.mkdir()
    for i, width in enumerate((80, 120)):
        Image.fromarray(np.full((16, width), 40 * i, np.uint8)).save(folder / f"{i}.png")
    spec = f"folder:{folder}?preprocess=mnist"
    assert main(["eval", str(model), "--data", spec, "--reference", str(model), "--no-progress", "--in-process"]) == 2
    assert _error(capsys) == (f"deployopt: error: --data {spec}: samples are 1x28x28 but model input 'x' expects "
                              f"1x16ximage_width")
    mapping = {"dataset": f"folder:{folder}", "preprocess": {"grayscale": True}}
    with pytest.raises(UserError) as e:
        api.evaluate(model, mapping, reference=model)
    assert str(e.value) == (f"--data {mapping}: folder samples differ in size (1x16x80 and 1x16x120), so they "
                            f"do not fix the dynamic dims of model input 'x' (1x1x16ximage_width); pass --shape x=1x1x16x224")
    result = api.evaluate(model, mapping, reference=model, shapes={"x": [1, 1, 16, 64]})
    assert result.n == 2 and result.agreement == 1.0
    folder_spec = f"folder:{folder}"
    assert main(["eval", str(model), "--data", folder_spec, "--reference", str(model), "--no-progress",
                 "--shape", "x=1x1x16x64", "--in-process"]) == 2  # rgb images do not fit a 1-channel input
    assert _error(capsys).endswith(f"--data {folder_spec}: samples are 3x224x224 but model input 'x' expects 1x16x64")


# -- several inputs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    """x [1, 1, 16, 32] and scale [1, 5]: logits * scale."""
    root = tmp_path_factory.mktemp("two_inputs")
    scale = helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1, 5])
    mul = helper.make_node("Mul", ["logits", "scale"], ["out"], name="mul")
    out = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5])]
    model = _save(_conv_net([scale], [mul], out, width=32), root / "two.onnx")
    rng = np.random.default_rng(2)
    np.savez(root / "cal.npz", x=rng.standard_normal((8, 1, 16, 32)).astype(np.float32),
             scale=rng.uniform(0.5, 2.0, (8, 5)).astype(np.float32))
    np.save(root / "images.npy", rng.standard_normal((8, 1, 16, 32)).astype(np.float32))
    return root, model


def test_two_inputs_quantized_from_an_npz_per_input(tmp_path, two_inputs, capsys):
    root, model = two_inputs
    recipe = _recipe(tmp_path, model, f"npz:{root / 'cal.npz'}")
    assert main(["optimize", str(recipe), "-o", str(tmp_path / "out"), "--in-process"]) == 0
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["steps"][1]["details"]["calibration"]["samples"] == 8
    assert [r["error"] for r in doc["benchmark"]] == [None, None]
    data = open_model_data(f"npz:{root / 'cal.npz'}", input_specs(onnx.load(str(model))))
    batch, _ = next(data.batches(8))
    assert sorted(batch) == ["scale", "x"] and batch["scale"].shape == (8, 5)
    result = accuracy.evaluate(tmp_path / "out" / "model.onnx", data, reference_path=model, progress=False)
    assert result["n"] == 8 and result["cosine"] > 0.98 and result["agreement"] >= 0.75


def test_two_inputs_from_one_array_and_constants(tmp_path, two_inputs):
    root, model = two_inputs
    spec = {"dataset": f"npy:{root / 'images.npy'}", "constants": {"scale": [[1.0, 2.0, 1.0, 0.5, 1.0]]}}
    recipe = _recipe(tmp_path, model, spec)
    assert main(["optimize", str(recipe), "-o", str(tmp_path / "out"), "--in-process"]) == 0
    data = open_model_data(spec, input_specs(onnx.load(str(model))))
    batch, _ = next(data.batches(3))
    np.testing.assert_array_equal(batch["scale"], np.repeat([[1.0, 2.0, 1.0, 0.5, 1.0]], 3, axis=0))
    bench = latency.compare([model], data=data, runs=3, rounds=1, warmup=1, progress=False)
    assert bench.rows[0]["error"] is None


@pytest.mark.parametrize("spec, message", [
    ("images", "data.calibration: model input 'scale' has no data: the dataset feeds one input ('x'); "
               "set constants.scale, or use an npz with one array per input name"),
    ("npz", "data.calibration: model input 'scale' has no data: {root}/x_only.npz has no array of that name "
            "(arrays: x) and constants do not set it"),
    ({"constants": {"scale": [[1.0, 2.0]]}},
     "data.calibration: constants.scale: shape [1, 2] does not fit model input 'scale' (1x5)"),
    ({"constants": {"scal": [1.0]}}, "data.calibration: constants.scal: not an input of the model (inputs: x, scale)"),
    ({"constants": {"scale": [[1.0, "a"]]}}, "data.calibration.constants: expected"),
])
def test_missing_or_bad_input_data_is_refused(tmp_path, two_inputs, capsys, spec, message):
    root, model = two_inputs
    np.savez(tmp_path / "x_only.npz", x=np.zeros((2, 1, 16, 32), np.float32))
    named = {"images": f"npy:{root / 'images.npy'}", "npz": f"npz:{tmp_path / 'x_only.npz'}"}
    calibration = named[spec] if isinstance(spec, str) else {"dataset": f"npy:{root / 'images.npy'}", **spec}
    recipe = _recipe(tmp_path, model, calibration)
    assert main(["optimize", str(recipe), "-o", str(tmp_path / "out"), "--in-process"]) == 2
    assert message.format(root=tmp_path) in _error(capsys)


# -- several outputs ----------------------------------------------------------------------------------

def test_two_outputs_are_scored_on_all_outputs(tmp_path, text_line):
    root, _, x = text_line
    extra = [helper.make_node("Sigmoid", ["r"], ["map"], name="prob")]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5]),
            helper.make_tensor_value_info("map", TensorProto.FLOAT, [1, 6, 16, "image_width"])]
    model = _save(_conv_net([], extra, outs), tmp_path / "two_out.onnx")
    recipe = _recipe(tmp_path, model, f"npy:{root / 'cal.npy'}")
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["evaluation"] = f"npy:{root / 'cal.npy'}"
    raw["passes"][1]["quantize"]["max_accuracy_drop"] = 0.05
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["optimize", str(recipe), "-o", str(tmp_path / "out"), "--in-process"]) == 0
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    fallback = doc["steps"][1]["details"]["fallback"]
    assert fallback["metric"] == "cosine" and fallback["float_cosine"] == 1.0 and fallback["met"]
    per_metric = doc["accuracy"]["metrics"]  # one cosine per output; the largest drop decides
    assert len(per_metric) == 2 and doc["accuracy"]["output"]["n"] == 8
    assert doc["accuracy"]["drop"] == max(m["drop"] for m in per_metric)
    assert 0 <= doc["accuracy"]["drop"] <= 0.05
    quantized = tmp_path / "out" / "model.onnx"
    data = open_model_data(f"npy:{root / 'cal.npy'}", input_specs(onnx.load(str(model))))
    sessions = [open_session(path, threads=1) for path in (quantized, model)]
    stream = [feed for feed, _ in feeds(data, model_inputs(onnx.load(str(model))), None, 4)]
    assert 0.95 < output_cosine(*sessions, stream) < 1.0  # every output of both models compared
    assert output_cosine(sessions[1], sessions[1], stream) == pytest.approx(1.0)
