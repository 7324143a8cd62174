"""Activation ranges tuned by the model's output error (``tune_ranges: true``).

Calibration gives each activation tensor a range from that tensor's own values: the extremes
seen (minmax), the clipping with the least quantize-dequantize error of the tensor itself
(ranges.py), or a histogram criterion (entropy). None of them sees what a tensor's error does
downstream: a range that is best for its own tensor can be too wide where the layers after it
amplify rounding noise, or too narrow where a clipped outlier is what the output depends on.
Here the ranges of the first quantization are rescaled one tensor at a time against the output
error ``E`` of the whole int8 model on calibration samples (output_error.py: the relative
squared error of the outputs against the float model's, the measure ``calibration: auto`` also
chooses by).

A factor ``f`` on a range ``[lo, hi]`` gives ``[f lo, f hi]``: the scale becomes ``f s`` and the
zero point ``z = round(qmin − lo / s)`` does not change, so only scale initializers move. Every
Conv/Gemm reading the tensor has an int32 bias on the scale ``s_x s_w``; it moves with it,
``s_b' = f s_b`` and ``b_q' = round(b_q / f)`` (the same float bias; a channel whose bias would
then leave int32 gets a coarser weight scale instead, as onnxruntime's quantizer does it:
``_Editor``). Tensors onnxruntime quantizes with one shared scale initializer (a Reshape or
MaxPool output takes its input's) move together: one unit of the search.

Coordinate search, one sweep in graph order (a tensor's best range depends on the noise that
reaches it, which the units before it have already settled): each unit's range is tried at
``FACTORS`` times its calibrated value and the lowest ``E`` is kept when it is below the current one
by more than ``MIN_GAIN`` (relative), so noise in the last digits does not move a range. A
factor that would widen a Relu/Clip output past the activation's bounds is not tried:
onnxruntime folds those activations into the range, which then is the clamp. The search stops
at ``budget_s``; the units not reached keep their calibrated ranges.

Each candidate is the edited QDQ graph run by onnxruntime with its int8 kernels (what is
deployed, saturation included), not a simulation. The result is one factor per tensor, applied
to the calibration ranges, so the model returned and every later fallback or latency trial are
quantized from the tuned ranges.

The samples tuned on are calibration samples: the search can fit them (a digits CNN gained
0.55 dB on its 64 samples and lost 0.5 dB on the other 192). The pass therefore keeps the tuned
ranges only when they also score better on the calibration samples after the searched ones, when
there are any (``QuantizePass._tune_ranges``). Its gain on data it did not see at all is what
``benchmarks/run_peers.py`` publishes (held-out and unseen photos).

Written by hand: onnxruntime's quantizer and calibrators choose each range from the tensor's own
values and have no search against the model's output.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization.calibrate import TensorsData

from deployopt.passes.quantize.output_error import OutputError, sqnr_db

#: Factors tried on a unit's calibrated range (0.6 clips 40% of it; 1.3 widens it by 30%).
FACTORS = (0.6, 0.75, 0.9, 1.1, 1.3)
#: Relative reduction of E a candidate needs to replace the current range.
MIN_GAIN = 0.005
#: onnxruntime's bound on an int32 bias, ``(2^32 - 2) / 2 / 1.0001``: past it its quantizer
#: coarsens the channel's weight scale instead (``_Editor`` does the same).
INT32_BIAS_LIMIT = (2 ** 32 - 2) / 2 / 1.0001


@dataclasses.dataclass
class Layer:
    """A Conv/Gemm reading a unit's tensor: the initializers its int32 bias depends on."""

    bias: str  # int32 bias
    bias_scale: str  # s_x s_w
    weight: str  # integer weights
    weight_scale: str  # s_w, per channel along ``axis`` or one value
    axis: int


@dataclasses.dataclass
class Unit:
    """One activation scale of the QDQ model and what moves with it."""

    scale: str  # the scale initializer
    tensors: list[str]  # the activation tensors quantized with it
    layers: list[Layer]  # the Conv/Gemm nodes reading them (their biases move with the scale)
    max_factor: float = math.inf  # the factor that reaches a folded Relu/Clip's bound


