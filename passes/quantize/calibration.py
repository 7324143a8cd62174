"""Calibration with memory that does not grow with the number of samples.

Calibration computes, for every activation tensor ``t`` that the quantizer will touch, a range
``[lo_t, hi_t]`` from which onnxruntime derives ``scale = (hi - lo) / (qmax - qmin)`` and
``zero_point = qmin - round(lo / scale)``. The range is a reduction over all calibration
samples: ``min``/``max`` for minmax (associative, so per-chunk results merge exactly), or a
histogram for percentile/entropy/distribution (histograms of chunks add up bin by bin, with
onnxruntime widening the bins when a chunk exceeds the current range). So onnxruntime's own
calibrators are fed one chunk at a time and left to merge, instead of being handed a reader over
the whole set: their ``collect_data`` keeps every intermediate output of every sample it is given
until it returns. Their ``CalibMaxIntermediateOutputs`` option, meant for this, drops the outputs
of each full chunk without merging them into the range (MinMaxCalibrater.collect_data), so it is
not used.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, TensorsData, create_calibrator

from deployopt.core.errors import WorkFailed
from deployopt.core.session import open_session
from deployopt.passes.quantize.data import Feed, samples_in

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
    "distribution": CalibrationMethod.Distribution,
}


class _ChunkReader(CalibrationDataReader):
    """Hands onnxruntime's calibrator one chunk of feeds, then reports exhaustion."""

    def __init__(self, chunk: list[Feed]):
        self._items = iter(chunk)

    def get_next(self) -> dict | None:
        return next(self._items, None)


def calibrate(model_path: pathlib.Path, work_dir: pathlib.Path, *, method: str, percentile: float,
              op_types: Sequence[str], chunks: Iterator[list[Feed]], threads: int) -> TensorsData:
    """Run one of onnxruntime's calibrators over ``chunks``; memory is bounded by one chunk."""
    options: dict = {}
    if method == "percentile":
        options["percentile"] = percentile
    augmented = work_dir / "augmented.onnx"
    # The calibrators print progress on stdout; the pass reports through its notes instead.
    with contextlib.redirect_stdout(io.StringIO()):
        calibrator = create_calibrator(model_path, list(op_types), augmented_model_path=str(augmented),
                                       calibrate_method=METHODS[method], extra_options=options)
        # Same session as create_calibrator's (no graph optimization), with our thread count.
        calibrator.infer_session = open_session(augmented, threads=threads, optimization_level="disable",
                                                what="the calibration model")
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
    output range do the clamping (QDQRemovableActivation) without checking that the range starts
    at the clamp: with the symmetric ranges of 'distribution' calibration a removed Relu would let
    negative values through. Returns the number of ranges changed.
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


def chunked(stream: Iterator[tuple[Feed, np.ndarray | None]], samples_per_chunk: int) -> Iterator[list[Feed]]:
    """Group feeds into chunks of about ``samples_per_chunk`` samples, all feeds of a chunk with
    the same shapes: the histogram calibrators stack a chunk's outputs with ``np.asarray``, which
    fails on a short last batch or varying image sizes."""
    chunk: list[Feed] = []
    size = 0
    for feed, _ in stream:
        if chunk and any(chunk[0][k].shape != v.shape for k, v in feed.items()):
            yield chunk
            chunk, size = [], 0
        chunk.append(feed)
        size += samples_in(feed)
        if size >= samples_per_chunk:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
