"""Accuracy/fidelity harness: metrics on hand-made logits against hand-computed values, a
logistic-regression classifier trained on sklearn digits for evaluate() and the CLI,
and refusal of bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployopt.measure import accuracy, metrics
from deployopt.cli import main as cli_main
from deployopt.core.data import ArrayDataset, open_dataset
from deployopt.core.errors import UserError

# -- metrics on hand-made logits ----------------------------------------------------------------

LOGITS = np.array([[1.0, 2.0, 3.0],
                   [3.0, 2.0, 1.0],
                   [0.0, 5.0, 1.0],
                   [2.0, 2.0, 0.0]])  # a tie: argmax picks class 0
LABELS = np.array([2, 1, 1, 1])


def test_topk_accuracy_hand_computed():
    # argmax rows: 2, 0, 1, 0 -> hits 1, 0, 1, 0
    assert metrics.topk_accuracy(LOGITS, LABELS, 1) == 0.5
    # top-2 sets: {2,1}, {0,1}, {1,2}, {0,1}: every label is inside
    assert metrics.topk_accuracy(LOGITS, LABELS, 2) == 1.0
    six = np.array([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], dtype=float)
    assert metrics.topk_accuracy(six, np.array([5, 0]), 5) == 0.0  # each label is ranked 6th
    assert metrics.topk_accuracy(six, np.array([4, 1]), 5) == 1.0
    with pytest.raises(ValueError):
        metrics.topk_accuracy(LOGITS, LABELS, 4)


def test_wilson_interval_known_values():
    # Wilson (1927) score interval, z = 1.96; reference values as tabulated by e.g. Newcombe
    # (1998): 8/10 -> [0.4902, 0.9433], 0/10 -> [0, 0.2775], 10/10 -> [0.7225, 1].
    assert metrics.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert metrics.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert metrics.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    # hand formula at 50/100
    z, n, p = 1.96, 100, 0.5
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert metrics.wilson_interval(50, 100) == pytest.approx((center - half, center + half))
    with pytest.raises(ValueError):
        metrics.wilson_interval(1, 0)


def test_fidelity_hand_computed():
    z = np.array([[1.0, 0.0], [0.0, 1.0]])
    r = np.array([[1.0, 0.0], [1.0, 0.0]])
    f = metrics.fidelity(z, r)
    assert f["agreement"] == 0.5
    assert f["agreement_ci"] == pytest.approx(list(metrics.wilson_interval(1, 2)))
    assert f["cosine"] == pytest.approx(0.5)  # rows: cos 1 and cos 0
    assert f["max_abs_diff"] == 1.0
    # row 1: p_r = softmax([1,0]), p_z = softmax([0,1]);
    # KL = (p - (1-p)) * ln(p / (1-p)) with p = e/(1+e), ln(p/(1-p)) = 1 -> tanh(1/2); row 0: 0
    assert f["kl"] == pytest.approx(math.tanh(0.5) / 2, rel=1e-12)


def test_fidelity_identical_and_scaled():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((50, 10))
    same = metrics.fidelity(z, z)
    assert same["agreement"] == 1.0 and same["max_abs_diff"] == 0.0
    assert same["cosine"] == pytest.approx(1.0) and same["kl"] == pytest.approx(0.0, abs=1e-12)
    scaled = metrics.fidelity(2 * z, z)  # same direction, sharper softmax: KL > 0, cosine 1
    assert scaled["cosine"] == pytest.approx(1.0) and scaled["agreement"] == 1.0
    assert scaled["kl"] > 0.01
    zero = metrics.fidelity(np.zeros((1, 3)), np.zeros((1, 3)))
    assert zero["cosine"] == 1.0
    with pytest.raises(ValueError):
        metrics.fidelity(z, z[:, :5])


def test_top1_agreement_hand_computed():
    # argmax rows of LOGITS: 2, 0, 1, 0 (the tie goes to class 0); reversed columns: 0, 2, 1, 1
    assert metrics.top1_agreement(LOGITS, LOGITS[:, ::-1]) == 0.25
    assert metrics.top1_agreement(LOGITS, LOGITS) == 1.0
    assert metrics.top1_agreement(LOGITS, LOGITS) == metrics.fidelity(LOGITS, LOGITS)["agreement"]
    sequence = np.stack([LOGITS, LOGITS[:, ::-1]])  # [N=2, T=4, classes=3]
    assert metrics.predicted_class(sequence).tolist() == [[2, 0, 1, 0], [0, 2, 1, 1]]
    assert metrics.class_agreement(np.array([1, 2]), np.array([1, 3])) == 0.5
    assert math.isnan(metrics.class_agreement(np.empty(0), np.empty(0)))


# -- a real classifier on real data -------------------------------------------------------------

def _digits(split):
    d = open_dataset(f"digits?split={split}")
    xs, ys = zip(*d.batches(512))
    return np.concatenate(xs), np.concatenate(ys)


def _gemm_model(path, w, b, *, out_shape=("N", 10), input_shape=("N", 1, 8, 8)):
    """x [N,1,8,8] -> Flatten -> Gemm(W^T) -> logits; out_shape may ask for a Reshape."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(w.astype(np.float32), "w"),
             numpy_helper.from_array(b.astype(np.float32), "b")]
    out = "logits"
    if len(out_shape) != 2:
        nodes.append(helper.make_node("Reshape", ["logits", "shape"], ["y"]))
        inits.append(numpy_helper.from_array(np.array([-1, *out_shape[1:]], np.int64), "shape"))
        out = "y"
    graph = helper.make_graph(
        nodes, "logreg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Logistic regression on the digits train split (deployopt's own preprocessing), as ONNX;
    plus a reference with weights rounded to 1/8 (a visibly different but close model)."""
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = _digits("train")
    clf = LogisticRegression(max_iter=300, C=1.0).fit(x_train.reshape(len(x_train), -1), y_train)
    d = tmp_path_factory.mktemp("eval")
    x_test, y_test = _digits("test")
    w, b = clf.coef_, clf.intercept_
    w_rounded = np.round(w * 8) / 8
    return {
        "model": _gemm_model(d / "logreg.onnx", w, b),
        "reference": _gemm_model(d / "rounded.onnx", w_rounded, b),
        "fixed_batch": _gemm_model(d / "fixed.onnx", w, b, out_shape=(1, 10),
                                   input_shape=(1, 1, 8, 8)),
        "not_logits": _gemm_model(d / "grid.onnx", w, b, out_shape=("N", 5, 2)),
        "x": x_test, "y": y_test, "w": w, "b": b, "w_ref": w_rounded, "dir": d,
        "sk_top1": float(clf.score(x_test.reshape(len(x_test), -1), y_test)),
    }


def test_evaluate_matches_numpy_on_trained_model(trained):
    x, y = trained["x"], trained["y"]
    data = ArrayDataset(x, y, name="digits-test")
    res = accuracy.evaluate(trained["model"], data, reference_path=trained["reference"],
                            batch_size=64, progress=False)
    flat = x.reshape(len(x), -1).astype(np.float64)
    z = flat @ trained["w"].T + trained["b"]
    r = flat @ trained["w_ref"].T + trained["b"]
    assert res["n"] == len(x) == 360 and res["classes"] == 10
    assert res["top1"] == pytest.approx(trained["sk_top1"], abs=1 / 360)
    assert res["top1"] > 0.9  # a real classifier, trained on real digits
    assert res["top5"] == pytest.approx(metrics.topk_accuracy(z, y, 5), abs=1 / 360)
    hits = round(res["top1"] * 360)
    assert res["top1_ci"] == pytest.approx(list(metrics.wilson_interval(hits, 360)))
    expected = metrics.fidelity(z, r)
    assert res["agreement"] == pytest.approx(expected["agreement"], abs=1 / 360)
    assert res["cosine"] == pytest.approx(expected["cosine"], abs=1e-5)
    assert res["max_abs_diff"] == pytest.approx(expected["max_abs_diff"], rel=1e-4)
    assert res["kl"] == pytest.approx(expected["kl"], rel=1e-3)
    assert 0 < res["max_abs_diff"] and res["agreement"] < 1.0 + 1e-12


def test_evaluate_fixed_batch_model_and_unlabeled(trained):
    x = trained["x"][:37]
    res = accuracy.evaluate(trained["fixed_batch"], ArrayDataset(x, name="unlabeled"),
                            reference_path=trained["model"], batch_size=16, progress=False)
    assert res["n"] == 37 and res["top1"] is None and res["top5"] is None
    assert res["agreement"] == 1.0 and res["max_abs_diff"] < 1e-5


def test_evaluate_refuses_shape_mismatch(trained):
    mnist_like = ArrayDataset(np.zeros((3, 1, 28, 28), np.float32), np.zeros(3), name="mnist")
    with pytest.raises(UserError) as e:
        accuracy.evaluate(trained["model"], mnist_like, progress=False)
    assert str(e.value) == (f"{trained['model']}: input 'x' has shape Nx1x8x8 but dataset mnist "
                            f"gives samples of shape 1x28x28")


def test_evaluate_refuses_non_logits_output(trained):
    data = ArrayDataset(trained["x"][:4], trained["y"][:4], name="d")
    with pytest.raises(UserError) as e:
        accuracy.evaluate(trained["not_logits"], data, progress=False)
    assert str(e.value) == (f"{trained['not_logits']}: output 'y' has shape Nx5x2; eval needs "
                            f"2-D logits [batch, classes]")


def test_evaluate_refuses_bad_settings_and_files(trained, tmp_path):
    data = ArrayDataset(trained["x"][:4], trained["y"][:4], name="d")
    with pytest.raises(UserError, match=r"^batch_size: 0 is not an integer >= 1$"):
        accuracy.evaluate(trained["model"], data, batch_size=0, progress=False)
    junk = tmp_path / "junk.onnx"
    junk.write_text("hello")
    with pytest.raises(UserError, match=r"junk\.onnx: not an ONNX model"):
        accuracy.evaluate(str(junk), data, progress=False)


def test_cli_eval_json(trained, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = cli_main(["eval", "--in-process", trained["model"], "--data", "digits?split=test", "--reference",
                   trained["reference"], "--json", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"top1", "top5", "top1_ci", "n", "agreement", "agreement_ci", "cosine",
                        "max_abs_diff", "kl"}
    assert res["n"] == 360 and res["top1"] == pytest.approx(trained["sk_top1"], abs=1 / 360)
    assert "top-1 " in capsys.readouterr().out


def test_cli_eval_bad_input_exit_2(trained, capsys):
    rgb = _gemm_model(trained["dir"] / "rgb.onnx", np.zeros((10, 192)), np.zeros(10),
                      input_shape=("N", 3, 8, 8))
    assert cli_main(["eval", "--in-process", rgb, "--data", "digits", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "deployopt: error: --data digits: samples are 1x8x8 but model input 'x' expects 3x8x8"]
    unlabeled = trained["dir"] / "unlabeled.npz"
    np.savez(unlabeled, x=trained["x"][:4])  # no y, and no --reference: nothing to measure
    assert cli_main(["eval", "--in-process", trained["model"], "--data", f"npz:{unlabeled}",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no labels and no --reference" in err[0]
    assert cli_main(["eval", "--in-process", trained["model"], "--data", "digits", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "deployopt: error: --batch-size: 0 is not an integer >= 1"]


# -- the noise floor ------------------------------------------------------------------------------

def test_noise_floor_matches_numpy_on_trained_model(trained):
    """The reference scored on its own inputs moved by up to one source unit (1/16 after the digits
    preprocessing), against its clean outputs: the numbers numpy gets from the same seeded draws."""
    data = open_dataset("digits?split=test")
    res = accuracy.evaluate(trained["model"], data, reference_path=trained["reference"], batch_size=64,
                            progress=False, noise_floor=1)
    rng = np.random.default_rng(accuracy.NOISE_SEED)
    clean, noisy = [], []
    for x, _ in data.batches(64):
        moved = x + rng.integers(-1, 2, size=x.shape).astype(np.float32) / 16
        for batch, out in ((x, clean), (moved, noisy)):
            out.append(batch.reshape(len(batch), -1).astype(np.float64) @ trained["w_ref"].T + trained["b"])
    expected = metrics.fidelity(np.concatenate(noisy), np.concatenate(clean))
    reference_top1 = np.concatenate(clean).argmax(1)
    stable = np.concatenate(noisy).argmax(1) == reference_top1
    model_top1 = (trained["x"].reshape(360, -1) @ trained["w"].T + trained["b"]).argmax(1)
    floor = res["noise_floor"]
    assert floor["stable"] == int(stable.sum()) < 360
    assert floor["agreement_on_stable"] == pytest.approx(
        float((model_top1 == reference_top1)[stable].mean()), abs=1 / 360)
    assert floor["levels"] == 1 and floor["of"] == "reference" and floor["n"] == 360
    assert floor["agreement"] == pytest.approx(expected["agreement"], abs=1 / 360)
    assert floor["kl"] == pytest.approx(expected["kl"], rel=1e-3)
    assert 0.5 < floor["agreement"] < 1  # one unit of 16 moves some digits, not most
    assert res["agreement"] == pytest.approx(metrics.fidelity(  # the model's own numbers are unchanged
        trained["x"].reshape(360, -1) @ trained["w"].T + trained["b"],
        trained["x"].reshape(360, -1) @ trained["w_ref"].T + trained["b"])["agreement"], abs=1 / 360)
    wider = accuracy.evaluate(trained["model"], data, progress=False, noise_floor=4)["noise_floor"]
    assert wider["of"] == "model" and wider["agreement"] < floor["agreement"]
    assert "agreement_on_stable" not in wider  # no other model to judge


def test_noise_floor_says_why_it_was_not_measured(trained):
    data = ArrayDataset(trained["x"][:8], trained["y"][:8], name="digits-arrays")
    res = accuracy.evaluate(trained["model"], data, reference_path=trained["reference"], progress=False,
                            noise_floor=1)
    assert res["noise_floor"] == {"levels": 1, "skipped": "dataset digits-arrays has no image preprocessing, "
                                                          "so one grey level has no size in its samples"}
    assert res["agreement"] is not None  # the evaluation itself still ran
    assert "noise_floor" not in accuracy.evaluate(trained["model"], data, progress=False)
    with pytest.raises(UserError, match=r"^noise_floor: -1 is not a whole number of grey levels >= 0$"):
        accuracy.evaluate(trained["model"], data, progress=False, noise_floor=-1)


def test_cli_eval_noise_floor(trained, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = cli_main(["eval", "--in-process", trained["model"], "--data", "digits?split=test", "--reference",
                   trained["reference"], "--noise-floor", "2", "--json", str(out), "--no-progress"])
    assert rc == 0
    floor = json.loads(out.read_text())["noise_floor"]
    assert floor["levels"] == 2 and floor["n"] == 360 and 0 < floor["agreement"] < 1
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Noise floor"))
    assert line.startswith("Noise floor (inputs moved by up to 2 grey levels): the reference agrees with itself on ")
    assert f"; on the {floor['stable']} samples whose top-1 that noise leaves unchanged the model agrees with it on " in line
    assert cli_main(["eval", "--in-process", trained["model"], "--data", "digits", "--noise-floor", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "deployopt: error: --noise-floor: -1 is not an integer >= 0"]
