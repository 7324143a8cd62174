"""What the harnesses feed a model: run settings checked, input shapes resolved, arrays made.

Everything here runs in the parent process before any worker starts, so bad settings, shapes
that cannot be resolved and data that does not fit are a ``UserError`` naming the setting, the
file and the input, never a failed row.

Shapes come, in order of precedence, from an explicit full shape (``--shape NAME=...``), a
dataset's sample shape (batch dimension + sample; a dataset for a model with several inputs gives
one per input), or the model's own dims; a dynamic first dimension then takes the batch size. Random inputs are seeded per (seed, input name), so every
model with an input of that name gets the same array and side-by-side numbers compare like with
like.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np

from deployopt.core.errors import UserError
from deployopt.core.session import OPT_LEVELS
from deployopt.measure.model_io import TensorSpec, fits_sample, format_shape


def check_settings(*, threads, batch, warmup, runs, rounds, timeout=None,
                   optimization_level: str | None = None, prefix: str = "", instances: int = 1) -> None:
    """UserError naming the setting (``prefix`` '--' for CLI flags) when a value is out of range."""
    for name, values in (("threads", threads), ("batch", batch)):
        if len(values) == 0:
            raise UserError(f"{prefix}{name}: no values given")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise UserError(f"{prefix}{name}: {v!r} is not an integer >= 1")
    for name, v, low in (("warmup", warmup, 0), ("runs", runs, 1), ("rounds", rounds, 1),
                         ("instances", instances, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise UserError(f"{prefix}{name}: {v!r} is not an integer >= {low}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise UserError(f"{prefix}timeout: {timeout!r} is not a number of seconds > 0")
    if optimization_level is not None and optimization_level not in OPT_LEVELS:
        raise UserError(f"{prefix}optimization_level: {optimization_level!r} is not one of "
                        f"{', '.join(OPT_LEVELS)}")


def shape_flag(name: str, example: list[int]) -> str:
    """How ``bench``, ``eval`` and ``profile`` take a shape: ``--shape x=1x3x224x224``."""
    return f"pass --shape {name}={format_shape(example)}"


def resolve_shape(spec: TensorSpec, path, batch: int, shapes: dict,
                  sample_shape: tuple | None = None, hint=shape_flag) -> tuple[int, ...]:
    """The concrete shape to feed ``spec`` at ``batch`` (precedence in the module doc).

    A dynamic first dimension takes ``batch``; any other dimension still not a number is an
    error naming the input and, by ``hint(name, example shape)``, how the caller's verb sets it.
    """
    where = f"{path}: input '{spec.name}'"
    model_dims = spec.dims
    given = shapes.get(spec.name)
    if given is None and sample_shape is not None:
        given = (batch, *sample_shape)
    if model_dims is None:  # rank unknown: only an explicit shape can say what to feed
        if given is None:
            raise UserError(f"{where} has an unknown shape; {hint(spec.name, [1, 3, 224, 224])}")
        model_dims = (None,) * len(given)
    if given is not None:
        if len(given) != len(model_dims):
            raise UserError(f"{where} has rank {len(model_dims)} ({spec.shape_text()}) but "
                            f"{format_shape(given)} was given")
        for i, (want, got) in enumerate(zip(model_dims, given)):
            if isinstance(want, int) and want != got and not (i == 0 and spec.dynamic_batch):
                raise UserError(f"{where} has shape {spec.shape_text()} but "
                                f"{format_shape(given)} was given (dim {i} must be {want})")
        dims = list(given)
    else:
        dims = list(model_dims)
    if dims:
        if isinstance(model_dims[0], int):
            if model_dims[0] != batch:
                raise UserError(f"{where} has a fixed batch dimension of {model_dims[0]}, so "
                                f"batch {batch} cannot run (use --batch {model_dims[0]} or "
                                f"export with a dynamic batch)")
        dims[0] = batch
    unresolved = [f"{i}: {d or '?'}" for i, d in enumerate(dims) if not isinstance(d, int)]
    if unresolved:
        example = [d if isinstance(d, int) else 224 for d in dims]
        raise UserError(f"{where} has unresolved dynamic dims ({', '.join(unresolved)}) in "
                        f"{spec.shape_text()}; {hint(spec.name, example)}")
    return tuple(int(d) for d in dims)


def random_input(name: str, shape: tuple, dtype: np.dtype, seed: int) -> np.ndarray:
    """Deterministic input for (name, shape, dtype): every model with that input gets the same."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if dtype.kind == "f":
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if dtype.kind in "iu":
        # Small non-negative values: integer inputs are usually indices or token ids.
        return rng.integers(0, 8, shape).astype(dtype)
    raise UserError(f"input '{name}': element type {dtype} cannot be generated; "
                    f"pass --data with real samples")


