"""Weight refinement after QDQ insertion: error-compensating (GPTQ) or learned (AdaRound) rounding
and bias correction.

onnxruntime's quantizer rounds every weight to the nearest grid point, ``q = round(w / s)``.
Each rounding error is small, but a layer's output error is their weighted sum, and on networks
with few weights per output (depthwise 3x3 convolutions: 9) it adds up to a visible loss of
top-1 agreement with the float model.

A layer is seen as ``y = W x + b`` with rows of ``W`` the outputs (per group for grouped
convolutions) and ``x`` an im2col patch of its input (Gemm/MatMul: an input row). From the float
model on calibration data we keep, per layer and group, ``H = E[x xᵀ]`` and ``m = E[x]``.

1. Rounding (GPTQ with lazy batches and act-order): the output error of weights ``Ŵ`` on that
   data is ``E‖(Ŵ − W) x‖² = Σ_rows Δw H Δwᵀ``. Columns are quantized one at a time on the
   layer's own grid (its per-channel scale and zero point are kept), and each column's rounding
   error ``e`` is pushed onto the columns not yet quantized through the inverse Hessian:
   ``w[j>i] -= e · U[i, j>i] / U[i, i]``, with ``U`` the upper Cholesky factor of
   ``(H + λI)⁻¹``, ``λ`` = ``damp`` x mean(diag H). Columns go in order of decreasing
   ``diag H`` (the inputs with most energy are rounded first, while the most columns remain to
   absorb their error). Statistics use up to ``POSITIONS`` output positions per sample.
   Two kinds of layer are rounded to nearest instead: one with fewer data rows than columns (a
   classifier on pooled features with 64 samples: its ``H`` is rank-deficient and the
   compensation would fit the calibration samples, not the distribution), and one wider than
   ``MAX_COLUMNS`` (``K²`` memory and time; its errors average over many inputs anyway). A layer
   where GPTQ's error on the calibration statistics is not below nearest's keeps nearest.
   With ``rounding: adaround`` each layer GPTQ applies to is also rounded by AdaRound
   (rounding.py: every weight to the floor or ceiling of ``w / s``, learned on the same ``H``) and
   keeps whichever of the two has the lower error ``Σ Δw H Δwᵀ``. GPTQ can move a weight several
   grid steps to absorb its neighbours' errors, AdaRound only one, so neither wins everywhere.
2. Bias correction (empirical form): whatever the rounding, the output mean moves by
   ``E[Δy] = ΔW m``; it is removed from the int32 bias: ``b_q -= round(ΔW m / s_b)``. Using the
   mean patch ``m`` (not per-channel means) accounts for zero padding at the borders exactly.

Only the integer weights and biases of the QDQ model change: scales, zero points and the graph
stay as onnxruntime made them, so the fused int8 kernels are the same. The float statistics do
not depend on the quantization, so fallback and latency trials reuse them.

Written by hand: onnxruntime's quantizer has no GPTQ or bias correction for convolutions (its
GPTQ is for 4-bit MatMul weights only), and other toolkits apply them to PyTorch modules, not to
an ONNX QDQ graph.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

from deployopt.core.data import Dataset
from deployopt.core.session import open_session
from deployopt.passes.quantize import rounding as rounding_lib
from deployopt.passes.quantize.cpu import is_depthwise
from deployopt.passes.reconstruct import conv_output_size, conv_pads, conv_patches
from deployopt.passes.quantize.data import Feed, InputSpec, feeds, samples_in

#: Ops whose weight (input 1) refinement handles.
REFINABLE = ("Conv", "Gemm", "MatMul")
#: GPTQ's damping λ / mean(diag H).
DAMP = 0.01
#: Output positions per sample whose patches enter the statistics (drawn at random, seed 0):
#: 64 samples x 256 positions is 16k rows, plenty for K <= MAX_COLUMNS, and early high-resolution
#: layers (112x112 = 12,544 positions) stop dominating the time.
POSITIONS = 256
#: Widest layer (columns K = C_in/group x kh x kw) GPTQ rounds: its statistics take K² memory and
#: rows x K² time (3x3 convolutions on 512 channels, K = 4,608: 170 MB of float64 each). Wider
#: layers are rounded to nearest and bias-corrected; their errors average over many inputs anyway.
MAX_COLUMNS = 2048
#: Columns per lazy batch of the GPTQ update (the trailing update is one matrix product).
BLOCK = 128


@dataclasses.dataclass
class Layer:
    """One refinable node: its float weight as rows ``(G, R, K)`` and where the int8 data lives."""

    node: str
    op_type: str
    input: str  # the float model's activation input
    weight: np.ndarray  # float, (G, R, K)
    attrs: dict
    weight_shape: tuple[int, ...]
    transposed: bool  # rows are weight.T (Gemm transB=0, MatMul)


@dataclasses.dataclass
class Stats:
    """Sums over data rows: ``gram = Σ x xᵀ`` (G, K, K; None above ``MAX_COLUMNS``), ``total = Σ x``
    (G, K), ``rows``."""

    gram: np.ndarray | None
    total: np.ndarray
    rows: int = 0

    @property
    def hessian(self) -> np.ndarray | None:
        return None if self.gram is None else self.gram / max(self.rows, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.rows, 1)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def find_layers(float_proto: onnx.ModelProto, qdq_proto: onnx.ModelProto) -> tuple[list[Layer], dict[str, str]]:
    """Layers of the float model whose weights the QDQ model stores as int8 initializers, and
    ``{node: why not}`` for the refinable ops that cannot be refined."""
    init = {t.name: t for t in float_proto.graph.initializer}
    producer = {o: n for n in qdq_proto.graph.node for o in n.output}
    qinit = {t.name for t in qdq_proto.graph.initializer}
    quantized = {n.name for n in qdq_proto.graph.node if n.op_type in REFINABLE and len(n.input) > 1
                 and (dq := producer.get(n.input[1])) is not None and dq.op_type == "DequantizeLinear"
                 and dq.input[0] in qinit}
    layers, skipped = [], {}
    for node in float_proto.graph.node:
        if node.op_type not in REFINABLE or node.name not in quantized:
            continue
        if node.input[1] not in init:
            skipped[node.name] = "weight is not an initializer"
            continue
        w = numpy_helper.to_array(init[node.input[1]]).astype(np.float64)
        a = _attrs(node)
        if node.op_type == "Conv":
            if w.ndim != 4:
                skipped[node.name] = "only 2-D convolutions are refined"
                continue
            g = int(a.get("group", 1))
            rows, transposed = w.reshape(g, w.shape[0] // g, -1), False
        elif w.ndim != 2 or (node.op_type == "Gemm" and a.get("transA", 0)):
            skipped[node.name] = "only 2-D weights with untransposed inputs are refined"
            continue
        else:
            transposed = node.op_type == "MatMul" or not a.get("transB", 0)
            rows = (w.T if transposed else w)[None]
        layers.append(Layer(node.name, node.op_type, node.input[0], rows, a, w.shape, transposed))
    return layers, skipped


def _patches(x: np.ndarray, layer: Layer, rng: np.random.Generator) -> np.ndarray:
    """The layer's input rows for one sample, at most ``POSITIONS`` of them: (G, rows, K)."""
    if layer.op_type != "Conv":
        rows = x.reshape(1, -1, layer.weight.shape[2])
        return rows[:, _subset(rows.shape[1], rng)]
    kernel = tuple(layer.weight_shape[2:])
    strides = tuple(layer.attrs.get("strides", (1, 1)))
    dilations = tuple(layer.attrs.get("dilations", (1, 1)))
    auto_pad = layer.attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = conv_pads(auto_pad, layer.attrs.get("pads"), x.shape[2:], kernel, strides, dilations)
    group = int(layer.attrs.get("group", 1))
    if kernel == (1, 1) and strides == (1, 1) and not any(pads):  # pointwise: no im2col
        flat = x.reshape(group, x.shape[1] // group, -1)
        return flat[:, :, _subset(flat.shape[2], rng)].transpose(0, 2, 1)
    out_h, out_w = conv_output_size(x.shape[2:], kernel, strides, pads, dilations)
    return conv_patches(x, kernel, strides=strides, pads=pads, dilations=dilations, group=group,
                        positions=_subset(out_h * out_w, rng))


def _subset(n: int, rng: np.random.Generator) -> np.ndarray:
    """All of ``n`` output positions, or ``POSITIONS`` of them drawn without replacement."""
    return np.arange(n) if n <= POSITIONS else np.sort(rng.choice(n, POSITIONS, replace=False))


def collect(float_path: pathlib.Path, layers: list[Layer], stream: Iterable[Feed], threads: int) -> dict[str, Stats]:
    """``Stats`` of every layer's input on the float model, one sample at a time (memory is one
    sample's patches plus the ``K x K`` sums)."""
    proto = onnx.load(str(float_path))
    present = {o.name for o in proto.graph.output}
    names = list(dict.fromkeys(layer.input for layer in layers))
    for name in names:
        if name not in present:
            proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    tmp = pathlib.Path(float_path).with_name("refine-capture.onnx")
    onnx.save(proto, str(tmp))
    sess = open_session(tmp, threads=threads, what="the float model with its layer inputs as outputs")
    stats = {}
    for layer in layers:
        g, _, k = layer.weight.shape
        # Layers too wide for GPTQ keep only the mean (bias correction): no K x K memory or time.
        stats[layer.node] = Stats(np.zeros((g, k, k)) if k <= MAX_COLUMNS else None, np.zeros((g, k)))
    rng = np.random.default_rng(0)
    for feed in stream:
        values = dict(zip(names, sess.run(names, feed)))
        for layer in layers:
            x = np.asarray(values[layer.input], dtype=np.float32)
            for i in range(len(x)):  # per sample: im2col of a batch can take gigabytes
                p = _patches(x[i:i + 1], layer, rng)
                s = stats[layer.node]
                if s.gram is not None:
                    s.gram += np.matmul(p.transpose(0, 2, 1), p)  # float32 BLAS, float64 sums
                s.total += p.sum(axis=1, dtype=np.float64)
                s.rows += p.shape[1]
    tmp.unlink(missing_ok=True)
    return stats


def gptq(weight: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int,
         hessian: np.ndarray, damp: float) -> np.ndarray:
    """Integer weights (G, R, K) on the grid ``s (q - z)`` minimising ``Σ Δw H Δwᵀ`` greedily
    (see the module docstring). ``scale``/``zero``: (G, R); ``hessian``: (G, K, K)."""
    g, r, k = weight.shape
    h = hessian.astype(np.float64).copy()
    diag = np.einsum("gkk->gk", h)
    dead = diag <= 0
    h[:, np.arange(k), np.arange(k)] += np.where(dead, 1.0, 0.0)  # inputs never seen: any weight
    h[:, np.arange(k), np.arange(k)] += damp * np.mean(np.einsum("gkk->gk", h), axis=1, keepdims=True)
    order = np.argsort(-np.einsum("gkk->gk", h), axis=1, kind="stable")
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], 1), order[:, None, :], 2)
    w = np.take_along_axis(weight.astype(np.float64), order[:, None, :], 2)
    upper = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)  # (H + λI)⁻¹ = Uᵀ U
    s, z = np.where(scale > 0, scale, 1.0)[:, :, None], zero[:, :, None]  # an all-zero row: any scale
    q = np.zeros_like(w)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        errors = np.zeros((g, r, b1 - b0))
        for i in range(b0, b1):
            col = w[:, :, i]
            qi = np.clip(np.round(col / s[:, :, 0]) + z[:, :, 0], qmin, qmax)
            q[:, :, i] = qi
            err = (col - s[:, :, 0] * (qi - z[:, :, 0])) / upper[:, i, i][:, None]
            w[:, :, i + 1:b1] -= err[:, :, None] * upper[:, None, i, i + 1:b1]
            errors[:, :, i - b0] = err
        if b1 < k:
            w[:, :, b1:] -= np.matmul(errors, upper[:, b0:b1, b1:])
    out = np.empty_like(q)
    np.put_along_axis(out, order[:, None, :], q, 2)
    return out