def units_of(qdq: onnx.ModelProto, ranges: TensorsData, bounds: dict[str, tuple[float, float]]) -> list[Unit]:
    """The units of the search in graph order: one per scale initializer of an activation
    QuantizeLinear, with the int32 biases that depend on it and its widest allowed factor."""
    initializers = {t.name for t in qdq.graph.initializer}
    produced_by = {out: node for node in qdq.graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    dequantizers: dict[str, list[onnx.NodeProto]] = {}  # scale initializer -> its DequantizeLinear nodes
    for node in qdq.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
        if node.op_type == "DequantizeLinear" and len(node.input) > 1:
            dequantizers.setdefault(node.input[1], []).append(node)
    units: dict[str, Unit] = {}
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers and node.input[1] in initializers:
            unit = units.setdefault(node.input[1], Unit(node.input[1], [], []))
            unit.tensors.append(node.input[0])
    for unit in units.values():
        for dq in dequantizers.get(unit.scale, []):
            for reader in readers.get(dq.output[0], []):
                if reader.op_type in ("Conv", "Gemm") and reader.input[0] == dq.output[0] and len(reader.input) > 2:
                    bias_dq, weight_dq = produced_by.get(reader.input[2]), produced_by.get(reader.input[1])
                    if all(p is not None and p.op_type == "DequantizeLinear" and p.input[0] in initializers
                           and p.input[1] in initializers for p in (bias_dq, weight_dq)):
                        axis = next((a.i for a in weight_dq.attribute if a.name == "axis"), 1)
                        unit.layers.append(Layer(bias_dq.input[0], bias_dq.input[1], weight_dq.input[0],
                                                 weight_dq.input[1], axis))
        for tensor in unit.tensors:
            if tensor in bounds and tensor in ranges.data:
                low, high = (float(np.asarray(v).max()) for v in ranges.data[tensor].range_value)
                bound_low, bound_high = bounds[tensor]
                if high > 0 and math.isfinite(bound_high):
                    unit.max_factor = min(unit.max_factor, bound_high / high)
                if low < 0 and math.isfinite(bound_low):
                    unit.max_factor = min(unit.max_factor, bound_low / low)
    # a scale with no calibrated range behind it could not be re-quantized from scaled ranges
    return [unit for unit in units.values() if any(t in ranges.data for t in unit.tensors)]


class _Editor:
    """The QDQ model with unit factors applied to its scale, bias and (where onnxruntime would
    re-scale them) weight initializers.

    For a factor ``f`` every Conv/Gemm reading the unit keeps its float bias: ``s_b' = f s_b``,
    ``b_q' = round(b_q / f)``. A channel whose ``|b_q / f|`` would pass ``INT32_BIAS_LIMIT`` (a
    large bias on small weights, f < 1) is re-scaled as onnxruntime's quantizer does it
    (``QDQQuantizer._adjust_weight_scale_for_int32_bias``): its bias and bias scale stay, its
    weight scale becomes ``s_w / f`` and its integer weights ``round(q_w f)``, so the edit is the
    model the quantizer makes from the scaled range. ``qdq`` is edited in place.
    """

    def __init__(self, qdq: onnx.ModelProto, units: list[Unit]):
        self.model = qdq
        self.units = units
        self.tensors = {t.name: t for t in qdq.graph.initializer}
        names = {u.scale for u in units} | {name for u in units for layer in u.layers
                                            for name in (layer.bias, layer.bias_scale, layer.weight, layer.weight_scale)}
        self.base = {name: numpy_helper.to_array(self.tensors[name]).copy() for name in names}

    def serialized(self, factors: dict[str, float]) -> bytes:
        for unit in self.units:
            f = factors.get(unit.scale, 1.0)
            self._set(unit.scale, self.base[unit.scale] * f)
            for layer in unit.layers:
                self._edit(layer, f)
        return self.model.SerializeToString()

    def _edit(self, layer: Layer, f: float) -> None:
        bias, bias_scale = self.base[layer.bias].astype(np.float64), self.base[layer.bias_scale]
        moved = np.abs(bias / f) > INT32_BIAS_LIMIT  # per output channel
        weight, weight_scale = self.base[layer.weight], self.base[layer.weight_scale]
        if weight_scale.size == 1:  # per-tensor weights: one bias scale, onnxruntime moves all or none
            moved = np.full_like(moved, moved.any())
        self._set(layer.bias, np.where(moved, bias, np.round(bias / f)))
        self._set(layer.bias_scale, np.where(moved, bias_scale, bias_scale * f) if bias_scale.size > 1
                  else bias_scale * (1.0 if moved.any() else f))
        if not moved.any():
            self._set(layer.weight, weight)
            self._set(layer.weight_scale, weight_scale)
            return
        channel = moved if weight_scale.size > 1 else moved[:1]
        self._set(layer.weight_scale, np.where(channel, weight_scale / f, weight_scale).reshape(weight_scale.shape))
        shape = [1] * weight.ndim
        shape[layer.axis if weight_scale.size > 1 else 0] = -1
        info = np.iinfo(weight.dtype)
        rescaled = np.clip(np.round(weight.astype(np.float64) * f), info.min, info.max)
        self._set(layer.weight, np.where(channel.reshape(shape), rescaled, weight))

    def _set(self, name: str, value: np.ndarray) -> None:
        dtype = self.base[name].dtype
        self.tensors[name].CopyFrom(numpy_helper.from_array(np.asarray(value).astype(dtype).reshape(self.base[name].shape), name))


@dataclasses.dataclass
class Tuning:
    """What the search did: the factor per unit it moved, and the output error before and after."""

    factors: dict[str, float]  # scale initializer -> factor (only the units moved)
    tensors: dict[str, float]  # activation tensor -> factor (the same, per tensor)
    error_before: float
    error_after: float
    units: int
    units_searched: int
    candidates: int
    seconds: float
    out_of_time: bool

    def to_json(self) -> dict:
        return {"units": self.units, "units_searched": self.units_searched, "candidates": self.candidates,
                "ranges_moved": len(self.factors), "seconds": round(self.seconds, 2), "out_of_time": self.out_of_time,
                "output_sqnr_db_before": round(sqnr_db(self.error_before), 2),
                "output_sqnr_db_after": round(sqnr_db(self.error_after), 2),
                "factors": {t: round(f, 4) for t, f in self.tensors.items()}}


def tune(qdq_path: pathlib.Path, units: list[Unit], error: OutputError, budget_s: float) -> Tuning:
    """The coordinate search of the module doc on the QDQ model at ``qdq_path``."""
    start = time.perf_counter()
    editor = _Editor(onnx.load(str(qdq_path)), units)
    factors: dict[str, float] = {}
    best = before = error.error(qdq_path)
    searched = candidates = 0
    out_of_time = False
    for unit in units:
        if time.perf_counter() - start > budget_s:
            out_of_time = True
            break
        searched += 1
        for f in FACTORS:
            if f > unit.max_factor * (1 + 1e-6):
                continue
            candidates += 1
            e = error.error(editor.serialized({**factors, unit.scale: f}))
            if e < best * (1 - MIN_GAIN):
                best, factors[unit.scale] = e, f
    by_tensor = {t: factors[unit.scale] for unit in units if unit.scale in factors for t in unit.tensors}
    return Tuning(factors, by_tensor, before, best, len(units), searched, candidates,
                  time.perf_counter() - start, out_of_time)


def scaled_ranges(ranges: TensorsData, tensor_factors: dict[str, float]) -> TensorsData:
    """``ranges`` with each listed tensor's ``[lo, hi]`` multiplied by its factor (in place)."""
    for tensor, f in tensor_factors.items():
        if tensor in ranges.data:
            data = ranges.data[tensor]
            low, high = data.range_value
            data.lowest = (np.asarray(low) * f).astype(np.asarray(low).dtype)
            data.highest = (np.asarray(high) * f).astype(np.asarray(high).dtype)
    return ranges
