"""The distill pass: a digits teacher (ONNX, trained here in seconds) and a 3.9x cheaper student.

Structure: the swapped model is the exported student with the teacher's input/output names and
dynamic batch; a rejected student leaves the teacher's graph as it was. Numbers: agreement with
the teacher rises with training, the recorded top-1 equals an independent onnxruntime run, the
same seed gives bit-identical weights. Refusal: each bad input with its message.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from deployopt import models
from deployopt.core import io
from deployopt.passes.context import PassContext
from deployopt.core.data import ArrayDataset
from deployopt.core.errors import UserError
from deployopt.models.export import export_model
from deployopt.passes.distill import train as dt
from deployopt.passes.distill import DistillPass
from tests._fixtures import train_classifier

FAST = {"augment": False, "exporter": "torchscript", "latency_runs": 0, "batch_size": 32}
STUDENT = {"student": "digits_cnn", "student_kwargs": {"width": 8}}  # 3.9x fewer MACs than width 16


def mnist_mlp() -> torch.nn.Module:
    """A student for 28x28 inputs that cannot take the 8x8 teacher's input."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    net.default_input_shape = (1, 1, 28, 28)
    return net


@pytest.fixture(scope="module")
def digits(digits_shuffled):
    x, y = digits_shuffled
    return {"train": (x[:1200], y[:1200]), "test": (x[1200:], y[1200:])}


@pytest.fixture(scope="module")
def teacher_path(digits, tmp_path_factory):
    """digits_cnn (width 16) trained 5 epochs on 1,200 sklearn digits, exported with dynamic batch."""
    net = models.build("digits_cnn", width=16, seed=0).train()
    with dt.torch_state(1):
        train_classifier(net, *digits["train"], epochs=5, lr=0.01, shuffle=False)
    path = tmp_path_factory.mktemp("distill") / "teacher.onnx"
    export_model(net.eval(), path, (1, 1, 8, 8), dynamic_batch=True, input_name="pixels",
                 output_name="logits", exporter="torchscript")
    return path


def run(teacher_path, digits, tmp_path, *, labeled_eval=True, **fields):
    step = DistillPass(**{**STUDENT, **FAST, **fields})
    xe, ye = digits["test"]
    step.context = PassContext(training=ArrayDataset(*digits["train"], name="digits-train"),
                               evaluation=ArrayDataset(xe, ye if labeled_eval else None, name="digits-test"),
                               seed=0, work_dir=tmp_path, threads=1)
    teacher = io.load(teacher_path)
    return teacher, step(teacher), step


