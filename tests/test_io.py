"""deployopt.core.io: round trip, atomic save, and every refusal with its message."""

from __future__ import annotations

import os
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployopt.core import io
from deployopt.core.errors import UserError


def _matmul_model(rows: int = 4, cols: int = 3) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(rows * cols, dtype=np.float32).reshape(rows, cols), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_model(), path)
    return path


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_round_trip_keeps_outputs(model_path, tmp_path):
    model = io.load(model_path)
    out = tmp_path / "out.onnx"
    io.save(model, out, input_path=model_path)
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(_run(model_path, x), _run(out, x))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_load_external_data_and_save_single_file(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(_matmul_model(), path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    model = io.load(path)
    out = tmp_path / "single.onnx"
    io.save(model, out)
    proto = onnx.load(out, load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in proto.graph.initializer)
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(_run(path, x), _run(out, x))


def test_shape_inference_runs(tmp_path):
    model = _matmul_model()
    model.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3]))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    proto = io.load_proto(path)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.value_info}
    assert shapes["y"] == [1, 3]


@pytest.mark.parametrize("content, message", [
    (b"", "empty file, not an ONNX model"),
    (os.urandom(4096), "not an ONNX model or truncated/corrupt protobuf"),
    (pickle.dumps({"weights": np.zeros(100)}), "not an ONNX model or truncated/corrupt protobuf"),
])
def test_refuses_non_models(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        io.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_refuses_truncated_model(model_path):
    data = model_path.read_bytes()
    model_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated/corrupt protobuf"):
        io.load(model_path)


def test_refuses_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        io.load(tmp_path / "nope.onnx")


def test_refuses_missing_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(_matmul_model(), path, save_as_external_data=True, location="w.data", size_threshold=0)
    (tmp_path / "w.data").unlink()
    with pytest.raises(UserError, match="external data file 'w.data' .* is missing"):
        io.load(path)


def test_refuses_external_data_escaping_folder(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(_matmul_model(), path, save_as_external_data=True, location="w.data", size_threshold=0)
    proto = onnx.load(path, load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../../etc/passwd"
    onnx.save(proto, path)
    with pytest.raises(UserError, match="escapes the model's folder"):
        io.load(path)


def test_refuses_invalid_graph(tmp_path):
    model = _matmul_model()
    model.graph.node[0].input[1] = "undefined_tensor"
    path = tmp_path / "invalid.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(UserError, match="invalid ONNX model"):
        io.load(path)


def test_save_refuses_to_overwrite_input(model_path):
    before = model_path.read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite the input model"):
        io.save(io.load(model_path), model_path, input_path=model_path)
    assert model_path.read_bytes() == before


def test_save_refuses_missing_or_readonly_folder(model_path, tmp_path):
    model = io.load(model_path)
    with pytest.raises(UserError, match="does not exist"):
        io.save(model, tmp_path / "missing" / "out.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits
            pytest.skip("running as a user that can write anywhere")
        with pytest.raises(UserError, match="not writable"):
            io.save(model, locked / "out.onnx")
    finally:
        locked.chmod(0o700)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        io.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
