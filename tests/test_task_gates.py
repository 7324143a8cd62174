"""Every accuracy decision judged by the task metric: the recipe's ``metrics``, the gate, the
per-step accuracy, quantize's fallback trials; the classic numbers of a classifier without
``metrics``; and the refusals of metrics or labels that do not fit."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from deployopt.cli import main
from deployopt.core.session import open_session
from tests._fixtures import mean_kl

SIDE = 12


def _save(nodes, inputs, outputs, inits, path) -> str:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _segmenter(path, *, outlier: float = 1.0, seed: int = 0) -> str:
    """x [N, 3, S, S] -> Conv 3x3 (8) -> Relu -> Conv 1x1 (4) -> out [N, 4, S, S] class maps.
    ``outlier`` scales the first hidden channel up (and its weight in the second conv down by
    the same factor): the float model is unchanged in kind, but one uint8 range per tensor then
    flattens the other seven channels."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.5
    w2 = rng.normal(size=(4, 8, 1, 1)).astype(np.float32)
    w1[0] *= outlier
    w2[:, 0] /= outlier
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["out"], name="conv2")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(4, np.float32), "b2")]
    return _save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, SIDE, SIDE])], inits, path)


def _classifier(path, seed: int = 0) -> str:
    """x [N, 1, 8, 8] -> Flatten -> Gemm -> out [N, 10] logits."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w", "b"], ["out"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(rng.normal(size=(10, 64)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "b")]
    return _save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 10])], inits, path)


def _outputs(path, x: np.ndarray) -> np.ndarray:
    return open_session(str(path), threads=1).run(None, {"x": x})[0]


def _recipe(root, model, *, evaluation, passes=None, **extra) -> str:
    recipe = {"model": str(model),
              "data": {"calibration": {"dataset": f"npz:{root / 'cal.npz'}"}, "evaluation": evaluation},
              "passes": passes if passes is not None else [{"quantize": {
                  "latency_aware": False, "min_step_speedup": None, "samples": 32, "rounding": "nearest",
                  "bias_correction": False}}],
              "benchmark": {"enabled": False}, **extra}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _optimize(recipe, out, *sets) -> int:
    return main(["optimize", recipe, "-o", str(out), "--in-process", *[a for s in sets for a in ("--set", s)]])


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # one line, no traceback
    return lines[0]


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    rng = np.random.default_rng(1)
    np.savez(root / "cal.npz", x=rng.normal(size=(32, 3, SIDE, SIDE)).astype(np.float32))
    x_eval = rng.normal(size=(24, 3, SIDE, SIDE)).astype(np.float32)
    np.savez(root / "eval.npz", x=x_eval)
    return root, x_eval


# -- (a) the gate reads the segmentation metric -----------------------------------------------------

def test_segmentation_gate_reads_pixel_agreement(seg, capsys):
    root, x = seg
    model = _segmenter(root / "seg.onnx", outlier=30.0)
    recipe = _recipe(root, model, evaluation={"dataset": f"npz:{root / 'eval.npz'}"},
                     gates={"max_accuracy_drop": 0.9})
    out = root / "out"
    assert _optimize(recipe, out, "metrics.out=segmentation") == 0
    doc = json.loads((out / "report.json").read_text())
    acc = doc["accuracy"]
    # the numbers onnxruntime gives: arg-max over the 4 classes, pixel by pixel
    expected = float(np.mean(_outputs(model, x).argmax(1) == _outputs(out / "model.onnx", x).argmax(1)))
    assert acc["metric"] == "pixel_agreement" and acc["score_in"] == 1.0
    assert acc["score_out"] == pytest.approx(expected, abs=1e-12)
    assert acc["drop"] == pytest.approx(1.0 - expected, abs=1e-12) and acc["drop"] > 0.005
    assert {"input", "output", "agreement", "metric", "drop", "score_in", "score_out", "metrics"} <= set(acc)
    assert acc["metrics"] == [{"outputs": ["out"], "kind": "segmentation", "metric": "pixel_agreement", "base": 1.0,
                               "score": acc["score_out"], "drop": acc["drop"]}]
    assert doc["gates"] == [{"name": "max_accuracy_drop", "limit": 0.9, "value": acc["drop"], "passed": True,
                             "metric": "pixel_agreement"}]
    step = doc["steps"][0]["accuracy"]
    assert step["score_name"] == "pixel_agreement" and step["score"] == pytest.approx(expected, abs=1e-12)
    assert step["top1"] is None and step["n"] == 24
    md = (out / "report.md").read_text()
    assert f"Judged by **pixel_agreement**: input 1.0000 → output {expected:.4f}, drop {1 - expected:.4f}" in md
    assert f"pixel_agreement {expected:.4f} ({1 - expected:.4f})" in md  # the step's line
    # a limit tighter than the measured drop fails the run, naming the metric
    tight = round(acc["drop"] / 2, 6)
    capsys.readouterr()
    assert _optimize(recipe, root / "tight", "metrics.out=segmentation", f"gates.max_accuracy_drop={tight}") == 1
    assert f"gate max_accuracy_drop not met: {acc['drop']:.4g} > {tight:g} (drop of pixel_agreement)" in \
        capsys.readouterr().err
    tight_doc = json.loads((root / "tight" / "report.json").read_text())
    assert tight_doc["exit_code"] == 1 and tight_doc["gates"][0]["passed"] is False


def test_segmentation_against_label_masks(seg):
    """With a mask folder the metric is mIoU against the masks, and the input's own mIoU is the base."""
    root, x = seg
    model = _segmenter(root / "seg_l.onnx", outlier=30.0, seed=2)
    masks = root / "masks"
    masks.mkdir()
    truth = _outputs(model, x).argmax(1).astype(np.uint8)
    truth[:, :3, :] = 0  # labels the float model gets partly wrong
    for i, m in enumerate(truth):
        Image.fromarray(m).save(masks / f"{i:03d}.png")
    recipe = _recipe(root, model, evaluation={"dataset": f"npz:{root / 'eval.npz'}", "labels": "masks"},
                     metrics={"out": "segmentation"})
    out = root / "out_labels"
    assert _optimize(recipe, out) == 0
    acc = json.loads((out / "report.json").read_text())["accuracy"]

    def miou(pred):
        m = np.bincount(truth.ravel().astype(np.int64) * 4 + pred.ravel(), minlength=16).reshape(4, 4)
        tp = np.diag(m).astype(float)
        union = m.sum(0) + m.sum(1) - tp
        return float((tp[union > 0] / union[union > 0]).mean())

    base, score = miou(_outputs(model, x).argmax(1)), miou(_outputs(out / "model.onnx", x).argmax(1))
    assert acc["metric"] == "miou" and base < 0.99
    assert acc["score_in"] == pytest.approx(base, abs=1e-12) and acc["score_out"] == pytest.approx(score, abs=1e-12)
    assert acc["drop"] == pytest.approx(base - score, abs=1e-12)


