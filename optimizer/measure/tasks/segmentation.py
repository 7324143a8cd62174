"""Segmentation: per-pixel classes compared with a reference model's or with label masks.

The predicted class of a pixel is the arg-max over the class axis of [N, C, H, W] (``axis``,
default 1), or, for a 1-channel probability map [N, 1, H, W] / [N, H, W] (text detection), 1
where p > ``threshold`` and 0 elsewhere. From the confusion matrix M (M[t, p]: pixels of true
class t predicted p), accumulated batch by batch so memory does not grow with the samples,
    pixel agreement / accuracy = trace(M) / sum(M)
    mIoU = mean over classes c with pixels in truth or prediction of M[c,c] / (row_c + col_c - M[c,c]).
Against the reference its prediction is the truth; against labels the masks are, resized
(nearest) to the output's H x W when they differ, with pixels equal to ``ignore_index`` skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deployopt.core.errors import UserError
from deployopt.core.settings import Settings, setting
from deployopt.measure.tasks.base import Metric, class_axis, does_not_fit

NEEDS = "class maps [N, C, H, W] or a probability map [N, 1, H, W] / [N, H, W]"


@dataclasses.dataclass
class SegmentationSettings(Settings):
    axis: int = 1  # the class axis of [N, C, H, W]
    threshold: float = setting(0.5)  # for 1-channel probability maps
    ignore_index: int | None = 255  # label-mask value that is not scored


def confusion(truth: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """[classes, classes] counts of (truth, prediction) pairs."""
    idx = truth.astype(np.int64).ravel() * classes + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=classes * classes).reshape(classes, classes)


def miou(m: np.ndarray) -> float | None:
    tp = np.diag(m).astype(np.float64)
    union = m.sum(axis=0) + m.sum(axis=1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else None


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = (np.arange(height) * mask.shape[0] // height).clip(0, mask.shape[0] - 1)
    cols = (np.arange(width) * mask.shape[1] // width).clip(0, mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


class SegmentationMetric(Metric):
    kind = "segmentation"

    def __init__(self, settings: SegmentationSettings, outputs: Sequence[str], **_):
        super().__init__(outputs[:1])
        self.settings = settings
        self.classes: int | None = None
        self.vs_reference: np.ndarray | None = None
        self.vs_labels: np.ndarray | None = None

    def check(self, shapes: Mapping[str, Sequence[Any]]) -> None:
        name = self.outputs[0] if self.outputs else next(iter(shapes))
        shape = tuple(shapes[name])
        if len(shape) not in (3, 4):
            raise does_not_fit(self.kind, name, shape, NEEDS)
        if len(shape) == 4:
            class_axis(self.settings.axis, 4, self.kind, name, shape)

    def predict(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Class per pixel [N, H, W]."""
        x = self.selected(outputs)[0]
        name = self.outputs[0] if self.outputs else next(iter(outputs))
        if x.ndim not in (3, 4):
            raise does_not_fit(self.kind, name, x.shape, NEEDS)
        if x.ndim == 4:
            axis = class_axis(self.settings.axis, 4, self.kind, name, x.shape)
            if x.shape[axis] > 1:
                self.classes = x.shape[axis]
                return x.argmax(axis=axis)
            x = x.squeeze(axis)
        self.classes = 2
        return (x > self.settings.threshold).astype(np.int64)

    def accumulate(self, outputs, reference_outputs=None, labels=None) -> None:
        pred = self.predict(outputs)
        k = self.classes
        if reference_outputs is not None:
            ref = self.predict(reference_outputs)
            if ref.shape != pred.shape:
                raise UserError(f"metric segmentation: the reference predicts {list(ref.shape)} pixels, the "
                                f"model {list(pred.shape)}")
            m = confusion(ref, pred, k)
            self.vs_reference = m if self.vs_reference is None else self.vs_reference + m
        if labels is not None:
            if len(labels) != len(pred):
                raise UserError(f"metric segmentation: {len(labels)} masks for a batch of {len(pred)}")
            for mask, p in zip(labels, pred):
                mask = resize_nearest(mask, *p.shape) if mask.shape != p.shape else mask
                keep = mask != self.settings.ignore_index if self.settings.ignore_index is not None else \
                    np.ones(mask.shape, bool)
                if keep.any() and (mask[keep].min() < 0 or mask[keep].max() >= k):
                    raise UserError(f"labels: mask value {int(mask[keep].max())} is outside the {k} classes "
                                    "of the model's output")
                m = confusion(mask[keep], p[keep], k)
                self.vs_labels = m if self.vs_labels is None else self.vs_labels + m

    def result(self) -> dict[str, Any]:
        res: dict[str, Any] = {"classes": self.classes}
        if self.vs_reference is not None:
            m = self.vs_reference
            res.update(pixel_agreement=float(np.trace(m) / max(m.sum(), 1)), miou_vs_reference=miou(m))
        if self.vs_labels is not None:
            m = self.vs_labels
            res.update(pixel_accuracy=float(np.trace(m) / max(m.sum(), 1)), miou=miou(m))
            res.update(score=res["miou"], score_name="miou")
        else:
            res.update(score=res.get("pixel_agreement"), score_name="pixel_agreement")
        return res