def _gptq_unfit(rounding: str, stats: Stats, columns: int) -> str | None:
    """Why a layer is rounded to nearest rather than by GPTQ or AdaRound (None: they apply)."""
    if rounding == "nearest":
        return "rounding: nearest"
    if stats.gram is None:
        return f"{columns} columns > {MAX_COLUMNS} (MAX_COLUMNS)"
    if stats.rows < columns:
        return f"{stats.rows} data rows < {columns} columns"
    return None


def _output_error(delta: np.ndarray, hessian: np.ndarray) -> float:
    """``Σ_rows Δw H Δwᵀ`` summed over groups."""
    return float(np.sum(np.matmul(delta, hessian) * delta))


def _correct_bias(proto: onnx.ModelProto, node: onnx.NodeProto, shift: np.ndarray, init: dict,
                  producer: dict) -> bool:
    """Subtract ``shift`` from the node's int32 bias (``b_q -= round(shift / s_b)``). A Conv or Gemm
    without a bias gets one, in the QDQ form onnxruntime fuses: int32 values with scale
    ``s_x · s_w`` and zero point 0 behind a DequantizeLinear."""
    bdq = producer.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if bdq is not None:
        if bdq.op_type != "DequantizeLinear" or bdq.input[0] not in init:
            return False
        b_tensor = init[bdq.input[0]]
        b = numpy_helper.to_array(b_tensor).astype(np.int64)
        b_scale = numpy_helper.to_array(init[bdq.input[1]]).astype(np.float64)
        fixed = np.clip(b - np.round(shift / b_scale), *_INT32)
        b_tensor.CopyFrom(numpy_helper.from_array(fixed.astype(np.int32), b_tensor.name))
        return True
    xdq, wdq = producer.get(node.input[0]), producer.get(node.input[1])
    if node.op_type == "MatMul" or xdq is None or xdq.op_type != "DequantizeLinear" \
            or any(v not in init for v in (xdq.input[1], wdq.input[1])) \
            or (node.op_type == "Gemm" and _attrs(node).get("beta", 1.0) != 1.0):
        return False
    s_x = numpy_helper.to_array(init[xdq.input[1]]).astype(np.float64)
    s_w = numpy_helper.to_array(init[wdq.input[1]]).astype(np.float64)
    b_scale = np.broadcast_to(s_x * s_w, shift.shape).astype(np.float32)
    values = np.clip(np.round(-shift / b_scale), *_INT32).astype(np.int32)
    base = f"{node.name}_bias_correction"
    tensors = [numpy_helper.from_array(values, base + "_quantized"),
               numpy_helper.from_array(b_scale, base + "_scale"),
               numpy_helper.from_array(np.zeros(shift.shape, np.int32), base + "_zero_point")]
    proto.graph.initializer.extend(tensors)
    init.update({t.name: t for t in tensors})
    dq = helper.make_node("DequantizeLinear", [t.name for t in tensors], [base], name=base + "_DequantizeLinear",
                          axis=0)
    index = next(i for i, n in enumerate(proto.graph.node) if n.name == node.name)
    proto.graph.node.insert(index, dq)
    node = proto.graph.node[index + 1]  # the message in the list (insert shifted it)
    if len(node.input) < 3:
        node.input.append(base)
    else:
        node.input[2] = base
    return True


