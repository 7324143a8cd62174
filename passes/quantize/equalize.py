"""Range equalization before calibration: the channels of a depthwise convolution's input are
scaled to a common range, so that its one uint8 scale serves them all.

A uint8 activation has one step per tensor, ``R / 255`` with ``R`` its calibrated range. The
expansion outputs of MobileNet-style blocks (Conv -> ReLU6 -> depthwise Conv) hold channels whose
ranges differ by 10-100x, and most channels then use a few of the 256 levels. Measured on
MobileNetV2 (real weights; float weights, uint8 activations, 240 held-out crops): uint8 on its 35
ReLU6 outputs alone costs 7.1 points of top-1 agreement (KL 0.024), uint8 on every other
activation together 2.9 points (KL 0.009).

For a producer Conv ``P`` whose output is read only by an activation ``A`` (Relu, or Clip with
minimum 0), whose output is read only by a depthwise Conv ``D`` (one input channel per group),
channel ``c`` is scaled by ``a_c >= 1``:

    P': W_P[c] * a_c, b_P[c] * a_c        (so P'(x)_c = a_c P(x)_c)
    D': W_D[c] / a_c                      (bias unchanged; D reads channel c alone)

    a_c = clip(R / (HEADROOM m_c), 1, MAX_SCALE)   (1 for a channel that is never positive)

with ``m_c`` channel c's largest value of ``A``'s output on the calibration samples and
``R = max_c m_c``: every channel reaches ``R / HEADROOM`` (or is scaled ``MAX_SCALE`` times).
Weights are quantized per output channel, and both ``P``'s output channels and ``D``'s channels
are scaled whole, so their int8 weights are the same up to the per-channel scales: only the
activation steps change. Without per-channel weights the pass leaves the model alone.

What the float model computes: Relu is positively homogeneous, ``Relu(a z) = a Relu(z)``, so
``D'(A(P'(x))) = D(A(P(x)))`` exactly. ``Clip(a z, 0, h) = a Clip(z, 0, h / a)``: channel ``c``
is now clipped at ``h / a_c = h HEADROOM m_c / R >= HEADROOM m_c`` in the original units. The
model is unchanged on everything calibration saw, but an input that drives a small channel past
that bound is clipped there. That is why ``equalize`` is off by default: measured
(benchmarks/results/equalize.md), it halves MobileNetV2's int8 KL on held-out crops and cuts it
3x on unseen photos, while on EfficientNet-Lite0, whose small channels grow more on photos unlike
the calibration set, the equalized float model alone moves away from the original on those
photos, and the int8 model's KL there nearly doubles. Measure it on your own held-out data.

Only depthwise readers are equalized. Scaling a dense reader's input columns instead (the
SmoothQuant-style trade between activation and weight ranges) was measured on MobileNetV2's
projections and made its int8 model worse: its int8 weights are per output channel, and the
shrunken columns lose more weight precision than the activations gain
(benchmarks/results/equalize.md).

This is the data-driven form of cross-layer equalization (Nagel et al., 2019, "Data-Free
Quantization"), which balances weight ranges across a pair with ReLU between them; here the
activation range is balanced, and ReLU6 is kept (their method replaced it with ReLU). Written by
hand: onnxruntime's quantizer has no equalization, and NNCF's and AIMET's work on their own graph
representations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deployopt.core.session import open_session
from deployopt.passes.quantize.cpu import conv_group, is_depthwise
from deployopt.passes.quantize.data import Feed
from deployopt.passes.quantize.dead_zones import floored_at_zero, scalar_constants

#: How far above its calibrated maximum a scaled channel can go before its Clip cuts it. Measured
#: (benchmarks/results/equalize.md): 2 gave back most of MobileNetV2's gain and did not remove
#: EfficientNet-Lite0's loss on unseen photos; nor did scaling only the channels that gain 2x.
HEADROOM = 1.0
#: The largest factor a channel is scaled by: a nearly dead channel scaled further would only
#: shrink its depthwise weights toward their rounding step.
MAX_SCALE = 32.0


@dataclasses.dataclass(frozen=True)
class Pair:
    """A producer Conv, its activation and the depthwise Conv that reads it."""

    producer: str  # node names
    activation: str
    depthwise: str
    tensor: str  # the activation's output, the tensor whose channels are equalized


def pairs(proto: onnx.ModelProto) -> list[Pair]:
    """The producer -> Relu/Clip(0, h) -> depthwise chains of ``proto`` that can be equalized."""
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    scalars = scalar_constants(proto)
    outputs = {o.name for o in proto.graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def only_reader(tensor: str) -> onnx.NodeProto | None:
        found = readers.get(tensor, [])
        return found[0] if len(found) == 1 and tensor not in outputs else None

    found = []
    for producer in proto.graph.node:
        if producer.op_type != "Conv" or len(producer.input) < 2 or producer.input[1] not in shapes:
            continue
        if len(producer.input) > 2 and producer.input[2] and producer.input[2] not in shapes:
            continue  # a computed bias cannot be rescaled
        activation = only_reader(producer.output[0])
        if activation is None or not floored_at_zero(activation, scalars):  # positively homogeneous
            continue
        depthwise = only_reader(activation.output[0])
        if (depthwise is None or depthwise.op_type != "Conv" or depthwise.input[0] != activation.output[0]
                or len(depthwise.input) < 2 or depthwise.input[1] not in shapes
                or not is_depthwise(shapes[depthwise.input[1]], conv_group(depthwise))):
            continue
        scaled = [*producer.input[1:3], depthwise.input[1]]
        if any(name and len(readers[name]) > 1 for name in scaled):
            continue  # an initializer another node reads too would change under it
        found.append(Pair(producer.name, activation.name, depthwise.name, activation.output[0]))
    return found


def channel_maxima(proto: onnx.ModelProto, tensors: list[str], batches: Iterable[Feed],
                   threads: int) -> dict[str, np.ndarray]:
    """Each tensor's largest value per channel (axis 1) over ``batches``, from one float run."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in known)
    session = open_session(probe, threads=threads, what="the model (equalization)")
    maxima: dict[str, np.ndarray] = {}
    for feed in batches:
        for name, value in zip(tensors, session.run(tensors, feed)):
            axes = tuple(i for i in range(value.ndim) if i != 1)
            peak = value.max(axis=axes)
            maxima[name] = peak if name not in maxima else np.maximum(maxima[name], peak)
    return maxima


