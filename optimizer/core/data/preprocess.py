"""Preprocessing: a raw image (or array) -> the float32 sample a model takes.

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
mean 0.1307, std 0.3081), ``digits`` (grey 8x8, p / 16). A mapping of ``PreprocessSettings``
fields customises a preset (``preset: imagenet`` plus overrides) or, without ``preset``, starts
from the fields' defaults: pixels to 0..1, sizes from the model.

Given the model's input shape H x W, sizes the user did not set follow it (``Preprocess.fit``):
crop presets crop to H x W and resize the short side to round(min(H, W) / 0.875) (224 -> 256);
resize-only presets resize to H x W.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from PIL import Image

from deployopt.core.errors import UserError
from deployopt.core.settings import Bounds, Settings, build_settings, check_bounds, setting, setting_fields

CROP_FRACTION = 0.875  # torchvision's ImageNet evaluation: resize 256, crop 224

# Each preset lists the fields where it differs from PreprocessSettings' defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"resize": 256, "crop": [224, 224], "scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225]},
    "efficientnet-lite": {"resize": 256, "crop": [224, 224], "scale": 1.0, "mean": 127.0, "std": 128.0},
    "mnist": {"resize": [28, 28], "scale": 1 / 255, "mean": 0.1307, "std": 0.3081, "grayscale": True},
    "digits": {"resize": [8, 8], "scale": 1 / 16, "mean": 0.0, "std": 1.0, "grayscale": True},
}

_FINITE = {"low": -math.inf, "high": math.inf, "low_open": True, "high_open": True}
_POSITIVE = {"low": 0, "high": math.inf, "low_open": True, "high_open": True}


@dataclasses.dataclass
class PreprocessSettings(Settings):
    """What a recipe's ``preprocess`` mapping may set (the module docstring gives the maths)."""

    preset: str | None = setting(None, choices=tuple(PRESETS))
    resize: int | list[int] | None = setting(None, low=1)  # short side, or [height, width]
    crop: int | list[int] | None = setting(None, low=1)  # square side, or [height, width]
    scale: float = setting(1 / 255, **_POSITIVE)
    mean: float | list[float] = setting(0.0, min_len=1, **_FINITE)  # one value, or one per channel (RGB)
    std: float | list[float] = setting(1.0, min_len=1, **_POSITIVE)
    channel_order: Literal["rgb", "bgr"] = "rgb"
    grayscale: bool = False
    layout: Literal["nchw", "nhwc"] = "nchw"

    def validate(self) -> None:
        for key in ("resize", "crop"):
            value = getattr(self, key)
            if isinstance(value, list) and len(value) != 2:
                raise UserError(f"{key}: expected a size (an integer >= 1 or [height, width]), got {value!r}")
        channels = 1 if self.grayscale else 3
        for key in ("mean", "std"):
            count = len(_per_channel(getattr(self, key)))
            if count not in (1, channels):
                allowed = "1" if channels == 1 else f"1 or {channels}"
                raise UserError(f"{key}: {count} values for {channels}-channel samples (give {allowed})")


PREPROCESS_KEYS = tuple(f.name for f in setting_fields(PreprocessSettings))


def _per_channel(value: float | list[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, list) else (float(value),)


def _size(value: int | list[int] | None) -> int | tuple[int, int] | None:
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """One resolved preprocessing pipeline (the module docstring gives the maths)."""

    name: str  # preset name, "PRESET+custom" or "custom"
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
        """A preset name or a mapping of ``PREPROCESS_KEYS`` -> validated ``Preprocess``.

        Messages name ``field``: ``preprocess.layout: 'chw' is not one of nchw, nhwc``.
        """
        if isinstance(value, str):
            check_bounds(field, value, Bounds(choices=tuple(PRESETS)))
            return cls.from_settings(value, build_settings(PreprocessSettings, dict(PRESETS[value]), field))
        given = dict(value) if isinstance(value, Mapping) else value
        settings = build_settings(PreprocessSettings, given, field)  # keys, types and bounds as written
        if settings.preset is not None:
            settings = build_settings(PreprocessSettings, {**PRESETS[settings.preset], **given}, field)
        name = f"{settings.preset}+custom" if settings.preset else "custom"
        return cls.from_settings(name, settings, frozenset(k for k in ("resize", "crop") if k in given))

    @classmethod
    def from_settings(cls, name: str, s: PreprocessSettings, explicit: frozenset[str] = frozenset()) -> Preprocess:
        crop = _size(s.crop)
        return cls(name, _size(s.resize), (crop, crop) if isinstance(crop, int) else crop, float(s.scale),
                   _per_channel(s.mean), _per_channel(s.std), s.channel_order, s.grayscale, s.layout, explicit)

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

    def unit_step(self) -> np.ndarray:
        """One unit of the source pixels (one grey level of an 8-bit image) in the preprocessed
        sample's units, per channel: ``scale / std_c``, in the sample's channel order and shaped to
        broadcast over one sample (C,1,1 for nchw, 1,1,C for nhwc)."""
        step = np.float32(self.scale) / np.broadcast_to(np.asarray(self.std, np.float32), (self.channels,))
        if self.channel_order == "bgr":
            step = step[::-1]
        return np.ascontiguousarray(step.reshape((-1, 1, 1) if self.layout == "nchw" else (1, 1, -1)))

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
