"""Run hygiene: diagnostics never fail the work, nothing is written outside the output folder and
the run's private temp folder, and errors name the user's files and recipe keys."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import yaml
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import deployopt
from deployopt.core.contain import Skipped, best_effort, confined
from deployopt.core.data import ArrayDataset
from deployopt.core.errors import UserError, WorkFailed
from deployopt.measure import latency
from deployopt.passes.context import PassContext
from deployopt.passes.quantize import QuantizePass
from deployopt.passes.quantize import quantize_pass
from deployopt.passes.quantize.prepare import prepare
from deployopt.passes.quantize.sqnr import weight_sqnr
from deployopt.report import UserPaths
from tests._fake_workers import load_failure_worker


class ScaleShiftNet(nn.Module):
    """Conv-ReLU, then a BatchNorm-like affine written by hand: a scalar scale (rank 0) feeding
    Mul and a per-channel shift (8x1x1) feeding Add, then Conv-ReLU, mean, Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor(1.7))
        self.shift = nn.Parameter(torch.randn(8, 1, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.c1(x)) * self.scale + self.shift
        return self.fc(torch.relu(self.c2(y)).mean((2, 3)))


def _export(net: nn.Module, *, opset: int, keep_inputs: bool = False) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(net, torch.zeros(1, 3, 16, 16), buf, dynamo=False, opset_version=opset,
                      input_names=["x"], keep_initializers_as_inputs=keep_inputs, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_from_string(buf.getvalue())


def _old_zoo_style() -> onnx.ModelProto:
    """A Caffe2-era classifier: opset 9, IR version 3, initializers listed as graph inputs,
    BatchNorm kept (rank-1 parameters), Dropout and Softmax."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Dropout(), nn.Linear(8, 4), nn.Softmax(1)).eval()
    proto = _export(net, opset=9, keep_inputs=True)
    proto.ir_version = 3
    return proto


@pytest.fixture(scope="module")
def scale_shift_proto():
    torch.manual_seed(0)
    return _export(ScaleShiftNet().eval(), opset=13)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((32, 3, 16, 16), dtype=np.float32)


def _quantize(proto, x, **settings):
    p = QuantizePass(latency_aware=False, **settings)
    p.context = PassContext(calibration=ArrayDataset(x))
    result = p(ir.from_proto(proto))
    return ir.to_proto(result.model), result


# -- diagnostics: fixed where they crashed, skipped (with the reason) where they still cannot run -----
def test_scalar_and_rank1_weights_get_a_weight_sqnr(scale_shift_proto, images, tmp_path):
    q, step = _quantize(scale_shift_proto, images)
    assert step.modified and "skipped" not in step.details["worst_sqnr"]
    q_path, f_path = tmp_path / "q.onnx", tmp_path / "f.onnx"
    onnx.save(q, str(q_path))
    onnx.save(scale_shift_proto, str(f_path))
    sqnr = weight_sqnr(f_path, q_path)
    # The Add's 8x1x1 shift is stored uint8 with a zero point: dequantized without wrap-around
    # its 8 values are within half a step of the float ones (onnxruntime's helper reads -13 dB).
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    x = numpy_helper.to_array(next(t for t in scale_shift_proto.graph.initializer if t.name == "shift"))
    s, z = float(inits["shift_scale"]), float(inits["shift_zero_point"])
    dq = (inits["shift_quantized"].astype(np.float64) - z) * s
    assert np.abs(dq - x).max() <= s / 2 + 1e-6
    expected = 20 * np.log10(np.linalg.norm(x) / np.linalg.norm(x - dq))
    assert sqnr["shift"] == pytest.approx(expected, abs=0.01) and sqnr["shift"] > 30
    assert all(np.isfinite(v) for v in sqnr.values())


def test_old_zoo_graph_gets_its_sqnr(images):
    q, step = _quantize(_old_zoo_style(), images)
    assert step.modified
    assert any("IR version raised from 3 to 7" in n for n in step.notes)
    worst = step.details["worst_sqnr"]
    assert isinstance(worst, list) and {r["kind"] for r in worst} == {"activation", "weight"}
    onnx.checker.check_model(q, full_check=True)


def test_failing_diagnostics_are_skipped_and_change_nothing(scale_shift_proto, images, monkeypatch):
    reference, _ = _quantize(scale_shift_proto, images)

    def broken(*args, **kwargs):
        raise RuntimeError("probe model refused")

    monkeypatch.setattr(quantize_pass, "ranked_tensors", broken)
    monkeypatch.setattr(quantize_pass, "ort_kernels", broken)
    q, step = _quantize(scale_shift_proto, images)
    assert step.failure is None and step.modified
    assert step.details["worst_sqnr"] == {"skipped": "RuntimeError: probe model refused"}
    assert step.details["ort_optimized"] == {"skipped": "RuntimeError: probe model refused"}
    assert "per-tensor SQNR skipped: RuntimeError: probe model refused" in step.notes
    assert "onnxruntime kernel count skipped: RuntimeError: probe model refused" in step.notes
    # the same model as with the diagnostics
    assert q.graph.node == reference.graph.node
    assert {t.name: t.raw_data for t in q.graph.initializer} == {t.name: t.raw_data for t in reference.graph.initializer}


def test_best_effort_and_confined(tmp_path, monkeypatch):
    assert best_effort(lambda a, b: a + b, 2, b=3) == 5
    skipped = best_effort(lambda: [][1])
    assert skipped == Skipped("IndexError: list index out of range")
    assert skipped.to_json() == {"skipped": "IndexError: list index out of range"}
    assert best_effort(lambda: (_ for _ in ()).throw(WorkFailed("worker died"))) == Skipped("worker died")
    with pytest.raises(KeyboardInterrupt):  # an interrupt is never a skipped diagnostic
        best_effort(lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    private = tmp_path / "private"
    private.mkdir()
    with pytest.raises(RuntimeError), confined(private):
        pathlib.Path("scratch.onnx").write_bytes(b"")
        tempfile.mkdtemp()
        raise RuntimeError
    assert os.getcwd() == str(here) and tempfile.gettempdir() != str(private)
    assert not list(here.iterdir()) and (private / "scratch.onnx").exists()
    assert len(list(private.iterdir())) == 2


# -- nothing written outside the output folder and the private temp folder ---------------------------
def _classifier_with_incomplete_shapes() -> onnx.ModelProto:
    """x (n x 3 x h x w) + its spatial transpose, conv, relu, global pool, matmul: h and w must be
    equal for the Add, which symbolic shape inference (without auto-merge) cannot conclude, so it
    stops and saves sym_shape_infer_temp.onnx (and <uuid>.data) in the current folder."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    fc = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32) * 0.3, "fc")
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 1, 3, 2], name="transpose"),
             helper.make_node("Add", ["x", "xt"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r0"], name="relu"),
             helper.make_node("Identity", ["r0"], ["r"], name="identity"),  # for cleanup to remove
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "incomplete_shapes",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])], [w, fc])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_preprocess_scratch_files_stay_in_the_private_folder(tmp_path, monkeypatch):
    cwd, folder = tmp_path / "cwd", tmp_path / "private"
    cwd.mkdir()
    folder.mkdir()
    monkeypatch.chdir(cwd)
    prepared = prepare(_classifier_with_incomplete_shapes(), folder, per_channel=True)
    assert any("symbolic shape inference skipped (Incomplete symbolic shape inference)" in n for n in prepared.notes)
    assert not list(cwd.iterdir())
    assert (folder / "sym_shape_infer_temp.onnx").exists()  # where onnxruntime's scratch went