def test_masks_that_do_not_match_the_data_are_refused_before_any_pass(seg, tmp_path, capsys):
    root, _ = seg
    model = _segmenter(tmp_path / "seg.onnx")
    (tmp_path / "few").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((SIDE, SIDE), np.uint8)).save(tmp_path / "few" / f"{i}.png")
    recipe = _recipe(root, model, evaluation={"dataset": f"npz:{root / 'eval.npz'}", "labels": str(tmp_path / "few")},
                     metrics={"out": "segmentation"})
    assert _optimize(recipe, tmp_path / "out") == 2
    err = _error(capsys)
    assert err.endswith(f"data.evaluation.labels: labels {tmp_path / 'few'}: 3 masks but the data has 24 samples")
    assert "quantize" not in err and not (tmp_path / "out" / "model.onnx").exists()


# -- (b) the quantize fallback judged by the task metric --------------------------------------------

def test_quantize_fallback_meets_a_segmentation_tolerance(seg):
    root, x = seg
    model = _segmenter(root / "outlier.onnx", outlier=300.0)
    passes = [{"quantize": {"latency_aware": False, "min_step_speedup": None, "samples": 32, "rounding": "nearest",
                            "bias_correction": False, "max_accuracy_drop": 0.03, "fallback_rank": "sqnr"}}]
    recipe = _recipe(root, model, evaluation={"dataset": f"npz:{root / 'eval.npz'}"}, passes=passes,
                     metrics={"out": {"kind": "segmentation"}})
    out = root / "out_fallback"
    assert _optimize(recipe, out) == 0
    doc = json.loads((out / "report.json").read_text())
    fb = doc["steps"][0]["details"]["fallback"]
    first, chosen = fb["trials"][0], fb["trials"][fb["chosen_trial"]]
    assert all(t["metric"] == "pixel_agreement" for t in fb["trials"])
    assert fb["metric"] == "pixel_agreement" and fb["float_pixel_agreement"] == 1.0
    assert first["drop"] > 0.03 and not first["met"]  # one uint8 range flattens the small channels
    assert fb["met"] and chosen["met"] and chosen["drop"] <= 0.03 and fb["nodes_to_float"]
    assert chosen["pixel_agreement"] == pytest.approx(1 - chosen["drop"], abs=2e-5)
    agreement = float(np.mean(_outputs(model, x).argmax(1) == _outputs(out / "model.onnx", x).argmax(1)))
    assert 1 - agreement <= 0.03 and doc["accuracy"]["drop"] == pytest.approx(1 - agreement, abs=1e-12)


