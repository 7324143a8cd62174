"""Dataset specs: how a recipe or the CLI names a dataset, and their validation.

A recipe names a dataset with a mapping, the CLI (``--data SPEC``) with a string::

    {dataset: photos, preprocess: imagenet, limit: 256}
    NAME[?KEY=VALUE[&KEY=VALUE...]]      e.g. mnist?split=test&limit=500
                                              folder:val/?preprocess=efficientnet-lite

NAME is ``digits``, ``mnist``, ``imagenet-samples``, ``photos``, ``folder:PATH``, ``npy:PATH``
or ``npz:PATH`` (in a string, ``?`` starts the options). The keys are the fields of
``DatasetSpec``: ``preprocess`` (a preset name, a mapping of ``PREPROCESS_KEYS``, or ``none``
for arrays that are already preprocessed), ``limit`` (keep the first N), ``split``
(``all|train|test``), ``shuffle`` (permute with the caller's seed before ``limit``), and
``constants`` (for a model with several inputs: a value per input name that the dataset does not
feed, repeated for every sample, e.g. ``{im_shape: [[800, 608]], scale_factor: [[1.0, 1.0]]}``;
a leading dimension of 1 is the batch), and ``labels`` (the task labels file of the data, for the
metric that reads one: a COCO JSON for detection, a mask folder for segmentation, a text file for
sequences; relative paths resolve like the data's). In a string only preset names can be given;
custom preprocessing, constants and labels need the mapping form.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from deployopt.core.data.preprocess import PRESETS, Preprocess
from deployopt.core.errors import UserError
from deployopt.core.settings import Bounds, Settings, check_bounds, setting, setting_fields

BUILTIN_DATASETS = ("digits", "mnist", "imagenet-samples", "photos")
PATH_KINDS = ("folder", "npy", "npz")
ARRAY_KINDS = ("npy", "npz")  # the only kinds that may skip preprocessing
# The preset a dataset gets when its spec names none (None: used as stored).
DEFAULT_PRESET = {"digits": "digits", "mnist": "mnist", "imagenet-samples": "imagenet",
                  "photos": "imagenet", "folder": "imagenet", "npy": None, "npz": None}
_NAMES_HELP = "digits, mnist, imagenet-samples, photos, folder:PATH, npy:PATH, npz:PATH"


@dataclasses.dataclass
class DatasetSpec(Settings):
    """One validated dataset spec (see the module docstring); ``kind``/``path`` split the name."""

    dataset: str
    preprocess: str | dict[str, Any] | None = None  # a preset name, "none", or a mapping
    limit: int | None = setting(None, low=1)
    split: Literal["all", "train", "test"] = "all"
    shuffle: bool = False
    constants: dict[str, float | list[float] | list[list[float]]] | None = setting(
        None, min_len=1, low=-math.inf, high=math.inf, low_open=True, high_open=True)
    labels: str | None = None  # the task labels file (COCO JSON, mask folder, text file)

    @property
    def kind(self) -> str:
        """A ``BUILTIN_DATASETS`` name or a ``PATH_KINDS`` prefix."""
        return self._kind_and_path()[0]

    @property
    def path(self) -> str | None:
        """The path after ``KIND:`` (None for built-in datasets)."""
        return self._kind_and_path()[1]

    def _kind_and_path(self) -> tuple[str, str | None]:
        prefix, colon, path = self.dataset.partition(":")
        return (prefix, path) if colon and prefix in PATH_KINDS else (self.dataset, None)

    def validate(self) -> None:
        if self.kind not in BUILTIN_DATASETS and self.path is None:
            raise UserError(f"dataset: {self.dataset!r} is not one of {_NAMES_HELP}")
        if self.path == "":
            raise UserError(f"dataset: {self.dataset!r} needs a path after '{self.kind}:'")
        if isinstance(self.preprocess, str):
            check_bounds("preprocess", self.preprocess, Bounds(choices=(*PRESETS, "none")))
        for name, value in (self.constants or {}).items():
            rows = value if isinstance(value, list) else [value]
            if len({len(r) if isinstance(r, list) else -1 for r in rows}) > 1:
                raise UserError(f"constants.{name}: rows of different lengths in {value!r}")
        self.pipeline()

    def pipeline(self) -> Preprocess | None:
        """The preprocessing the spec asks for (None: samples are used as stored)."""
        if self.preprocess == "none":
            if self.kind not in ARRAY_KINDS:
                raise UserError(f"preprocess: 'none' is only for npy: and npz: data; {self.kind} images need "
                                f"one of {', '.join(PRESETS)} or a mapping")
            return None
        if self.preprocess is None:
            preset = DEFAULT_PRESET[self.kind]
            return None if preset is None else Preprocess.from_spec(preset)
        return Preprocess.from_spec(self.preprocess)


DATASET_KEYS = tuple(f.name for f in setting_fields(DatasetSpec))
_STRING_KEYS = tuple(k for k in DATASET_KEYS[1:] if k not in ("constants", "labels"))  # what a spec string may set
# How option text in a spec string reads as the field's type; text that does not read stays a
# string, which the settings check then refuses with the expected type.
_FROM_TEXT = {
    "limit": lambda text: int(text) if re.fullmatch(r"[+-]?\d+", text) else text,
    "shuffle": lambda text: {"true": True, "1": True, "false": False, "0": False}.get(text.lower(), text),
}


def _at(where: str | None, message: str) -> str:
    return f"{where}.{message}" if where else message


def _check_keys(keys: Iterable[str], allowed: tuple[str, ...], where: str | None) -> None:
    for key in keys:
        if key not in allowed:
            raise UserError(_at(where, f"{key}: unknown key (allowed: {', '.join(allowed)})"))


def parse_spec(text: str, where: str | None = None) -> dict[str, Any]:
    """``NAME?key=value&...`` -> a spec mapping; ``limit`` and ``shuffle`` read as int and bool."""
    name, sep, query = text.partition("?")
    spec: dict[str, Any] = {"dataset": name}
    if not sep:
        return spec
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise UserError(_at(where, f"dataset: expected KEY=VALUE after '?' in {text!r}, got {part!r}"))
        _check_keys([key], _STRING_KEYS, where)
        if key in spec:
            raise UserError(_at(where, f"{key}: given twice in {text!r}"))
        spec[key] = _FROM_TEXT.get(key, str)(value)
    return spec


def check_spec(spec: Any, where: str | None = None) -> DatasetSpec:
    """A spec string or mapping -> ``DatasetSpec``; messages name the key, prefixed by ``where``."""
    if isinstance(spec, str):
        values = parse_spec(spec, where)
    elif isinstance(spec, Mapping):
        values = dict(spec)
        _check_keys(values, DATASET_KEYS, where)
        if "dataset" not in values:
            raise UserError(_at(where, f"dataset: missing (one of {_NAMES_HELP})"))
    else:
        raise UserError(_at(where, f"dataset: expected a spec string (e.g. 'mnist?split=test') or a mapping "
                                   f"with keys {', '.join(DATASET_KEYS)}, got {spec!r}"))
    try:
        return DatasetSpec(**values)
    except UserError as e:
        raise UserError(_at(where, str(e))) from e


def validate_spec(spec: Any, where: str | None = None) -> None:
    """Check a spec's keys, types and values without opening any data (for recipe validation).

    Messages name the key: ``limit: -1 is outside [1, inf)``; with ``where`` (e.g.
    ``data.calibration``) they read ``data.calibration.limit: ...``.
    """
    check_spec(spec, where)


def spec_name(spec: str | Mapping[str, Any], pipeline: Preprocess | None) -> str:
    """How reports name a dataset: the spec string itself, or one built from a mapping in its key order."""
    if isinstance(spec, str):
        return spec
    options = [f"{k}={v if not isinstance(v, Mapping) else pipeline.name if pipeline else 'none'}"
               for k, v in spec.items() if k not in ("dataset", "constants")]
    return spec["dataset"] + ("?" + "&".join(options) if options else "")
