"""Data for a whole model: every graph input fed, from one dataset spec.

A model with one input takes the dataset's samples. A model with several inputs is fed in one
of two ways:

- an ``.npz`` archive with one array per input name (``npz:cal.npz`` holding ``image``,
  ``scale_factor``, ...; optional labels ``y``): row i of every array is sample i;
- any other dataset (images, a built-in set, ``.npy``, an npz ``x``) feeds the one input that
  the spec's ``constants`` do not cover; each constant is repeated for every sample.

Batches of such a dataset are ``{input name: array}`` in graph-input order, each array cast to
its input's element type. An input with neither data nor a constant is a ``UserError`` naming
it (the caller prefixes the recipe key, ``data.calibration``).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from deployopt.core.data.datasets import Dataset, StreamingDataset, open_dataset
from deployopt.core.data.sources import npz_arrays
from deployopt.core.data.spec import check_spec, spec_name
from deployopt.core.errors import UserError


class ModelInput(Protocol):
    """What this module needs to know of a graph input (``measure.model_io.TensorSpec`` fits)."""

    name: str
    dims: tuple[Any, ...] | None  # ints, or None/str for dynamic dims; None when the rank is unknown
    dtype: np.dtype | None


class MultiInputDataset(Dataset):
    """Samples for several model inputs; ``batches`` yields ``({name: array}, labels)``."""

    def __init__(self, streams: dict[str, StreamingDataset], constants: dict[str, np.ndarray],
                 inputs: Sequence[ModelInput], name: str):
        self.streams, self.constants, self.name = streams, constants, name
        self.order = [i.name for i in inputs]
        self.dtypes = {i.name: i.dtype if i.dtype is not None else np.dtype(np.float32) for i in inputs}
        first = next(iter(streams.values()))
        self._first = first
        self.labeled, self.num_classes, self.class_names = first.labeled, first.num_classes, first.class_names
        self.label_file = first.label_file  # the task labels file of the spec, if any
        self.sample_shape = first.sample_shape
        self.sample_shapes = {n: tuple(streams[n].sample_shape) if n in streams else tuple(constants[n].shape)
                              for n in self.order}

    def __len__(self) -> int:
        return len(self._first)

    def __repr__(self) -> str:
        return f"<dataset {self.name!r}: {len(self)} samples for inputs {', '.join(self.order)}>"

    @property
    def labels(self) -> np.ndarray | None:
        return self._first.labels

    def batches(self, batch_size: int = 32) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        streamed = {n: s.batches(batch_size) for n, s in self.streams.items()}
        for parts in zip(*streamed.values()):
            arrays = dict(zip(streamed, (x for x, _ in parts)))
            count = len(parts[0][0])
            batch = {n: (arrays[n] if n in arrays else np.repeat(self.constants[n][None], count, axis=0))
                     .astype(self.dtypes[n], copy=False) for n in self.order}
            yield batch, parts[0][1]


def _constant(name: str, value: Any, spec: ModelInput) -> np.ndarray:
    """One sample of a constant: a leading 1 of the model's rank is the batch dimension."""
    array = np.asarray(value, dtype=np.float64)
    dims = spec.dims
    if dims is not None and array.ndim == len(dims) and array.shape[:1] == (1,):
        array = array[0]
    if dims is not None and (array.ndim != len(dims) - 1 or any(
            isinstance(d, int) and d > 0 and d != s for d, s in zip(dims[1:], array.shape))):
        shown = "x".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in dims)
        raise UserError(f"constants.{name}: shape {list(np.shape(value))} does not fit model input "
                        f"{name!r} ({shown})")
    return array


def _primary(fed: Sequence[ModelInput]) -> ModelInput:
    """The input a single-array dataset feeds when several are left: the first image-like (rank 4)."""
    return next((i for i in fed if i.dims is not None and len(i.dims) == 4), fed[0])


def open_model_data(spec: str | Mapping[str, Any], inputs: Sequence[ModelInput], *, seed: int = 0,
                    base_dir: str | os.PathLike | None = None) -> Dataset:
    """The dataset a spec names, feeding every one of ``inputs`` (the model's graph inputs, with
    the dims to check against). One input and no constants: ``open_dataset`` itself."""
    checked = check_spec(spec)
    given = dict(checked.constants or {})
    names = [i.name for i in inputs]
    for name in given:
        if name not in names:
            raise UserError(f"constants.{name}: not an input of the model (inputs: {', '.join(names)})")
    if len(inputs) == 1 and not given:
        only = inputs[0]
        return open_dataset(spec, input_shape=only.dims, seed=seed, input_name=only.name, base_dir=base_dir)
    constants = {i.name: _constant(i.name, given[i.name], i) for i in inputs if i.name in given}
    fed = [i for i in inputs if i.name not in constants]
    if not fed:
        raise UserError("constants: cover every model input; at least one must come from the dataset")

    def open_one(inp: ModelInput, member: str = "x") -> StreamingDataset:
        return open_dataset(spec, input_shape=inp.dims, seed=seed, input_name=inp.name, base_dir=base_dir,
                            member=member)

    arrays = []
    if checked.kind == "npz":
        arrays = npz_arrays(pathlib.Path(base_dir or ".") / pathlib.Path(checked.path).expanduser())
    if any(i.name in arrays for i in fed):  # one array per input name
        missing = [i.name for i in fed if i.name not in arrays]
        if missing:
            raise UserError(f"model input {missing[0]!r} has no data: {checked.path} has no array of that name "
                            f"(arrays: {', '.join(arrays)}) and constants do not set it")
        if checked.preprocess not in (None, "none"):
            raise UserError("preprocess: arrays given per input name are used as stored (preprocess them "
                            "beforehand)")
        streams = {i.name: open_one(i, i.name) for i in fed}
        counts = {n: len(s) for n, s in streams.items()}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{n} {c}" for n, c in counts.items())
            raise UserError(f"{checked.path}: the input arrays differ in length ({listed} samples)")
    else:
        primary = _primary(fed)
        others = [i.name for i in fed if i is not primary]
        if others:
            raise UserError(f"model input {others[0]!r} has no data: the dataset feeds one input "
                            f"({primary.name!r}); set constants.{others[0]}, or use an npz with one array "
                            f"per input name")
        streams = {primary.name: open_one(primary)}
    return MultiInputDataset(streams, constants, inputs, spec_name(spec, checked.pipeline()))