# -- (c) refusals -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_data(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("cls")
    x, y = digits
    np.savez(root / "cal.npz", x=x[:64])
    np.savez(root / "eval.npz", x=x[1400:1600], y=y[1400:1600])
    np.savez(root / "eval_unlabelled.npz", x=x[1400:1600])
    return root, _classifier(root / "cls.onnx")


@pytest.mark.parametrize("change, message", [
    ({"metrics": {"nope": "detection"}}, "metrics.nope: the model has no output 'nope' (outputs: out)"),
    ({"metrics": {"out": "detection"}}, "metrics.out: metric detection: output 'out' has shape Nx10; detection needs"),
    ({"metrics": {"out": {"kind": "segmentation", "thresh": 0.3}}},
     "metrics.out.thresh: unknown key (allowed: axis, threshold, ignore_index)"),
    ({"labels": "missing.json"}, "data.evaluation.labels: {root}/missing.json: no such file or folder"),
    ({"labels": "cls.onnx"}, "data.evaluation.labels: no metric reads a labels file ({root}/cls.onnx); name one"),
])
def test_metrics_and_labels_that_do_not_fit_are_refused(digits_data, tmp_path, capsys, change, message):
    root, model = digits_data
    evaluation = {"dataset": f"npz:{root / 'eval.npz'}"}
    if "labels" in change:
        evaluation["labels"] = change.pop("labels")
    recipe = _recipe(root, model, evaluation=evaluation, **change)
    assert _optimize(recipe, tmp_path / "out") == 2
    assert message.format(root=root) in _error(capsys)
    assert not (tmp_path / "out" / "report.json").exists()


# -- (d) a classifier without metrics keeps the classic numbers ------------------------------------

@pytest.mark.parametrize("labelled", [True, False])
def test_classifier_without_metrics_keeps_the_classic_accuracy(digits_data, digits, tmp_path, labelled):
    root, model = digits_data
    x, y = digits[0][1400:1600], digits[1][1400:1600]
    name = "eval.npz" if labelled else "eval_unlabelled.npz"
    recipe = _recipe(root, model, evaluation={"dataset": f"npz:{root / name}"}, gates={"max_accuracy_drop": 1.0})
    assert _optimize(recipe, tmp_path / "out") == 0
    acc = json.loads((tmp_path / "out" / "report.json").read_text())["accuracy"]
    pred_in, pred_out = _outputs(model, x).argmax(1), _outputs(tmp_path / "out" / "model.onnx", x).argmax(1)
    agreement = float(np.mean(pred_in == pred_out))
    assert acc["agreement"] == pytest.approx(agreement, abs=1e-12)
    if labelled:  # the top-1 drop, as always
        top1_in, top1_out = float(np.mean(pred_in == y)), float(np.mean(pred_out == y))
        assert acc["metric"] == "top1" and acc["input"]["top1"] == pytest.approx(top1_in, abs=1e-12)
        assert acc["drop"] == pytest.approx(top1_in - top1_out, abs=1e-12)
        assert acc["drop"] == acc["input"]["top1"] - acc["output"]["top1"]
        assert acc["score_in"] == acc["input"]["top1"] and acc["score_out"] == acc["output"]["top1"]
    else:  # 1 - agreement
        assert acc["metric"] == "agreement" and acc["input"]["top1"] is None
        assert acc["drop"] == pytest.approx(1.0 - agreement, abs=1e-12) and acc["score_in"] == 1.0


def test_gate_on_kl_judges_the_whole_distribution(digits_data, digits, tmp_path, capsys):
    root, model = digits_data
    x = digits[0][1400:1600]
    recipe = _recipe(root, model, evaluation={"dataset": f"npz:{root / 'eval.npz'}"},  # labelled: not read
                     gates={"max_accuracy_drop": 0.9}, metrics={"out": {"kind": "classification", "score": "kl"}})
    assert _optimize(recipe, tmp_path / "out") == 0
    acc = json.loads((tmp_path / "out" / "report.json").read_text())["accuracy"]
    kl = mean_kl(_outputs(model, x), _outputs(tmp_path / "out" / "model.onnx", x))
    assert acc["metric"] == "exp_neg_kl" and acc["score_in"] == 1.0 and kl > 0
    assert acc["drop"] == pytest.approx(1 - np.exp(-kl), rel=1e-6)
    tight = round(acc["drop"] / 2, 8)
    capsys.readouterr()
    assert _optimize(recipe, tmp_path / "tight", f"gates.max_accuracy_drop={tight}") == 1
    assert "(drop of exp_neg_kl)" in capsys.readouterr().err
