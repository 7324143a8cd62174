"""Label files for the task metrics, aligned with the samples of a dataset.

- detection: a COCO-style JSON (``images`` with ``id, file_name, width, height``; ``annotations``
  with ``image_id, category_id, bbox [x, y, w, h]``; ``categories``). Model class i is the i-th
  category in increasing id order.
- segmentation: a folder of masks (PNG or .npy), one per sample, holding a class index per pixel.
- sequence: a text file, one label per line (a trailing empty line is ignored).

Samples are matched to labels by file name when the dataset reads image files (a folder of
images: ``page1.png`` <-> the COCO image ``page1.png`` or the mask ``page1.png``/``page1.npy``),
otherwise by position, and then the counts must be equal. A label reader's ``batch(start, stop)``
gives the labels of samples ``start..stop-1`` in dataset order; masks are read per batch.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
from typing import Any

import numpy as np

from deployopt.core.errors import UserError

MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".npy")


def sample_names(dataset) -> list[str] | None:
    """File names of the dataset's samples in iteration order, when it reads image files."""
    names = getattr(dataset, "sample_paths", None)
    if names is None:
        inner = getattr(dataset, "_first", dataset)  # a multi-input dataset: its streamed input
        paths = getattr(getattr(inner, "_source", None), "paths", None)
        indices = getattr(inner, "indices", None)
        if paths is None or indices is None:
            return None
        names = [paths[int(i)] for i in indices]
    return [pathlib.Path(p).name for p in names]


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"labels {path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"labels {path}: not a JSON file ({e})") from None


def _count_mismatch(path, what: str, count: int, n: int) -> UserError:
    return UserError(f"labels {path}: {count} {what} but the data has {n} samples")


class CocoLabels:
    """COCO-style detection labels; ``batch`` gives ``{"id", "width", "height"}`` per sample."""

    def __init__(self, path, dataset):
        self.path = pathlib.Path(path)
        doc = _read_json(self.path)
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or \
                not isinstance(doc.get("annotations"), list):
            raise UserError(f"labels {self.path}: not COCO-style JSON (needs 'images' and 'annotations' lists)")
        try:
            images = [{"id": im["id"], "file_name": str(im.get("file_name", "")), "width": float(im["width"]),
                       "height": float(im["height"])} for im in doc["images"]]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"labels {self.path}: an image entry lacks id, width or height ({e})") from None
        ids = {im["id"] for im in images}
        for i, ann in enumerate(doc["annotations"]):
            if not isinstance(ann, dict) or not {"image_id", "category_id", "bbox"} <= set(ann):
                raise UserError(f"labels {self.path}: annotation {i} lacks image_id, category_id or bbox")
            if ann["image_id"] not in ids:
                raise UserError(f"labels {self.path}: annotation {i} refers to image id {ann['image_id']!r}, "
                                "which is not in images")
        categories = doc.get("categories") or [{"id": c} for c in sorted({a["category_id"] for a in doc["annotations"]})]
        self.category_ids = sorted(c["id"] for c in categories)
        n = len(dataset)
        names = sample_names(dataset)
        if names is not None:
            by_name = {pathlib.Path(im["file_name"]).name: im for im in images}
            missing = [name for name in names if name not in by_name]
            if missing:
                raise UserError(f"labels {self.path}: no image entry for sample '{missing[0]}' "
                                f"({len(missing)} of {n} samples unmatched)")
            self.samples = [by_name[name] for name in names]
        else:
            if len(images) != n:
                raise _count_mismatch(self.path, "images", len(images), n)
            self.samples = images
        self.doc = {"images": [{k: im[k] for k in ("id", "width", "height")} for im in self.samples],
                    "annotations": [dict(a, id=a.get("id", i + 1), area=a.get("area", float(a["bbox"][2]) *
                                    float(a["bbox"][3])), iscrowd=a.get("iscrowd", 0))
                                    for i, a in enumerate(doc["annotations"])
                                    if a["image_id"] in {im["id"] for im in self.samples}],
                    "categories": [{"id": c} for c in self.category_ids]}

    def batch(self, start: int, stop: int) -> list[dict]:
        return self.samples[start:stop]

    def coco(self):
        """The labels as a pycocotools ``COCO`` index (its progress prints silenced)."""
        from pycocotools.coco import COCO

        gt = COCO()
        gt.dataset = self.doc
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt


class MaskLabels:
    """A folder of label masks; ``batch`` gives a list of [H, W] int64 arrays."""

    def __init__(self, path, dataset):
        self.path = pathlib.Path(path)
        if not self.path.is_dir():
            raise UserError(f"labels {self.path}: not a folder of masks")
        files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in MASK_SUFFIXES)
        n = len(dataset)
        names = sample_names(dataset)
        if names is not None:
            by_stem = {p.stem: p for p in files}
            missing = [name for name in names if pathlib.Path(name).stem not in by_stem]
            if missing:
                raise UserError(f"labels {self.path}: no mask for sample '{missing[0]}' "
                                f"({len(missing)} of {n} samples unmatched)")
            self.files = [by_stem[pathlib.Path(name).stem] for name in names]
        else:
            if len(files) != n:
                raise _count_mismatch(self.path, "masks", len(files), n)
            self.files = files

    def batch(self, start: int, stop: int) -> list[np.ndarray]:
        return [self._read(p) for p in self.files[start:stop]]

    def _read(self, path: pathlib.Path) -> np.ndarray:
        try:
            if path.suffix.lower() == ".npy":
                mask = np.load(path, allow_pickle=False)
            else:
                from PIL import Image

                with Image.open(path) as im:
                    mask = np.asarray(im)
        except (OSError, ValueError) as e:
            raise UserError(f"labels {path}: cannot read the mask ({e})") from None
        if mask.ndim != 2:
            raise UserError(f"labels {path}: a mask must be one class index per pixel [H, W], "
                            f"got shape {list(mask.shape)}")
        return mask.astype(np.int64)


class TextLabels:
    """One label per line; ``batch`` gives a list of strings."""

    def __init__(self, path, dataset):
        self.path = pathlib.Path(path)
        self.lines = _text_lines(self.path, "labels")
        if len(self.lines) != len(dataset):
            raise _count_mismatch(self.path, "lines", len(self.lines), len(dataset))

    def batch(self, start: int, stop: int) -> list[str]:
        return self.lines[start:stop]


def read_charset(path) -> list[str]:
    """A charset file: one character (or token) per line, class i+1 is line i (class 0: blank)."""
    path = pathlib.Path(path)
    lines = _text_lines(path, "charset")
    if not lines:
        raise UserError(f"charset {path}: empty")
    return lines


def _text_lines(path: pathlib.Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file (no trailing empty line, no \\r); errors name ``what``."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise UserError(f"{what} {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path}: not a UTF-8 text file") from None
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]