def _listing(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_optimize_from_a_read_only_folder_leaves_no_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    model = data / "model.onnx"
    onnx.save(_classifier_with_incomplete_shapes(), str(model))
    rng = np.random.default_rng(1)
    np.savez(data / "calib.npz", x=rng.random((16, 3, 12, 12), dtype=np.float32))
    np.savez(data / "eval.npz", x=rng.random((24, 3, 12, 12), dtype=np.float32), y=rng.integers(0, 4, 24))
    recipe = data / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(model),
        "data": {"calibration": {"dataset": f"npz:{data / 'calib.npz'}"},
                 "evaluation": {"dataset": f"npz:{data / 'eval.npz'}"}},
        "passes": [{"cleanup": {}}, {"quantize": {"samples": 16, "latency_aware": False}}],
        "benchmark": {"threads": [1], "batch": [1], "warmup": 1, "runs": 5, "rounds": 1}}))
    cwd, tmp, out = tmp_path / "cwd", tmp_path / "tmp", tmp_path / "out"
    cwd.mkdir()
    tmp.mkdir()
    (cwd / "notes.txt").write_text("the user's file")
    before = _listing(cwd)
    cwd.chmod(0o555)  # read-only for a normal user (root writes anyway: the listing is the check)
    try:
        env = {**os.environ, "TMPDIR": str(tmp)}
        proc = subprocess.run([sys.executable, "-m", "deployopt.cli", "optimize", str(recipe), "-o", str(out)],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    finally:
        cwd.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _listing(cwd) == before
    assert _listing(tmp) == []  # the run's private folder is gone, nothing else appeared
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json", "report.md"]
    doc = json.loads((out / "report.json").read_text())
    assert [s["pass"] for s in doc["steps"]] == ["cleanup", "quantize"]
    assert all(s["accuracy"]["n"] == 24 for s in doc["steps"])  # the per-step accuracy ran
    quantize = doc["steps"][1]
    assert any("symbolic shape inference skipped" in n for n in quantize["notes"])


# -- errors name the user's files and recipe keys --------------------------------------------------
def _no_internal_path(text: str) -> None:
    assert ".deployopt-staging-" not in text and "step0_" not in text and "step1_" not in text
    assert os.path.join(tempfile.gettempdir(), "deployopt-") not in text


def _digits_like(root: pathlib.Path, *, max_label: int) -> pathlib.Path:
    """A 4-class model and a recipe whose evaluation labels go up to ``max_label``."""
    model = root / "classifier.onnx"
    onnx.save(_classifier_with_incomplete_shapes(), str(model))
    rng = np.random.default_rng(2)
    np.savez(root / "calib.npz", x=rng.random((8, 3, 12, 12), dtype=np.float32))
    np.savez(root / "eval.npz", x=rng.random((8, 3, 12, 12), dtype=np.float32),
             y=np.arange(8) % (max_label + 1))
    return model


def _recipe(root: pathlib.Path, model: pathlib.Path, passes: list) -> dict:
    return {"model": str(model),
            "data": {"calibration": {"dataset": f"npz:{root / 'calib.npz'}"},
                     "evaluation": {"dataset": f"npz:{root / 'eval.npz'}"}},
            "passes": passes,
            "benchmark": {"threads": [1], "batch": [1], "warmup": 1, "runs": 5, "rounds": 1}}


def test_evaluation_data_that_does_not_fit_names_the_model_and_key_and_leaves_no_folder(tmp_path):
    model = _digits_like(tmp_path, max_label=9)
    with pytest.raises(UserError) as caught:
        deployopt.optimize(_recipe(tmp_path, model, [{"cleanup": {}}]), tmp_path / "runs" / "out")
    assert not (tmp_path / "runs").exists(), "the refused run left the output folders it created"
    message = str(caught.value)
    assert message.startswith("data.evaluation: ")
    assert message == (f"data.evaluation: {model} after passes[0].cleanup: label 7 is outside the 4 classes "
                       "of the model's output")
    _no_internal_path(message)


def test_failing_step_guard_is_noted_with_the_users_names(tmp_path, monkeypatch):
    model = _digits_like(tmp_path, max_label=3)
    real_compare = latency.compare

    def compare(*args, **kwargs):
        return real_compare(*args, worker_entry=load_failure_worker, **kwargs)

    monkeypatch.setattr(latency, "compare", compare)
    passes = [{"cleanup": {"min_step_speedup": 1.0}}]
    result = deployopt.optimize(_recipe(tmp_path, model, passes), tmp_path / "out")
    step = result.steps[0]
    guard = step["details"]["step_guard"]
    assert guard["reverted"] is False and guard["speedup"] is None
    expected = f"cleanup step guard not measured: onnxruntime cannot load {model} after passes[0].cleanup: INVALID_GRAPH"
    assert guard["message"] == expected and expected in step["notes"]
    _no_internal_path(json.dumps(result.to_dict()))


def test_user_paths_rewrites_only_the_runs_files():
    names = UserPaths()
    names.add("/t/run/.deployopt-staging-x", "/home/u/out")
    names.add("/t/run/w/step1_input.onnx", "/home/u/m.onnx before passes[1].quantize")
    names.add_scratch("/t/run/w", "a working copy of /home/u/m.onnx")
    text = ("/t/run/w/step1_input.onnx: bad; Load model from /t/run/w/quantize-ab/sqnr_qdq.onnx failed; "
            "/t/run/.deployopt-staging-x/model.onnx; /t/run/w2/x.onnx; '/t/run/w'")
    assert names(text) == ("/home/u/m.onnx before passes[1].quantize: bad; Load model from sqnr_qdq.onnx "
                           "(a working copy of /home/u/m.onnx) failed; /home/u/out/model.onnx; /t/run/w2/x.onnx; "
                           "'a working copy of /home/u/m.onnx'")
