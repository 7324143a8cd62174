"""Datasets: the streaming interface every pass and measurement reads, and ``open_dataset``.

A ``Dataset`` streams preprocessed samples in batches: ``batches(n)`` yields
``(x: float32 array [b, *sample_shape], y: int64 array [b] | None)``. Nothing loads a whole
dataset into memory when it need not: image files are decoded per batch, ``.npy`` files are
memory-mapped; only the small built-in digit sets are held in memory.

Order and splits
----------------
The order is fixed. With P a fixed permutation of the n samples (numpy PCG64, seed 0),
``train = P[:floor(4n/5)]`` and ``test = P[floor(4n/5):]``: disjoint, and the same on every
machine (MNIST: 4,000 / 1,000). ``all`` is the natural order: file order for arrays, sorted
paths for folders, and P itself for ``digits``/``mnist`` (the MNIST file is sorted by label, so
any prefix of it would hold one class). Then ``shuffle`` permutes with the seed, then ``limit``.
"""

from __future__ import annotations

import abc
import numbers
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from deployopt.core.data.preprocess import Preprocess
from deployopt.core.data.sources import ImageSource, Source, open_source
from deployopt.core.data.spec import DatasetSpec, check_spec, spec_name
from deployopt.core.errors import UserError
from deployopt.core.settings import Bounds, check_value

SPLIT_SEED = 0
SHUFFLED_BUILTINS = ("digits", "mnist")  # stored sorted by label: "all" serves them in the order P


class UnfixedDims(UserError):
    """The data does not fix a dynamic dimension of a model input. The message says why; the
    caller adds the setting that fixes it on its verb (``--shape``, a recipe's ``shapes``)."""

    def __init__(self, message: str, input_name: str, dims: Sequence[Any]):
        super().__init__(message)
        self.input_name, self.dims = input_name, list(dims)

    def example(self) -> list[int]:
        """A full shape to suggest: the model's fixed dims, batch 1, other dynamic dims 224."""
        return [int(d) if _fixed(d) else (1 if i == 0 else 224) for i, d in enumerate(self.dims)]


class Dataset(abc.ABC):
    """Abstract base: subclasses implement ``__len__`` and ``batches``."""

    name: str = "dataset"
    labeled: bool = False
    sample_shape: tuple[int, ...] = ()
    #: Per model input, for datasets that feed several inputs ({name: sample shape}); None otherwise.
    sample_shapes: dict[str, tuple[int, ...]] | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    #: The spec's task labels file, resolved (read by the detection/segmentation/sequence metrics).
    label_file: str | None = None

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


class StreamingDataset(Dataset):
    """Samples of a source in a fixed order, preprocessed and checked for NaN/Inf batch by batch."""

    def __init__(self, source: Source, indices: np.ndarray, preprocess: Preprocess | None, *, name: str,
                 sample_shape: tuple[int, ...], num_classes: int | None, class_names: list[str] | None):
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
        check_value("batch_size", batch_size, int, Bounds(low=1))
        read = self._source.reader(self.preprocess)
        for start in range(0, len(self.indices), batch_size):
            idx = self.indices[start:start + batch_size]
            x = read(idx)
            finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            if not finite.all():
                bad = int(idx[int(np.argmin(finite))])
                raise UserError(f"dataset {self.name!r}: {self._source.describe(bad)} contains NaN or Inf")
            yield x, None if self._source.labels is None else self._source.labels[idx]


def _is_dim(d: Any) -> bool:
    """An integer dimension (ints from ONNX or numpy; None or a name is a dynamic dimension)."""
    return isinstance(d, numbers.Integral) and not isinstance(d, bool)


def _fixed(d: Any) -> bool:
    return _is_dim(d) and d > 0


def _shape_text(dims: Sequence[Any]) -> str:
    return "x".join(str(d) if _is_dim(d) or isinstance(d, str) else "?" for d in dims)


def _image_hw(kind: str, pp: Preprocess, source: Source, input_shape: Sequence[Any] | None,
              input_name: str | None) -> tuple[int, int]:
    """The one sample height/width of image files whose size the preprocessing leaves open: read
    from the file headers when every file gives the same; otherwise a UserError (``UnfixedDims``
    when the model input leaves that size open too)."""
    sizes = sorted({pp.output_hw(hw) for hw in source.sizes()}) if isinstance(source, ImageSource) else []
    if len(sizes) == 1:
        return sizes[0]
    model = list(input_shape or [])[1:]
    if sizes and input_name is not None and len(model) == 3:
        hw_dims = model[1:] if pp.layout == "nchw" else model[:2]
        if not all(_fixed(d) for d in hw_dims):
            a, b = (_shape_text(pp.sample_shape(hw)) for hw in (sizes[0], sizes[-1]))
            raise UnfixedDims(f"{kind} samples differ in size ({a} and {b}), so they do not fix the dynamic "
                              f"dims of model input {input_name!r} ({_shape_text(input_shape)})",
                              input_name, input_shape)
    raise UserError("preprocess: images from files differ in size, so a resize to a short side "
                    "alone cannot be batched; add crop, or give resize as [height, width]")


