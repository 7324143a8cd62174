"""Datasets against the model's inputs: matching batches to graph inputs, checking them before any
work, and streaming them as onnxruntime feeds.

A single-input model takes one array per batch; a model with several inputs takes a tuple/list
(in graph-input order) or a dict keyed by input name. A model exported with a fixed batch
dimension is fed whole batches of exactly that size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import onnx

from deployopt.core.data import Dataset
from deployopt.core.errors import UserError

Feed = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input: name, dims (int, or None/str for a dynamic dim), numpy dtype."""

    name: str
    dims: tuple[int | str | None, ...]
    dtype: np.dtype

    def shape_text(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"

    @property
    def fixed_batch(self) -> int | None:
        return self.dims[0] if self.dims and isinstance(self.dims[0], int) and self.dims[0] > 0 else None


def model_inputs(proto: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are fed at run time (initializers listed as inputs excluded)."""
    initializers = {t.name for t in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tensor_type.shape.dim)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dims, dtype))
    return specs


def _as_arrays(x, inputs: Sequence[InputSpec], field: str) -> list[np.ndarray]:
    """One dataset batch ``x`` as one array per model input, in graph-input order."""
    names = ", ".join(i.name for i in inputs)
    if isinstance(x, dict):
        missing = [i.name for i in inputs if i.name not in x]
        if missing:
            raise UserError(f"{field}: batches have no array for model input(s) {', '.join(missing)}")
        return [np.asarray(x[i.name]) for i in inputs]
    if isinstance(x, (tuple, list)):
        if len(x) != len(inputs):
            raise UserError(f"{field}: batches hold {len(x)} arrays but the model has "
                            f"{len(inputs)} inputs ({names})")
        return [np.asarray(a) for a in x]
    if len(inputs) != 1:
        raise UserError(f"{field}: the model has {len(inputs)} inputs ({names}) but the dataset "
                        "yields one array per batch")
    return [np.asarray(x)]


def check_batch(arrays: Sequence[np.ndarray], inputs: Sequence[InputSpec], field: str, first: int) -> None:
    """Shape, dtype and finiteness of one batch; ``first`` is the index of its first sample."""
    for spec, array in zip(inputs, arrays):
        sample = list(array.shape[1:])
        want = spec.dims[1:]
        if array.ndim != len(spec.dims) or any(
                isinstance(w, int) and w > 0 and w != s for w, s in zip(want, sample)):
            raise UserError(
                f"{field}: samples of shape {sample} do not fit model input '{spec.name}' "
                f"{spec.shape_text()} (check the dataset's preprocessing and input size)")
        if array.dtype != spec.dtype:
            raise UserError(f"{field}: samples are {array.dtype}, model input '{spec.name}' "
                            f"expects {spec.dtype}")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = first + int(np.argwhere(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))[0, 0])
            raise UserError(f"{field}: sample {bad} of input '{spec.name}' contains NaN or Inf")


def scan(dataset: Dataset | None, inputs: Sequence[InputSpec], field: str, limit: int | None,
         batch_size: int) -> int:
    """Read the dataset once (streamed), check every batch, return the number of samples used.

    Runs before the pass writes anything, so bad data is a UserError with nothing written.
    """
    if dataset is None:
        raise UserError(f"{field}: the quantize pass needs this dataset and none was given")
    if len(dataset) == 0:
        raise UserError(f"{field}: dataset '{dataset.name}' is empty")
    count = 0
    for x, _ in dataset.batches(batch_size):
        arrays = _as_arrays(x, inputs, field)
        if limit is not None:
            arrays = [a[: limit - count] for a in arrays]
        if len(arrays[0]) == 0:
            break
        check_batch(arrays, inputs, field, count)
        count += len(arrays[0])
        if limit is not None and count >= limit:
            break
    if count == 0:
        raise UserError(f"{field}: dataset '{dataset.name}' yielded no samples")
    fixed = max((s.fixed_batch or 0) for s in inputs)
    if fixed > count:
        raise UserError(f"{field}: the model's input has a fixed batch of {fixed} but dataset "
                        f"'{dataset.name}' gives only {count} samples")
    return count


def feeds(dataset: Dataset, inputs: Sequence[InputSpec], limit: int | None, batch_size: int,
          ) -> Iterator[tuple[Feed, np.ndarray | None]]:
    """Stream ``(feed, labels)`` pairs of at most ``batch_size`` samples, honouring a fixed batch
    dim of the model (a model exported with batch 1 is fed one sample at a time)."""
    fixed = [s.fixed_batch for s in inputs if s.fixed_batch]
    step = fixed[0] if fixed else batch_size
    count = 0
    # read whole multiples of a fixed batch, so that every feed is complete
    read = batch_size if not fixed else max(1, batch_size // step) * step
    for x, y in dataset.batches(read):
        arrays = _as_arrays(x, inputs, "data")
        n = len(arrays[0]) if limit is None else min(len(arrays[0]), limit - count)
        for start in range(0, n - step + 1 if fixed else n, step):
            stop = min(start + step, n)
            feed = {s.name: np.ascontiguousarray(a[start:stop]) for s, a in zip(inputs, arrays)}
            yield feed, None if y is None else np.asarray(y[start:stop])
        count += n
        if limit is not None and count >= limit:
            return


def samples_in(feed: Feed) -> int:
    """Number of samples in one feed (the batch dimension of its first array)."""
    return len(next(iter(feed.values())))
