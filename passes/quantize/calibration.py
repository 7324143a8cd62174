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

``mse`` is not onnxruntime's: its histogram collector (the entropy calibrator's, finer bins)
gathers each tensor's values and ranges.py picks the clipping range with the least
quantize-dequantize error. The result is stored as a minmax cache (a range per tensor), which is
what ``quantize_static`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
from onnxruntime.quantization.calibrate import (CalibrationDataReader, CalibrationMethod, HistogramCollector,
                                                TensorData, TensorsData, create_calibrator)

from deployopt.core.errors import WorkFailed
from deployopt.core.session import open_session
from deployopt.passes.quantize import ranges as ranges_lib
from deployopt.passes.quantize.data import Feed, samples_in

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
    "distribution": CalibrationMethod.Distribution,
    "mse": CalibrationMethod.MinMax,  # the cache holds the searched ranges as plain ranges
}
#: What collects the data of each method (mse: onnxruntime's histograms, then ranges.search).
COLLECTORS = {**METHODS, "mse": CalibrationMethod.Entropy}


def histogram_method(method: str) -> str:
    """The memory model's name for what ``method`` collects (mse: histograms, like entropy; auto:
    the largest of the methods it tries, the histograms)."""
    return "entropy" if method in ("mse", "auto") else method


@dataclasses.dataclass
class Activations:
    """How activations are stored, for the range search: integer range and symmetry."""

    qmin: int
    qmax: int
    symmetric: bool


class _ChunkReader(CalibrationDataReader):
    """Hands onnxruntime's calibrator one chunk of feeds, then reports exhaustion."""

    def __init__(self, chunk: list[Feed]):
        self._items = iter(chunk)

    def get_next(self) -> dict | None:
        return next(self._items, None)


def calibrate(model_path: pathlib.Path, work_dir: pathlib.Path, *, methods: Sequence[str], percentile: float,
              op_types: Sequence[str], chunks: Iterator[list[Feed]], threads: int,
              activations: Activations | None = None, search: dict | None = None) -> dict[str, TensorsData]:
    """Ranges of every method in ``methods`` from one pass over ``chunks``; memory is bounded by
    one chunk. With ``mse`` among them its ranges are searched for ``activations`` and ``search``
    receives a summary of the search.

    ``minmax`` alone runs onnxruntime's MinMax calibrator, whose augmented model outputs only a
    min and a max per tensor. With any histogram method the data are run once through one
    histogram-augmented model (every calibrated tensor an output) and each chunk's tensors go to
    every method's collector; minmax is then the collectors' running min and max, the same
    reduction MinMax computes. One pass instead of one per method: ``calibration: auto`` ran the
    model three times and spent most of its time there.
    """
    histograms = [m for m in methods if m != "minmax"]
    if not histograms:
        return {"minmax": _minmax(model_path, work_dir, op_types, chunks, threads)}
    # The calibrators print progress on stdout; the pass reports through its notes instead.
    with contextlib.redirect_stdout(io.StringIO()):
        calibrators = {m: _calibrator(model_path, work_dir, m, percentile, op_types) for m in histograms}
        lead = calibrators[histograms[0]]
        # Same session as create_calibrator's (no graph optimization), with our thread count.
        lead.infer_session = open_session(lead.augmented_model_path, threads=threads, optimization_level="disable",
                                          what="the calibration model")
        for c in calibrators.values():
            c.collector = _new_collector(c)
        own = lead.collector
        lead.collector = _Tee([c.collector for c in calibrators.values()])  # lead's collect_data feeds them all
        for chunk in chunks:
            lead.collect_data(_ChunkReader(chunk))
        lead.collector = own
        ranges = {}
        for method, c in calibrators.items():
            if not c.collector.histogram_dict:
                raise WorkFailed("calibration collected no tensor ranges (no calibration batch could be run)")
            ranges[method] = searched_ranges(c.collector.histogram_dict, activations or Activations(0, 255, False),
                                             search) if method == "mse" else c.compute_data()
    if "minmax" in methods:  # as onnxruntime's MinMax calibrator gives them: float32 arrays of shape (1,)
        ranges["minmax"] = TensorsData(CalibrationMethod.MinMax, {
            name: TensorData(lowest=np.reshape(low, (1,)), highest=np.reshape(high, (1,)))
            for name, (_, _, low, high, *_) in own.histogram_dict.items()})
    del calibrators, lead, own
    return {m: ranges[m] for m in methods}


def _calibrator(model_path: pathlib.Path, work_dir: pathlib.Path, method: str, percentile: float,
                op_types: Sequence[str]):
    """onnxruntime's calibrator for ``method`` with the options this pass gives it; its session is
    dropped (the caller opens the one it runs)."""
    options: dict = {}
    if method == "percentile":
        options["percentile"] = percentile
    if method == "mse":
        options["num_bins"] = ranges_lib.HIST_BINS
    augmented = work_dir / f"augmented-{method}.onnx"
    calibrator = create_calibrator(model_path, list(op_types), augmented_model_path=str(augmented),
                                   calibrate_method=COLLECTORS[method], extra_options=options)
    calibrator.infer_session = None
    return calibrator


def _new_collector(calibrator) -> HistogramCollector:
    """The collector onnxruntime's HistogramCalibrater.collect_data creates on its first call."""
    return HistogramCollector(method=calibrator.method, symmetric=calibrator.symmetric, num_bins=calibrator.num_bins,
                              num_quantized_bins=calibrator.num_quantized_bins, percentile=calibrator.percentile,
                              scenario=calibrator.scenario)


class _Tee:
    """A collector that hands each chunk's tensors to several collectors."""

    def __init__(self, collectors: list[HistogramCollector]):
        self.collectors = collectors

    def collect(self, name_to_arr: dict) -> None:
        for collector in self.collectors:
            collector.collect(name_to_arr)


def _minmax(model_path: pathlib.Path, work_dir: pathlib.Path, op_types: Sequence[str],
            chunks: Iterator[list[Feed]], threads: int) -> TensorsData:
    """onnxruntime's MinMax calibrator fed chunk by chunk (min and max merge exactly)."""
    with contextlib.redirect_stdout(io.StringIO()):
        calibrator = _calibrator(model_path, work_dir, "minmax", 0.0, op_types)
        calibrator.infer_session = open_session(calibrator.augmented_model_path, threads=threads,
                                                optimization_level="disable", what="the calibration model")
        for chunk in chunks:
            calibrator.collect_data(_ChunkReader(chunk))
        ranges = calibrator.compute_data()
    del calibrator
    if ranges is None or not len(ranges.data):
        raise WorkFailed("calibration collected no tensor ranges (no calibration batch could be run)")
    return ranges


def searched_ranges(histograms: dict, activations: Activations, summary: dict | None = None) -> TensorsData:
    """The least-error range of every tensor (ranges.search) from onnxruntime's histograms
    ``{name: (hist, edges, min, max, threshold)}``, as a minmax cache."""
    data, gains, clipped = {}, [], 0
    for name, (hist, edges, low, high, *_) in histograms.items():
        lo, hi, error, minmax = ranges_lib.search(hist, edges, float(low), float(high), activations.qmin,
                                                  activations.qmax, activations.symmetric)
        clipped += (lo, hi) != (float(min(low, 0.0)), float(max(high, 0.0)))
        if error > 0:
            gains.append(10 * np.log10(minmax / error))
        data[name] = TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
    if summary is not None:
        summary.update({"tensors_clipped": clipped, "histogram_bins": ranges_lib.HIST_BINS,
                        # quantize-dequantize MSE of minmax over the searched range, mean over tensors
                        "tensor_error_reduction_db": round(float(np.mean(gains)), 2) if gains else 0.0})
    return TensorsData(CalibrationMethod.MinMax, data)


def clamp_ranges(ranges: TensorsData, bounds: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Intersect the range of each tensor in ``bounds`` with its interval: the bounds of a Relu/Clip
    output (report.activation_bounds), or what the tensor's readers can tell apart
    (dead_zones.py). Returns ``{tensor: new step / old step}`` for the ranges changed (the
    quantizer widens every range to hold 0, so the step is ``(max(hi, 0) - min(lo, 0)) / 255``).

    The first matters for correctness: onnxruntime's quantizer removes a Relu/Clip whenever
    activations are asymmetric and lets the output range do the clamping (QDQRemovableActivation)
    without checking that the range starts at the clamp: with the symmetric ranges of
    'distribution' calibration a removed Relu would let negative values through.
    """
    def width(low: np.ndarray, high: np.ndarray) -> float:
        return float(np.max(np.maximum(high, 0)) - np.min(np.minimum(low, 0)))

    changed = {}
    for name, (lo, hi) in bounds.items():
        if name not in ranges:
            continue
        data = ranges[name]
        low, high = data.range_value
        new_low = np.maximum(low, np.asarray(lo, dtype=np.asarray(low).dtype)).astype(np.asarray(low).dtype)
        new_high = np.minimum(high, np.asarray(hi, dtype=np.asarray(high).dtype)).astype(np.asarray(high).dtype)
        if not (np.array_equal(new_low, low) and np.array_equal(new_high, high)):
            before = width(low, high)
            changed[name] = width(new_low, new_high) / before if before > 0 else 1.0
            data.lowest, data.highest = new_low, new_high
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