def top1(model: ir.Model, x: np.ndarray, y: np.ndarray) -> float:
    proto = ir.to_proto(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(np.mean(sess.run(None, {"pixels": x})[0].argmax(1) == y))


def initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def test_teacher_is_accurate(teacher_path, digits):
    assert top1(io.load(teacher_path), *digits["test"]) >= 0.95


def test_swap_student_learns_the_teacher(teacher_path, digits, tmp_path):
    teacher, result, step = run(teacher_path, digits, tmp_path, epochs=10, lr=0.01,
                                max_accuracy_drop=0.03, latency_runs=5)
    d, notes = result.details, result.notes
    assert result.modified and result.model is not teacher
    # Agreement on the held-out tenth of the training set rises from chance to near the teacher.
    history = [h["holdout_agreement"] for h in d["training"]["history"]]
    assert history[0] < 0.3 and d["training"]["best_holdout_agreement"] >= 0.9
    assert max(history[-3:]) > history[1]
    assert d["training"]["samples"] == 1080 and d["training"]["holdout"] == 120
    assert d["training"]["history"][-1]["holdout_top1"] >= 0.85  # labelled: top-1 reported too
    # The swapped model is the student: the teacher's interface, 3.9x fewer MACs.
    student = result.model
    assert [v.name for v in student.graph.inputs] == ["pixels"]
    assert [v.name for v in student.graph.outputs] == ["logits"]
    assert not isinstance(student.graph.inputs[0].shape[0], int)  # dynamic batch kept
    assert d["teacher"]["macs"] == 599_680 and d["student"]["macs"] == 152_384
    assert d["mac_ratio"] == pytest.approx(3.935, abs=1e-3)
    # The recorded scores are what onnxruntime gives on the evaluation set.
    dec = d["decision"]
    assert dec["metric"] == "top1" and dec["swapped"] and dec["n"] == 597
    assert dec["student"] == pytest.approx(top1(student, *digits["test"]), abs=1e-12)
    assert dec["teacher"] == pytest.approx(top1(teacher, *digits["test"]), abs=1e-12)
    assert dec["drop"] == pytest.approx(dec["teacher"] - dec["student"]) and dec["drop"] <= 0.03
    assert any(n.startswith(f"student swapped in: digits_cnn, drop {dec['drop']:.4f} <= 0.03") for n in notes)
    assert d["latency"]["speedup"] > 0 and d["latency"]["teacher_p50_ms"] > 0
    assert d["export"]["max_abs_diff"] <= 1e-4


def test_reject_keeps_the_teacher(teacher_path, digits, tmp_path):
    # Unlabelled data: pure KL training and agreement as the metric; one slow epoch is too weak.
    step_data = digits["train"][0]
    teacher = io.load(teacher_path)
    before = onnx.printer.to_text(ir.to_proto(teacher).graph)
    step = DistillPass(**STUDENT, **FAST, epochs=1, lr=1e-4, max_accuracy_drop=0.0)
    step.context = PassContext(training=ArrayDataset(step_data, name="unlabelled"),
                               evaluation=ArrayDataset(digits["test"][0], name="digits-test"),
                               seed=0, work_dir=tmp_path, threads=1)
    result = step(teacher)
    d = result.details
    assert not result.modified and result.model is not teacher
    assert onnx.printer.to_text(ir.to_proto(result.model).graph) == before  # the teacher, as it was
    assert onnx.printer.to_text(ir.to_proto(teacher).graph) == before  # and the input is untouched
    assert d["decision"]["metric"] == "agreement" and d["decision"]["teacher"] == 1.0
    drop = d["decision"]["drop"]
    assert drop == pytest.approx(1.0 - d["decision"]["agreement"])
    # One epoch at lr 1e-4 leaves the student at chance on 10 classes: it agrees with the teacher
    # on about one sample in ten, so the drop is about 0.9, far above the 0 allowed.
    assert drop == pytest.approx(0.9, abs=0.03)
    assert f"student rejected: drop {drop:.4f} > 0 (agreement " in "\n".join(result.notes)
    assert "data.training has no labels: pure KL to the teacher (alpha not used)" in result.notes
    assert d["latency"] is None and d["training"]["labeled"] is False


def test_same_seed_same_weights(teacher_path, digits, tmp_path):
    fields = {"epochs": 1, "augment": True, "crop_padding": 1, "flip": True, "max_accuracy_drop": 1.0}
    a = initializers(run(teacher_path, digits, tmp_path, seed=7, **fields)[1].model)
    b = initializers(run(teacher_path, digits, tmp_path, seed=7, **fields)[1].model)
    c = initializers(run(teacher_path, digits, tmp_path, seed=8, **fields)[1].model)
    assert a.keys() == b.keys() and len(a) >= 4
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if k in c)
    assert torch.are_deterministic_algorithms_enabled() is False  # the caller's setting is restored


def test_onnx_student_is_renamed_and_swapped(teacher_path, digits, tmp_path):
    # A student trained elsewhere: here the teacher's own network under other I/O names (drop 0).
    proto = onnx.load(teacher_path)
    other = tmp_path / "elsewhere.onnx"
    renamed = ir.from_proto(proto)
    renamed.graph.inputs[0].name, renamed.graph.outputs[0].name = "image", "scores"
    io.save(renamed, other)
    teacher, result, step = run(teacher_path, digits, tmp_path, student={"onnx": str(other)},
                                student_kwargs={}, max_accuracy_drop=0.0)
    assert result.modified and result.details["decision"]["drop"] == 0.0
    assert [v.name for v in result.model.graph.inputs] == ["pixels"]
    assert [v.name for v in result.model.graph.outputs] == ["logits"]
    assert "student input 'image' renamed to the teacher's 'pixels'" in result.notes
    assert result.details["training"] is None