_INT32 = (np.iinfo(np.int32).min, np.iinfo(np.int32).max)


_NAMES = {"gptq": "GPTQ", "adaround": "AdaRound"}


@dataclasses.dataclass
class Rounding:
    """How the integer weights are chosen: ``nearest`` (onnxruntime's), ``gptq``, or ``adaround``
    (rounding.py: learned per layer, within ``iterations`` and a wall-time ``budget_s`` for all
    layers; each layer keeps whichever of AdaRound, GPTQ and nearest has the lowest output error
    on the calibration statistics)."""

    method: str = "gptq"
    iterations: int = 1000
    reg: float = rounding_lib.REG
    budget_s: float = 300.0


def _candidates(layer: Layer, st: Stats, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int,
                rounding: Rounding, damp: float, budget: rounding_lib.Budget | None,
                cache: dict) -> tuple[dict[str, np.ndarray], str | None]:
    """Integer weights (G, R, K) by each applicable method, and why the layer stays nearest."""
    found: dict[str, np.ndarray] = {}
    why = _gptq_unfit(rounding.method, st, layer.weight.shape[2])
    if why is not None:
        return found, why
    try:
        found["gptq"] = gptq(layer.weight, scale, zero, qmin, qmax, st.hessian, damp)
    except np.linalg.LinAlgError:
        why = "H + λI is not positive definite in floating point"
    if rounding.method != "adaround":
        return found, why
    key = (layer.node, scale.tobytes(), zero.tobytes(), qmin, qmax)
    if key not in cache:  # trials re-quantize with the same scales: learned once
        layer_cost = rounding_lib.cost(layer.weight.shape)
        outcome = rounding_lib.adaround(layer.weight, scale, zero, qmin, qmax, rounding_lib.damped(st.hessian, damp),
                                        iterations=rounding.iterations, reg=rounding.reg,
                                        seconds=budget.share(layer_cost) if budget else None)
        if budget:
            budget.charge(layer_cost, outcome.seconds)
        cache[key] = outcome
    outcome = cache[key]
    if outcome.q is not None:
        found["adaround"] = outcome.q
    return found, why