def scales_for(maxima: np.ndarray) -> np.ndarray:
    """``a_c = clip(R / (HEADROOM m_c), 1, MAX_SCALE)``, 1 where the channel is never positive."""
    top = float(maxima.max()) if maxima.size else 0.0
    if top <= 0:
        return np.ones_like(maxima, dtype=np.float64)
    positive = maxima > 0
    return np.where(positive, np.clip(top / (HEADROOM * np.where(positive, maxima, 1.0)), 1.0, MAX_SCALE), 1.0)


def equalize(proto: onnx.ModelProto, batches: Iterable[Feed], threads: int) -> tuple[onnx.ModelProto, dict]:
    """``proto`` with every equalizable chain scaled (module doc), and a summary for the report."""
    found = pairs(proto)
    if not found:
        return proto, {"pairs": 0}
    maxima = channel_maxima(proto, [p.tensor for p in found], batches, threads)
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    init = {t.name: t for t in result.graph.initializer}
    nodes = {n.name: n for n in result.graph.node}
    applied = []
    for pair in found:
        scale = scales_for(maxima[pair.tensor].astype(np.float64))
        producer, depthwise = nodes[pair.producer], nodes[pair.depthwise]
        _scale_initializer(init[producer.input[1]], scale, axis=0)
        if len(producer.input) > 2 and producer.input[2]:
            _scale_initializer(init[producer.input[2]], scale, axis=0)
        _scale_initializer(init[depthwise.input[1]], 1.0 / scale, axis=0)
        applied.append(scale)
    every = np.concatenate(applied)
    summary = {"pairs": len(found), "channels": int(every.size),
               "channels_scaled": int(np.count_nonzero(every > 1.0 + 1e-6)),
               "median_scale": round(float(np.median(every)), 3), "max_scale": round(float(every.max()), 3),
               "tensors": [p.tensor for p in found]}
    return result, summary


def _scale_initializer(tensor: onnx.TensorProto, scale: np.ndarray, *, axis: int) -> None:
    """Multiply ``tensor`` by ``scale`` along ``axis``, in place, keeping its dtype."""
    value = numpy_helper.to_array(tensor)
    shape = [1] * value.ndim
    shape[axis] = -1
    scaled = (value.astype(np.float64) * scale.reshape(shape)).astype(value.dtype)
    tensor.CopyFrom(numpy_helper.from_array(scaled, tensor.name))
