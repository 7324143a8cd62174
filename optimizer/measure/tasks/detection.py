"""Detection: boxes decoded from the model's heads, judged against a reference model or labels.

Against the reference model, per image, the decoded boxes of both models are matched greedily
in decreasing IoU, a pair counting when it has the same class and IoU >= ``match_iou``; over all
images, with TP matched pairs, P the model's boxes and R the reference's,
    box agreement F1 = 2 TP / (P + R)      (1 when neither model finds a box)
    mean IoU         = mean IoU of the matched pairs.
Against COCO-style labels: mAP@0.5 and mAP@0.5:0.95 by pycocotools' COCOeval. Boxes are in the
model's input pixels; with ``label_coords: image`` they are scaled to each label image's
width/height (the stretch resize that fed the model), with ``input`` used as they are.
Decoding and NMS are in ``deployopt.measure.tasks.boxes``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from deployopt.core.errors import UserError
from deployopt.core.settings import Settings, setting
from deployopt.measure.tasks import boxes as B
from deployopt.measure.tasks.base import Metric, does_not_fit

NEEDS = ("[N, boxes, 4+1+C] (yolov5), [N, 4+C, boxes] (yolov8), score/box-distribution map pairs (gfl) "
         "or decoded boxes, scores, classes (decoded)")


@dataclasses.dataclass
class DetectionSettings(Settings):
    layout: Literal["auto", "yolov5", "yolov8", "gfl", "decoded"] = "auto"
    score_threshold: float = setting(0.25, low=0, high=1)
    nms_iou: float = setting(0.5, low=0, high=1)
    max_detections: int = setting(100, low=1)
    match_iou: float = setting(0.5, low=0, high=1, low_open=True)
    #: class scores as the model gives them ("none"), or logits to pass through a sigmoid;
    #: "auto" looks at the first batch (any score outside [0, 1] means logits)
    score_activation: Literal["auto", "none", "sigmoid"] = "auto"
    #: YOLO boxes are centre/size by default, the others corners
    box_format: Literal["auto", "xyxy", "cxcywh"] = "auto"
    label_coords: Literal["image", "input"] = "image"


def _known(shape: Sequence[Any]) -> bool:
    return all(isinstance(d, (int, np.integer)) for d in shape)


class DetectionMetric(Metric):
    kind = "detection"

    def __init__(self, settings: DetectionSettings, outputs: Sequence[str], *, input_hw=None, labels=None, **_):
        super().__init__(outputs)
        self.settings, self.input_hw, self.labels = settings, input_hw, labels
        self.layout = None if settings.layout == "auto" else settings.layout
        self.activation = None if settings.score_activation == "auto" else settings.score_activation
        self.tp = self.n_model = self.n_ref = 0
        self.iou_sum = 0.0
        self.images = 0
        self.results: list[dict] = []  # detections in COCO result form, for mAP
        self.unmapped = 0
        self.compared = False  # a reference was given

    # -- layout ----------------------------------------------------------------------------------
    def check(self, shapes: Mapping[str, Sequence[Any]]) -> None:
        names = self.outputs or list(shapes)
        chosen = [tuple(shapes[n]) for n in names]
        if any(len(s) < 2 for s in chosen) or (len(chosen) == 1 and len(chosen[0]) == 2 and chosen[0][-1] not in (4, 6)):
            bad = next(i for i, s in enumerate(chosen) if len(s) <= 2)
            raise does_not_fit(self.kind, names[bad], chosen[bad], NEEDS)
        if self.layout is None and all(_known(s[1:]) for s in chosen):
            self.layout = B.detect_layout([s if _known(s) else (1, *s[1:]) for s in chosen])
            if self.layout is None:
                raise does_not_fit(self.kind, names[0], chosen[0], NEEDS + "; set layout when the shape is ambiguous")
        if self.layout == "gfl":  # the input's height and width come with the data (decode needs them)
            B.gfl_split(names, [s if _known(s) else (1, *s[1:]) for s in chosen])

    def _scores(self, x: np.ndarray) -> np.ndarray:
        if self.activation is None:
            self.activation = "sigmoid" if x.size and (x.min() < 0 or x.max() > 1) else "none"
        return B.sigmoid(x) if self.activation == "sigmoid" else x

    def decode(self, arrays: Sequence[np.ndarray]) -> list[B.Detections]:
        """The detections of every image of one batch."""
        s = self.settings
        if self.layout is None:
            self.layout = B.detect_layout([a.shape for a in arrays])
            if self.layout is None:
                names = self.outputs or ["output"]
                raise does_not_fit(self.kind, names[0], arrays[0].shape, NEEDS + "; set layout")
        if self.layout == "decoded":
            return self._decoded(arrays)
        per_image: list[tuple[np.ndarray, np.ndarray]] = []  # (boxes xyxy [K, 4], class scores [K, C])
        if self.layout == "gfl":
            names = self.outputs or [f"output {i}" for i in range(len(arrays))]
            score_idx, dist_idx = B.gfl_split(names, [a.shape for a in arrays])
            if self.input_hw is None:
                raise UserError("metric detection: layout gfl needs the model input's height and width")
            height, width = self.input_hw
            try:
                strides = B.gfl_strides([arrays[i].shape[1] for i in score_idx], height, width)
            except ValueError as e:
                raise does_not_fit(self.kind, names[score_idx[0]], arrays[score_idx[0]].shape,
                                   f"score maps on a stride grid of the input ({e})") from None
            for n in range(arrays[0].shape[0]):
                per_image.append(B.gfl_decode([self._scores(arrays[i][n]) for i in score_idx],
                                              [arrays[i][n] for i in dist_idx], strides, width))
        else:
            a = arrays[0].astype(np.float64)
            if self.layout == "yolov8":
                a = a.transpose(0, 2, 1)
            fmt = "cxcywh" if s.box_format == "auto" else s.box_format
            for row in a:
                xy = B.cxcywh_to_xyxy(row[:, :4]) if fmt == "cxcywh" else row[:, :4]
                if self.layout == "yolov5":
                    scores = self._scores(row[:, 4:5]) * self._scores(row[:, 5:])
                else:
                    scores = self._scores(row[:, 4:])
                per_image.append((xy, scores))
        out = []
        for xy, scores in per_image:
            best, cls = B.best_class(scores)
            keep = best > s.score_threshold
            out.append(B.nms(xy[keep], best[keep], cls[keep], iou=s.nms_iou, max_detections=s.max_detections))
        return out

    def _decoded(self, arrays: Sequence[np.ndarray]) -> list[B.Detections]:
        s = self.settings
        if len(arrays) == 1:
            a = arrays[0] if arrays[0].ndim == 3 else arrays[0][None]
            parts = [(r[:, :4], r[:, 4], r[:, 5]) for r in a]
        else:
            boxes, scores, classes = (x if x.ndim == want else x[None] for x, want in zip(arrays, (3, 2, 2)))
            parts = list(zip(boxes, scores, classes))
        out = []
        for xy, score, cls in parts:
            xy = B.cxcywh_to_xyxy(xy) if s.box_format == "cxcywh" else xy
            keep = np.flatnonzero(score > s.score_threshold)
            keep = keep[np.argsort(-score[keep], kind="stable")][:s.max_detections]
            out.append(B.Detections(xy[keep].astype(np.float64), score[keep].astype(np.float64),
                                    cls[keep].astype(np.int64)))
        return out

    # -- accumulate ------------------------------------------------------------------------------
    def accumulate(self, outputs, reference_outputs=None, labels=None) -> None:
        found = self.decode(self.selected(outputs))
        if reference_outputs is not None:
            self.compared = True
            for mine, ref in zip(found, self.decode(self.selected(reference_outputs))):
                tp, iou_sum = match(mine, ref, self.settings.match_iou)
                self.tp += tp
                self.iou_sum += iou_sum
                self.n_model += len(mine.scores)
                self.n_ref += len(ref.scores)
        if labels is not None:
            self._add_results(found, labels)
        self.images += len(found)

    def _add_results(self, found: list[B.Detections], images: list[dict]) -> None:
        if len(images) != len(found):
            raise UserError(f"metric detection: {len(found)} images in a batch but {len(images)} labels")
        categories = self.labels.category_ids
        for det, image in zip(found, images):
            sx = sy = 1.0
            if self.settings.label_coords == "image" and self.input_hw is not None:
                sy, sx = image["height"] / self.input_hw[0], image["width"] / self.input_hw[1]
            for (x1, y1, x2, y2), score, cls in zip(det.boxes, det.scores, det.classes):
                if not 0 <= cls < len(categories):
                    self.unmapped += 1
                    continue
                self.results.append({"image_id": image["id"], "category_id": categories[int(cls)],
                                     "bbox": [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy],
                                     "score": float(score)})

    def result(self) -> dict[str, Any]:
        res: dict[str, Any] = {"images": self.images}
        if self.compared:
            total = self.n_model + self.n_ref
            res.update(f1=1.0 if total == 0 else 2 * self.tp / total, matched=self.tp, boxes=self.n_model,
                       reference_boxes=self.n_ref, mean_iou=self.iou_sum / self.tp if self.tp else None)
        if self.labels is not None:
            res.update(coco_map(self.labels.coco(), self.results), unmapped_detections=self.unmapped)
            res.update(score=res["map50"], score_name="map50")
        else:
            res.update(score=res.get("f1"), score_name="f1")
        return res


def match(mine: B.Detections, ref: B.Detections, min_iou: float) -> tuple[int, float]:
    """Greedy one-to-one matching in decreasing IoU of same-class pairs with IoU >= ``min_iou``:
    (matched pairs, sum of their IoUs)."""
    if not len(mine.scores) or not len(ref.scores):
        return 0, 0.0
    iou = B.iou_matrix(mine.boxes, ref.boxes)
    iou[mine.classes[:, None] != ref.classes[None, :]] = 0.0
    pairs = np.argwhere(iou >= min_iou)
    pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")]
    used_m, used_r = set(), set()
    tp, total = 0, 0.0
    for i, j in pairs:
        if i in used_m or j in used_r:
            continue
        used_m.add(i)
        used_r.add(j)
        tp += 1
        total += float(iou[i, j])
    return tp, total


def coco_map(ground_truth, results: list[dict]) -> dict[str, float | None]:
    """{map50, map50_95} of ``results`` (COCO result dicts) against a pycocotools COCO index;
    0 without detections, None without labelled boxes."""
    if not ground_truth.getAnnIds():
        return {"map50": None, "map50_95": None}
    if not results:
        return {"map50": 0.0, "map50_95": 0.0}
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        found = ground_truth.loadRes(results)
        ev = COCOeval(ground_truth, found, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map50": max(float(ev.stats[1]), 0.0), "map50_95": max(float(ev.stats[0]), 0.0)}