def _sample_shape(kind: str, pp: Preprocess | None, source: Source, input_shape: Sequence[Any] | None = None,
                  input_name: str | None = None) -> tuple[int, ...]:
    if pp is None:
        return tuple(source.raw_shape)
    raw_hw = None
    if source.raw_shape is not None:
        raw = source.raw_shape
        if not (len(raw) == 2 or (len(raw) == 3 and raw[2] in (1, 3, 4))):
            raise UserError(f"preprocess: {kind} samples of shape {_shape_text(raw)} are not images "
                            f"(HxW or HxWxC with C 1, 3 or 4); use preprocess: none for preprocessed arrays")
        raw_hw = (raw[0], raw[1])
    hw = pp.output_hw(raw_hw)
    if hw is None:
        hw = _image_hw(kind, pp, source, input_shape, input_name)
    return pp.sample_shape(hw)


def _fit(pp: Preprocess, input_shape: Sequence[Any]) -> Preprocess:
    dims = list(input_shape)[1:]
    if len(dims) != 3:
        return pp
    c, h, w = dims if pp.layout == "nchw" else (dims[2], dims[0], dims[1])
    if _fixed(c) and c != pp.channels:
        return pp  # cannot match anyway: report the preset's own shape, not a half-fitted one
    return pp.fit(int(h), int(w)) if _fixed(h) and _fixed(w) else pp


def _select(n: int, spec: DatasetSpec, seed: int) -> np.ndarray:
    """The indices a spec serves, in order (see the module docstring)."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    cut = n * 4 // 5
    if spec.split == "train":
        indices = order[:cut]
    elif spec.split == "test":
        indices = order[cut:]
    else:
        indices = order if spec.kind in SHUFFLED_BUILTINS else np.arange(n)
    if spec.shuffle:
        indices = np.random.default_rng(seed).permutation(indices)
    return indices[:spec.limit] if spec.limit is not None else indices


def open_dataset(spec: str | Mapping[str, Any], *, input_shape: Sequence[Any] | None = None, seed: int = 0,
                 input_name: str | None = None, base_dir: str | os.PathLike | None = None,
                 member: str = "x") -> StreamingDataset:
    """Open the dataset a spec names (``deployopt.core.data.spec``), ready to stream.

    ``input_shape`` is the model input's shape with its batch dim (ints, or None/str for dynamic
    dims); sizes follow it where the preset allows and a mismatch is a ``UserError``
    (``samples are 1x28x28 but model input 'input' expects 3x224x224``). ``seed`` drives
    ``shuffle``. Relative paths resolve against ``base_dir`` (e.g. the recipe's folder), else the
    working directory. ``member`` names the array of an npz archive. Image files whose size the
    preprocessing leaves open are used at their own size when they all have one (read from the
    headers). Messages carry no ``data.KEY`` prefix: the caller adds it.
    """
    checked = check_spec(spec)
    preprocess = checked.pipeline()
    name = spec_name(spec, preprocess)
    path = None if checked.path is None else pathlib.Path(base_dir or ".") / pathlib.Path(checked.path).expanduser()
    source, num_classes, class_names = open_source(checked.kind, path, member)

    if preprocess is not None and input_shape is not None:
        preprocess = _fit(preprocess, input_shape)
    sample_shape = _sample_shape(checked.kind, preprocess, source, input_shape, input_name)
    if input_shape is not None:
        expected = list(input_shape)[1:]
        if len(expected) != len(sample_shape) or any(
                _fixed(e) and e != s for e, s in zip(expected, sample_shape)):
            model = f"model input {input_name!r}" if input_name else "the model input"
            raise UserError(f"samples are {_shape_text(sample_shape)} but {model} expects {_shape_text(expected)}")

    indices = _select(source.n, checked, seed)
    if len(indices) == 0:
        raise UserError(f"dataset {name!r} is empty"
                        + (f" (split {checked.split} of {source.n} samples)" if source.n else ""))
    dataset = StreamingDataset(source, indices, preprocess, name=name, sample_shape=sample_shape,
                               num_classes=num_classes, class_names=class_names)
    if checked.labels is not None:
        labels = pathlib.Path(base_dir or ".") / pathlib.Path(checked.labels).expanduser()
        if not labels.exists():
            raise UserError(f"labels: {labels}: no such file or folder")
        dataset.label_file = str(labels)
    return dataset
