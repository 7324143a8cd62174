"""Boxes from raw detection heads: decoding, non-maximum suppression, IoU.

Every decoder returns, per image, ``Detections(boxes [K, 4] xyxy in input pixels, scores [K],
classes [K])`` after a score threshold and class-wise NMS. Layouts:

``yolov5``  one output ``[N, boxes, 4+1+C]``: (cx, cy, w, h, objectness, class scores);
            score = objectness * class score.
``yolov8``  one output ``[N, 4+C, boxes]``: (cx, cy, w, h, class scores), no objectness.
``gfl``     anchor-free score + box-distribution heads (PicoDet, GFL, NanoDet): per stride s a
            score map ``[N, HW, C]`` and a distribution map ``[N, HW, 4(R+1)]``. The cell at
            column x, row y of a ceil(H/s) x ceil(W/s) grid has centre c = ((x+0.5)s, (y+0.5)s);
            each side's distance is the expectation of the softmax over its R+1 bins times s,
                d = s * sum_i i * softmax(b)_i,
            and the box is (cx - d_left, cy - d_top, cx + d_right, cy + d_bottom).
``decoded`` outputs that already hold boxes ``[N, K, 4]`` (or ``[K, 4]``), scores ``[N, K]``
            and classes ``[N, K]`` (in that output order), or one ``[N, K, 6]`` / ``[K, 6]``
            array of (x1, y1, x2, y2, score, class).

NMS is greedy per class: keep the highest score, drop boxes with IoU > ``nms_iou`` to it,
repeat; then the ``max_detections`` highest scores over all classes are kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from deployopt.core.stats import detect_layout  # noqa: F401 - the layout rules live with inspect's suggestion
from deployopt.measure.tasks.base import does_not_fit

LAYOUTS = ("yolov5", "yolov8", "gfl", "decoded")
GFL_STRIDES = (8, 16, 32, 64, 128, 4)


@dataclasses.dataclass
class Detections:
    boxes: np.ndarray  # [K, 4] x1, y1, x2, y2
    scores: np.ndarray  # [K]
    classes: np.ndarray  # [K] int64

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [n, 4] with every box of ``b`` [m, 4] (xyxy) -> [n, m]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, *, iou: float,
        max_detections: int) -> Detections:
    """Greedy class-wise NMS, then the ``max_detections`` best over all classes."""
    keep: list[int] = []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        while idx.size:
            best, idx = idx[0], idx[1:]
            keep.append(int(best))
            if idx.size:
                idx = idx[iou_matrix(boxes[best], boxes[idx])[0] <= iou]
    keep_arr = np.array(keep, np.int64)
    keep_arr = keep_arr[np.argsort(-scores[keep_arr], kind="stable")][:max_detections]
    return Detections(boxes[keep_arr].astype(np.float64), scores[keep_arr].astype(np.float64),
                      classes[keep_arr].astype(np.int64))


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    half = b[..., 2:4] / 2
    return np.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)


def best_class(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per box, the best class and its score (scores [K, C])."""
    classes = scores.argmax(axis=1)
    return scores[np.arange(len(scores)), classes], classes


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def gfl_strides(counts: Sequence[int], height: int, width: int) -> list[int]:
    """The stride of each score map from its cell count: ceil(H/s) * ceil(W/s) == HW."""
    strides = []
    for hw in counts:
        found = [s for s in GFL_STRIDES if math.ceil(height / s) * math.ceil(width / s) == hw]
        if not found:
            raise ValueError(f"{hw} cells fit no stride of {list(GFL_STRIDES)} on a {height}x{width} input")
        strides.append(found[0])
    return strides


def gfl_decode(scores: Sequence[np.ndarray], dists: Sequence[np.ndarray], strides: Sequence[int],
               width: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's GFL heads -> (boxes [K, 4] xyxy, class scores [K, C]) over all strides."""
    all_boxes, all_scores = [], []
    for score, dist, s in zip(scores, dists, strides):
        cols = math.ceil(width / s)
        cell = np.arange(len(score))
        cx, cy = (cell % cols + 0.5) * s, (cell // cols + 0.5) * s
        bins = dist.shape[-1] // 4
        prob = softmax(dist.reshape(-1, 4, bins).astype(np.float64), axis=2)
        d = (prob * np.arange(bins)).sum(axis=2) * s  # left, top, right, bottom
        all_boxes.append(np.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], axis=1))
        all_scores.append(score)
    return np.concatenate(all_boxes), np.concatenate(all_scores).astype(np.float64)


def gfl_split(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Indices of the score maps and of the distribution maps, paired by cell count.

    The distribution maps are the 3-D outputs whose last dim is a multiple of 4 that differs from
    the score maps' (the class count)."""
    lasts = {s[-1] for s in shapes}
    if len(shapes) % 2 or len(lasts) != 2 or any(len(s) != 3 for s in shapes):
        raise does_not_fit("detection", names[0], shapes[0],
                           "pairs of score maps [N, HW, C] and box-distribution maps [N, HW, 4(R+1)] "
                           f"for layout gfl (got {len(shapes)} outputs)")
    dist_dim = max(d for d in lasts if d % 4 == 0) if any(d % 4 == 0 for d in lasts) else None
    if dist_dim is None:
        raise does_not_fit("detection", names[0], shapes[0], "box-distribution maps whose last dim is 4(R+1)")
    score_idx = [i for i, s in enumerate(shapes) if s[-1] != dist_dim]
    dist_idx = [i for i, s in enumerate(shapes) if s[-1] == dist_dim]
    by_cells = {shapes[i][1]: i for i in dist_idx}
    if len(score_idx) != len(dist_idx) or any(shapes[i][1] not in by_cells for i in score_idx):
        raise does_not_fit("detection", names[score_idx[0]] if score_idx else names[0], shapes[0],
                           "one box-distribution map with the same cell count per score map")
    return score_idx, [by_cells[shapes[i][1]] for i in score_idx]
