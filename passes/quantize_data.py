"""Data side of the quantize pass: matching a dataset to the model's inputs, streaming feeds,
calibration with memory that does not grow with the number of samples, and top-1 predictions.

Calibration computes, for every activation tensor ``t`` that the quantizer will touch, a range
``[lo_t, hi_t]`` from which onnxruntime derives ``scale = (hi - lo) / (qmax - qmin)`` and
``zero_point = qmin - round(lo / scale)``. The range is a reduction over all calibration
samples: ``min``/``max`` for minmax (associative, so per-chunk results merge exactly), or a
histogram for percentile/entropy/distribution (histograms of chunks add up bin by bin, with
onnxruntime widening the bins when a chunk exceeds the current range). We therefore feed
onnxruntime's own calibrators one chunk at a time and let them merge, instead of handing them
a reader over the whole set: their ``collect_data`` keeps every intermediate output of every
sample it is given until it returns (onnxruntime#10503, #21979). In onnxruntime 1.32 the
``CalibMaxIntermediateOutputs`` option meant for this drops the outputs of each full chunk
without merging them into the range (MinMaxCalibrater.collect_data), so it is not used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pathlib
import resource
import sys
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, TensorsData, create_calibrator

from deployopt.core.data import Dataset
from deployopt.core.errors import UserError, WorkFailed

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
    "distribution": CalibrationMethod.Distribution,
}


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
    """Map one dataset batch ``x`` onto the model inputs, in order.

    A single-input model takes an array; a model with several inputs takes a tuple/list (in
    graph-input order) or a dict keyed by input name.
    """
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
          ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
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


class _ChunkReader(CalibrationDataReader):
    """Hands onnxruntime's calibrator one chunk of feeds, then reports exhaustion."""

    def __init__(self, chunk: list[dict[str, np.ndarray]]):
        self._items = iter(chunk)

    def get_next(self) -> dict | None:
        return next(self._items, None)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    """Resident set size now, from /proc/self/statm (Linux); None where that file is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return None


class RssSampler:
    """Highest RSS seen while the ``with`` block runs, sampled every ``interval`` seconds by a
    thread. ru_maxrss cannot be reset, so it cannot tell one step's peak from an earlier one's;
    no library we depend on samples RSS, hence this small sampler."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mb = interval, current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = current_rss_mb()
            if now is not None and (self.peak_mb is None or now > self.peak_mb):
                self.peak_mb = now

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = current_rss_mb()
        if now is not None and (self.peak_mb is None or now > self.peak_mb):
            self.peak_mb = now


def session(path: str | pathlib.Path, threads: int, *, optimize: bool = True,
            optimized_path: str | pathlib.Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the "hardware specific optimizations" warning is expected here
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def calibrate(model_path: pathlib.Path, work_dir: pathlib.Path, *, method: str, percentile: float,
              op_types: Sequence[str], chunks: Iterator[list[dict[str, np.ndarray]]],
              threads: int) -> TensorsData:
    """Run one of onnxruntime's calibrators over ``chunks``; memory is bounded by one chunk."""
    options: dict = {}
    if method == "percentile":
        options["percentile"] = percentile
    # The calibrators print progress on stdout; the pass reports through its notes instead.
    with contextlib.redirect_stdout(io.StringIO()):
        calibrator = create_calibrator(model_path, list(op_types),
                                       augmented_model_path=str(work_dir / "augmented.onnx"),
                                       calibrate_method=METHODS[method], extra_options=options)
        # Same session as create_calibrator's (no graph optimization), with our thread count.
        calibrator.infer_session = session(work_dir / "augmented.onnx", threads, optimize=False)
        for chunk in chunks:
            calibrator.collect_data(_ChunkReader(chunk))
        ranges = calibrator.compute_data()
    del calibrator
    if ranges is None or not len(ranges.data):
        raise WorkFailed("calibration collected no tensor ranges (no calibration batch could be run)")
    return ranges


def clamp_to_activations(ranges: TensorsData, bounds: dict[str, tuple[float, float]]) -> int:
    """Intersect the range of each Relu/Clip output with the activation's own bounds.

    onnxruntime's quantizer removes a Relu/Clip whenever activations are asymmetric and lets the
    output range do the clamping (operators/activation.py, QDQRemovableActivation) without
    checking that the range starts at the clamp: with the symmetric ranges of 'distribution'
    calibration a removed Relu would let negative values through. Returns the ranges changed.
    """
    changed = 0
    for name, (lo, hi) in bounds.items():
        if name not in ranges:
            continue
        data = ranges[name]
        low, high = data.range_value
        new_low = np.maximum(low, np.asarray(lo, dtype=np.asarray(low).dtype)).astype(np.asarray(low).dtype)
        new_high = np.minimum(high, np.asarray(hi, dtype=np.asarray(high).dtype)).astype(np.asarray(high).dtype)
        if not (np.array_equal(new_low, low) and np.array_equal(new_high, high)):
            data.lowest, data.highest = new_low, new_high
            changed += 1
    return changed


def chunked(stream: Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]], samples_per_chunk: int,
            ) -> Iterator[list[dict[str, np.ndarray]]]:
    """Group feeds into chunks of about ``samples_per_chunk`` samples, all feeds of a chunk with
    the same shapes: the histogram calibrators stack a chunk's outputs with ``np.asarray``, which
    fails on a short last batch or varying image sizes (onnxruntime#11928)."""
    chunk: list[dict[str, np.ndarray]] = []
    size = 0
    for feed, _ in stream:
        if chunk and any(chunk[0][k].shape != v.shape for k, v in feed.items()):
            yield chunk
            chunk, size = [], 0
        chunk.append(feed)
        size += len(next(iter(feed.values())))
        if size >= samples_per_chunk:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def predict(sess: ort.InferenceSession, stream: Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]],
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """Top-1 class of the first output over the stream, and the labels when the data has them."""
    preds, labels = [], []
    output = sess.get_outputs()[0].name
    for feed, y in stream:
        logits = sess.run([output], feed)[0]
        preds.append(np.asarray(logits).reshape(len(logits), -1).argmax(axis=1))
        if y is not None:
            labels.append(y)
    return np.concatenate(preds), (np.concatenate(labels) if labels else None)