def refine(qdq_path: pathlib.Path, layers: list[Layer], stats: dict[str, Stats], *, rounding: Rounding,
           bias_correction: bool, damp: float, reduce_range: bool, symmetric: bool,
           learned: dict | None = None) -> dict:
    """Rewrite the int8 weights (``rounding.method`` gptq or adaround) and int32 biases
    (``bias_correction``) of the QDQ model at ``qdq_path`` in place. ``learned`` caches AdaRound's
    results across calls. Returns a summary for the report."""
    proto = onnx.load(str(qdq_path))
    init = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    nodes = {n.name: n for n in proto.graph.node}
    learned = {} if learned is None else learned
    done = {key[0] for key in learned}
    to_learn = [layer.weight.shape for layer in layers if layer.node not in done
                and _gptq_unfit(rounding.method, stats[layer.node], layer.weight.shape[2]) is None]
    budget = rounding_lib.Budget(rounding.budget_s, sum(map(rounding_lib.cost, to_learn))) \
        if rounding.method == "adaround" else None
    gains = []
    chosen: dict[str, list[str]] = {"gptq": [], "adaround": []}
    nearest, corrected = {}, 0
    for layer in layers:
        node = nodes.get(layer.node)
        if node is None or producer.get(node.input[1]) is None:
            continue  # returned to float in this trial
        dq = producer[node.input[1]]
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in init:
            continue
        q_tensor = init[dq.input[0]]
        q = numpy_helper.to_array(q_tensor)
        scale = numpy_helper.to_array(init[dq.input[1]]).astype(np.float64)
        zero = numpy_helper.to_array(init[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 \
            else np.zeros_like(scale)
        g, r, k = layer.weight.shape
        scale, zero = np.broadcast_to(scale, (g * r,)).reshape(g, r), np.broadcast_to(zero, (g * r,)).reshape(g, r)
        rows = (q.T if layer.transposed else q).reshape(g, r, k).astype(np.float64)
        st = stats[layer.node]
        delta = scale[:, :, None] * (rows - zero[:, :, None]) - layer.weight
        narrow = reduce_range and not is_depthwise(layer.weight_shape, layer.attrs.get("group", 1))
        qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(q_tensor.data_type, narrow, symmetric))
        found, why = _candidates(layer, st, scale, zero, qmin, qmax, rounding, damp, budget, learned)
        best, best_error = None, None
        if found:
            hessian = st.hessian
            error_nearest = _output_error(delta, hessian)
            errors = {m: _output_error(scale[:, :, None] * (v - zero[:, :, None]) - layer.weight, hessian)
                      for m, v in found.items()}
            best = min(errors, key=errors.get)
            best_error = errors[best]
            if best_error >= error_nearest:  # never worse than nearest on the calibration data
                tried = " and ".join(_NAMES[m] for m in found)
                best, why = None, f"{tried} {'was' if len(found) == 1 else 'were'} not better than nearest on " \
                                  "the calibration data"
        if best is not None:
            refined = found[best]
            delta = scale[:, :, None] * (refined - zero[:, :, None]) - layer.weight
            new = refined.reshape(r * g, k)
            new = (new.T if layer.transposed else new).reshape(q.shape).astype(q.dtype)
            q_tensor.CopyFrom(numpy_helper.from_array(new, q_tensor.name))
            chosen[best].append(layer.node)
            if best_error > 0:
                gains.append(10 * np.log10(error_nearest / best_error))
        else:
            nearest[layer.node] = why
        if bias_correction:
            shift = np.einsum("grk,gk->gr", delta, st.mean).reshape(-1)  # E[Δy] per output
            if _correct_bias(proto, node, shift, init, producer):
                corrected += 1
    onnx.save(proto, str(qdq_path))
    summary = {"rounding": rounding.method, "bias_correction": bias_correction,
               "layers_gptq": len(chosen["gptq"]), "layers_nearest": len(nearest),
               "nearest": nearest if rounding.method != "nearest" else {}, "biases_corrected": corrected,
               # E‖ΔW x‖² on the calibration data, round-to-nearest over the rounding kept, mean over
               # the layers not left to nearest
               "weight_output_error_reduction_db": round(float(np.mean(gains)), 2) if gains else 0.0}
    if rounding.method == "adaround":
        outcomes = [o for o in learned.values() if isinstance(o, rounding_lib.Outcome)]
        summary["adaround"] = {
            "layers_adaround": len(chosen["adaround"]), "adaround_layers": chosen["adaround"],
            "layers_learned": sum(o.q is not None for o in outcomes),
            "iterations": rounding.iterations, "reg": rounding.reg, "budget_s": rounding.budget_s,
            "mean_iterations": round(float(np.mean([o.iterations for o in outcomes])), 1) if outcomes else 0.0,
            "seconds": round(sum(o.seconds for o in outcomes), 2),
            "not_learned": {k[0]: o.reason for k, o in learned.items() if o.q is None and o.reason}}
    return summary


class Refiner:
    """Float statistics collected once (lazily), applied to every quantized trial."""

    def __init__(self, float_path: pathlib.Path, dataset: Dataset, inputs: Sequence[InputSpec], *,
                 samples: int, batch_size: int, threads: int, rounding: Rounding, bias_correction: bool,
                 damp: float, reduce_range: bool, symmetric: bool):
        self.float_path, self.dataset, self.inputs = float_path, dataset, inputs
        self.samples, self.batch_size, self.threads = samples, batch_size, threads
        self.options = dict(rounding=rounding, bias_correction=bias_correction, damp=damp,
                            reduce_range=reduce_range, symmetric=symmetric)
        self.layers: list[Layer] | None = None
        self.learned: dict = {}  # AdaRound's results by layer and grid, reused by every trial
        self.stats: dict[str, Stats] = {}
        self.skipped: dict[str, str] = {}
        self.seconds_stats = 0.0
        self.samples_seen = 0

    def _feeds(self) -> Iterator[Feed]:
        for feed, _ in feeds(self.dataset, self.inputs, self.samples, self.batch_size):
            self.samples_seen += samples_in(feed)
            yield feed

    def __call__(self, qdq_path: pathlib.Path) -> dict:
        if self.layers is None:
            t0 = time.perf_counter()
            self.layers, self.skipped = find_layers(onnx.load(str(self.float_path)), onnx.load(str(qdq_path)))
            if self.layers:
                self.stats = collect(self.float_path, self.layers, self._feeds(), self.threads)
            self.seconds_stats = time.perf_counter() - t0
        if not self.layers:
            return {"layers_gptq": 0, "layers_nearest": 0, "biases_corrected": 0, "skipped": self.skipped}
        summary = refine(qdq_path, self.layers, self.stats, learned=self.learned, **self.options)
        summary["samples"] = self.samples_seen
        summary["statistics_seconds"] = round(self.seconds_stats, 2)
        if self.skipped:
            summary["skipped"] = self.skipped
        return summary