def test_recipe_layer_builds_the_pass():
    from deployopt.core.settings import build_settings

    step = build_settings(DistillPass, {"student": {"onnx": "s.onnx"}, "relative": True},
                          "passes[0].distill")
    assert step.student == {"onnx": "s.onnx"} and step.relative
    with pytest.raises(UserError, match=r"^passes\[0\]\.distill\.epochs: 0 is outside \[1, inf\)$"):
        build_settings(DistillPass, {"student": "digits_cnn", "epochs": 0}, "passes[0].distill")


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"student": "nope"}, "student: unknown model 'nope' (valid: seed_cnn, resnet18, mobilenet_v2, "
                          "efficientnet_lite0, resnet_mnist, student_mnist, student_cifar, digits_cnn, "
                          "mobilenet_v3_small, prelu_facenet, gated_cnn, ocr_crnn, "
                          "or package.module:callable, or {onnx: PATH})"),
    ({"student": None}, "student: required (a models/ name, package.module:callable or {onnx: PATH})"),
    ({"student": "digits_cnn", "epochs": 0}, "epochs: 0 is outside [1, inf)"),
    ({"student": "digits_cnn", "batch_size": 1}, "batch_size: 1 is outside [2, inf)"),
    ({"student": "digits_cnn", "alpha": 1.5}, "alpha: 1.5 is outside [0, 1]"),
    ({"student": {"onnx": "s.onnx"}, "student_kwargs": {"width": 4}},
     "student_kwargs: not used with an ONNX student ({onnx: PATH})"),
])
def test_bad_settings(fields, message):
    with pytest.raises(UserError) as info:
        DistillPass(**fields)
    assert str(info.value) == message and info.value.exit_code == 2


def _refused(teacher_path, digits, tmp_path, *, training=None, **fields) -> str:
    """Run the pass expecting a UserError; the teacher is untouched and no files are left."""
    step = DistillPass(**{**STUDENT, **FAST, **fields})
    if training is None:
        training = ArrayDataset(*digits["train"], name="digits-train")
    step.context = PassContext(training=training, evaluation=ArrayDataset(*digits["test"], name="digits-test"),
                               seed=0, work_dir=tmp_path, threads=1)
    teacher = io.load(teacher_path)
    before = onnx.printer.to_text(ir.to_proto(teacher).graph)
    with pytest.raises(UserError) as info:
        step(teacher)
    assert info.value.exit_code == 2
    assert onnx.printer.to_text(ir.to_proto(teacher).graph) == before
    assert not list(tmp_path.glob("distill-*"))  # the private folder is removed
    return str(info.value)


def test_unimportable_student(teacher_path, digits, tmp_path):
    message = _refused(teacher_path, digits, tmp_path, student="no_such_pkg.mod:make")
    assert message == ("student: model 'no_such_pkg.mod:make': cannot import module 'no_such_pkg.mod' "
                       "(No module named 'no_such_pkg')")


def test_student_input_shape_mismatch(teacher_path, digits, tmp_path):
    message = _refused(teacher_path, digits, tmp_path, student="tests.test_distill:mnist_mlp", student_kwargs={})
    assert message.startswith(
        "student 'tests.test_distill:mnist_mlp': does not accept the teacher's input [N, 1, 8, 8]; "
        "it expects [1, 1, 28, 28] (RuntimeError: mat1 and mat2 shapes cannot be multiplied")


def test_student_output_shape_mismatch(teacher_path, digits, tmp_path):
    message = _refused(teacher_path, digits, tmp_path, student_kwargs={"num_classes": 5})
    assert message == "student 'digits_cnn': output [N, 5] does not match the teacher's output [N, 10]"


def test_onnx_student_shape_mismatch(teacher_path, digits, tmp_path):
    path = tmp_path / "mnist_student.onnx"
    export_model(models.build("student_mnist", width=4), path, (1, 1, 28, 28), dynamic_batch=True,
                 exporter="torchscript")
    message = _refused(teacher_path, digits, tmp_path, student={"onnx": str(path)}, student_kwargs={})
    assert message == f"student {path}: input [N, 1, 28, 28] does not match the teacher's input [N, 1, 8, 8]"


def test_empty_training_set(teacher_path, digits, tmp_path):
    empty = ArrayDataset(np.zeros((0, 1, 8, 8), np.float32), name="empty")
    message = _refused(teacher_path, digits, tmp_path, training=empty)
    assert message == "data.training: dataset 'empty' is empty (no samples to train on)"


def test_training_samples_of_another_shape(teacher_path, digits, tmp_path):
    other = ArrayDataset(np.zeros((4, 1, 28, 28), np.float32), name="mnist-like")
    message = _refused(teacher_path, digits, tmp_path, training=other)
    assert message == ("data.training: samples of dataset 'mnist-like' are [1, 28, 28] but the teacher "
                       "input 'pixels' expects [N, 1, 8, 8]")