def _first_rows(x: np.ndarray, batch: int) -> np.ndarray:
    return np.resize(x, (batch, *x.shape[1:])) if len(x) < batch else x[:batch]


def data_batch(data, batch: int) -> dict[str, np.ndarray] | np.ndarray:
    """The first ``batch`` samples of ``data`` (repeated when the set is smaller): one array, or
    ``{input name: array}`` from a dataset that feeds several inputs."""
    parts, have = [], 0
    for x, _ in data.batches(batch):
        parts.append(x)
        have += len(next(iter(x.values())) if isinstance(x, dict) else x)
        if have >= batch:
            break
    if have == 0:
        raise UserError(f"--data {data.name}: the dataset is empty")
    if isinstance(parts[0], dict):
        return {name: _first_rows(np.concatenate([p[name] for p in parts]), batch) for name in parts[0]}
    return _first_rows(np.concatenate([np.asarray(p) for p in parts]), batch)


def _data_feed(path, spec: TensorSpec, data, batch: int, arrays) -> np.ndarray:
    """The array ``data`` gives input ``spec`` at ``batch``, checked against the model."""
    by_name = isinstance(arrays, dict)  # then cast to each input's type by the dataset
    if by_name and spec.name not in arrays:
        raise UserError(f"--data {data.name}: gives no samples for {path} input '{spec.name}'")
    array = arrays[spec.name] if by_name else arrays
    sample = tuple(array.shape[1:])
    if not fits_sample(spec, sample):
        raise UserError(f"--data {data.name}: samples of shape "
                        f"{format_shape(sample)} do not match {path} input "
                        f"'{spec.name}' ({spec.shape_text()})")
    resolve_shape(spec, path, batch, {}, sample)  # the batch dimension must fit too
    if not by_name and spec.dtype.kind != "f":
        raise UserError(f"--data {data.name}: float samples cannot feed {path} "
                        f"input '{spec.name}' of type {spec.dtype}")
    return array.astype(spec.dtype, copy=False)


def plan_feeds(path, specs: list[TensorSpec], batches: Iterable[int], shapes: dict, data,
               seed: int) -> dict[int, dict[str, np.ndarray]]:
    """{batch: {input name: array}} for one model; UserError on anything that cannot run.

    ``data`` (a Dataset, or None for seeded random inputs) feeds a single float input, or every
    input by name when its batches are ``{input name: array}``.
    """
    if data is not None and len(specs) != 1 and not getattr(data, "sample_shapes", None):
        raise UserError(f"--data {data.name}: {path} has {len(specs)} inputs "
                        f"({', '.join(s.name for s in specs)}); this dataset feeds one")
    feeds = {}
    for b in batches:
        feeds[b] = {}
        arrays = data_batch(data, b) if data is not None else None
        for spec in specs:
            if spec.dtype is None or spec.dtype.kind not in "fbiu":
                raise UserError(f"{path}: input '{spec.name}' has an element type the benchmark "
                                f"cannot feed")
            if data is not None:
                feeds[b][spec.name] = _data_feed(path, spec, data, b, arrays)
            else:
                shape = resolve_shape(spec, path, b, shapes)
                feeds[b][spec.name] = random_input(spec.name, shape, spec.dtype, seed)
    return feeds
