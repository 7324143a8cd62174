"""Signal-to-quantization-noise ratio of every quantized tensor, for the report and the ``sqnr``
fallback ranking.

``SQNR = 10 log10(sum x^2 / sum (x - x_q)^2)`` dB, where ``x`` is the tensor before its Q/DQ pair
and ``x_q`` after it (local error, qdq_loss_debug's ``qdq_err``; ``x`` is first clamped where the
clamp is intended: a Relu/Clip folded into the range, or a range cut to what the tensor's readers
can tell apart, dead_zones.py), plus the same against the float
model's tensor (accumulated error, ``xmodel_err``). Same formula and tensor matching as
onnxruntime.quantization.qdq_loss_debug, but the sums are accumulated batch by batch instead of
keeping every activation of every sample (qdq_loss_debug.collect_activations does), and the
tensors are returned a group at a time, so one run never holds more than a group's tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import pathlib
import sys
from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnxruntime.quantization import qdq_loss_debug
from onnxruntime.quantization.calibrate import CalibraterBase
from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX, TENSOR_NAME_QUANT_SUFFIX

from deployopt.core.contain import confined
from deployopt.core.session import open_session, session_options
from deployopt.passes.quantize.data import Feed
from deployopt.passes.quantize.memory import tensor_bytes
from deployopt.passes.quantize.dead_zones import dead_zones
from deployopt.passes.quantize.report import folded_activations


def _exposable(src: pathlib.Path, work_dir: pathlib.Path) -> tuple[onnx.ModelProto, dict[str, onnx.ValueInfoProto]]:
    """The model, shape-inferred, and every float tensor onnxruntime would calibrate (name ->
    value info, keeping its shape: qdq_loss_debug.modify_model_output_intermediate_tensors
    flattens them, which loses the channel axis the per-channel SQNR needs)."""
    with confined(work_dir):  # its shape inference round-trips the model through a temp folder
        saver = CalibraterBase(str(src))  # loads with shape inference, as qdq_loss_debug does
    model = saver.model
    tensors, value_infos = saver.select_tensors_to_calibrate(model)
    # Q/DQ outputs get value_info entries without an element type, which onnxruntime refuses
    # ("Invalid tensor data type 0") in models of IR version < 4; they say nothing, drop them.
    untyped = [v for v in model.graph.value_info if not v.type.tensor_type.elem_type]
    for value in untyped:
        model.graph.value_info.remove(value)
    present = {o.name for o in model.graph.output}
    return model, {name: value_infos[name] for name in sorted(tensors - present)}


def _session(model: onnx.ModelProto, exposed: list[onnx.ValueInfoProto], threads: int, what: str):
    """A session over ``model`` with ``exposed`` as extra graph outputs (the proto is left as it
    was). Its arena is off: it would keep a second copy of the exposed tensors between runs."""
    outputs = len(model.graph.output)
    model.graph.output.extend(exposed)
    try:
        data = model.SerializeToString()
    finally:
        del model.graph.output[outputs:]
    options = session_options(threads, "disable")
    options.enable_cpu_mem_arena = False
    return open_session(data, options=options, what=what)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
_PAIR_SUFFIXES = (QUANT_INPUT_SUFFIX, qdq_loss_debug._POST_QDQ_POSTFIX1, DEQUANT_OUTPUT_SUFFIX)


def pair_components(names: list[str]) -> list[list[str]]:
    """The quantized model's tensors that qdq_loss_debug.create_activation_matching can pair,
    in sets it only ever pairs within: a name with a Q/DQ suffix joins the name without it (a
    chain of suffixes joins transitively). Names no suffix links are left out (never paired)."""
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    linked = set()
    for name in names:
        suffix = next((s for s in _PAIR_SUFFIXES if name.endswith(s)), None)
        if suffix is not None and name[: -len(suffix)] in parent:
            parent[root(name)] = root(name[: -len(suffix)])
            linked.update((name, name[: -len(suffix)]))
    components: dict[str, list[str]] = {}
    for name in names:
        if name in linked:
            components.setdefault(root(name), []).append(name)
    return list(components.values())


def pack(components: list[list[str]], sizes: dict[str, float], cap_bytes: float) -> list[list[str]]:
    """Consecutive components packed into groups of names holding at most ``cap_bytes`` (a
    component larger than the cap is a group of its own)."""
    groups: list[list[str]] = []
    held = cap_bytes + 1.0
    for component in components:
        size = sum(sizes[n] for n in component)
        if not groups or held + size > cap_bytes:
            groups.append([])
            held = 0.0
        groups[-1].extend(component)
        held += size
    return groups


def _db(signal, noise):
    eps = float(np.finfo(np.float32).eps) ** 2  # qdq_loss_debug clamps both norms at eps
    return 10 * np.log10(np.maximum(signal, eps) / np.maximum(noise, eps))


#: float64 elements converted at once by ``_energy`` (16 MB): a float64 copy of a whole
#: high-resolution tensor would be the largest allocation of the pass.
_ENERGY_BLOCK = 2 * 2**20


def _energy(x: np.ndarray, minus: np.ndarray | None = None) -> np.ndarray:
    """Sum of squares of ``x`` (or of ``x - minus``) per channel (axis 1), or one total for
    tensors without a channel axis; in float64, a block of channels at a time (``_ENERGY_BLOCK``
    elements: one channel at a time in Python made this the slowest part of the pass)."""
    if x.ndim < 2:
        x, minus = x.reshape(1, 1, -1), None if minus is None else minus.reshape(1, 1, -1)
    channels = x.shape[1]
    block = max(1, _ENERGY_BLOCK // max(1, x[:, :1].size))
    sums = np.empty(channels)
    for start in range(0, channels, block):
        stop = min(channels, start + block)
        v = np.moveaxis(x[:, start:stop], 1, 0).astype(np.float64).reshape(stop - start, -1)
        if minus is not None:
            v -= np.moveaxis(minus[:, start:stop], 1, 0).reshape(stop - start, -1)
        sums[start:stop] = np.einsum("ij,ij->i", v, v)
    return sums


def tensor_sqnr(float_path: pathlib.Path, qdq_path: pathlib.Path, work_dir: pathlib.Path,
                feeds: Callable[[], Iterable[Feed]], threads: int,
                group_bytes: float = math.inf) -> dict[str, dict[str, float]]:
    """``{tensor: {"sqnr_db", "channel_sqnr_db", "xmodel_sqnr_db"}}`` over the feeds.

    ``sqnr_db`` is the whole-tensor local SQNR (qdq_loss_debug's ``qdq_err``); ``channel_sqnr_db``
    averages the SQNR of each channel (axis 1) in dB: one outlier channel that sets the
    per-tensor scale carries most of the energy, so the whole-tensor figure stays high while the
    other channels round to zero; the channel average exposes that. ``xmodel_sqnr_db`` compares
    with the float model's tensor (error accumulated up to here).

    Memory: the tensors are split into groups of at most ``group_bytes`` per session run (sized
    by shape inference at the first feed's shapes; ``pack``), and both models run over all feeds
    once per group, returning only that group's tensors. ``feeds()`` gives the same feeds each
    time. A tensor's sums are those of one group, added feed by feed in the same order, so the
    result does not depend on the grouping.
    """
    float_proto = onnx.load(str(float_path))
    intended = folded_activations(float_proto, onnx.load(str(qdq_path)))
    for name, (lo, hi) in dead_zones(float_proto).items():
        folded_lo, folded_hi = intended.get(name, (-math.inf, math.inf))
        intended[name] = (max(lo, folded_lo), min(hi, folded_hi))
    float_model, float_tensors = _exposable(float_path, work_dir)
    qdq_model, qdq_tensors = _exposable(qdq_path, work_dir)
    # the graph outputs are returned by every run; they pair within the group of their partner
    components = pair_components([*qdq_tensors, *(o.name for o in qdq_model.graph.output)])
    groups = [[n for component in components for n in component]]  # one group unless capped
    if math.isfinite(group_bytes):
        first = next(iter(feeds()), None)
        sizes, _ = tensor_bytes(qdq_model, {} if first is None else {k: v.shape for k, v in first.items()})
        largest = max(sizes.values(), default=0)
        # a tensor of both models is returned twice per feed
        held = {n: 0 if n not in qdq_tensors else sizes.get(n, largest) * (2 if n in float_tensors else 1)
                for c in components for n in c}
        groups = pack(components, held, group_bytes)
    # per tensor: [signal, noise] per channel (local), [signal, noise] in total (vs float model)
    sums: dict[str, list] = {}
    for names in groups:
        members = set(names)  # a pair of graph outputs only is counted in its own group
        qdq_sess = _session(qdq_model, [qdq_tensors[n] for n in names if n in qdq_tensors], threads,
                            "the quantized model with its tensors as outputs")
        float_sess = _session(float_model, [float_tensors[n] for n in names if n in float_tensors], threads,
                              "the float model with its tensors as outputs")
        for feed in feeds():
            matched = qdq_loss_debug.create_activation_matching(_outputs(qdq_sess, feed), _outputs(float_sess, feed))
            _accumulate(sums, {k: m for k, m in matched.items() if k in members}, intended)
            del matched  # before the next feed's run, not after it
            _return_freed_memory()
        del float_sess, qdq_sess
    result = {}
    for name, (signal, noise, ref_signal, ref_noise) in sums.items():
        live = signal > 0  # dead channels (always 0) carry no signal to lose
        per_channel = _db(signal[live], noise[live]) if live.any() else np.array([_db(0.0, 0.0)])
        result[name] = {"sqnr_db": round(float(_db(signal.sum(), noise.sum())), 2),
                        "channel_sqnr_db": round(float(per_channel.mean()), 2),
                        "xmodel_sqnr_db": round(float(_db(ref_signal, ref_noise)), 2)}
    return result


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere):
    the tensors of a run are freed in another order than they were allocated, and without
    this the freed gaps between them stay resident, growing feed after feed."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _outputs(sess, feed) -> dict[str, list[np.ndarray]]:
    names = [o.name for o in sess.get_outputs()]
    return {n: [v] for n, v in zip(names, sess.run(names, feed))}


def _accumulate(sums: dict[str, list], matched: dict, intended: dict) -> None:
    """Add one feed's energies of every matched tensor to ``sums`` (``intended``: the clamps that
    are not error, ``{tensor: (lo, hi)}``)."""
    for name, m in matched.items():
        pre, post = m["pre_qdq"][0], m["post_qdq"][0]
        if name in intended:
            pre = np.clip(pre, *intended[name])
        ref = m["float"][0] if "float" in m else pre
        acc = sums.setdefault(name, [0.0, 0.0, 0.0, 0.0])
        acc[0] = acc[0] + _energy(pre)
        acc[1] = acc[1] + _energy(pre, post)
        acc[2] += float(_energy(ref).sum())
        acc[3] += float(_energy(ref, post).sum())


def _dequantized(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """``s (q - z)`` of a DequantizeLinear over initializers, in float64 (integer ``q - z`` in
    the stored type would wrap around for uint8), per channel along ``axis`` (ONNX default 1)."""
    q = onnx.numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
    scale = onnx.numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    zero = (onnx.numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] in inits else np.zeros_like(scale))
    if scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def weight_sqnr(float_path: pathlib.Path, qdq_path: pathlib.Path) -> dict[str, float]:
    """SQNR of each quantized weight against its float values, any rank (scalars included).

    The weights are matched as qdq_loss_debug.create_weight_matching does (``<name>_quantized``
    read by a DequantizeLinear), but dequantized here: onnxruntime's helper subtracts uint8 zero
    points without widening (wrong SQNR for uint8 weights), assumes ``axis`` -1 when the attribute
    is absent, and its SQNR fails on a scalar (a BatchNorm-like scale feeding Mul)."""
    floats = {t.name: t for t in onnx.load(str(float_path)).graph.initializer}
    qdq = onnx.load(str(qdq_path))
    inits = {t.name: t for t in qdq.graph.initializer}
    result = {}
    for node in qdq.graph.node:
        stored = node.input[0] if node.op_type == "DequantizeLinear" else ""
        name = stored[: -len(TENSOR_NAME_QUANT_SUFFIX)]
        if (stored not in inits or not stored.endswith(TENSOR_NAME_QUANT_SUFFIX) or name not in floats
                or inits[stored].data_type == onnx.TensorProto.INT32):
            # Biases (int32 at scale s_x * s_w) are left out: their error follows the input's
            # scale, which the activation entries already rank. Biases added by bias correction
            # have no float original.
            continue
        result[name] = round(_weight_db(onnx.numpy_helper.to_array(floats[name]), _dequantized(node, inits)), 2)
    return result


def _weight_db(x: np.ndarray, x_q: np.ndarray) -> float:
    """``20 log10(|x| / |x - x_q|)`` with both norms clamped at float eps (qdq_loss_debug's
    compute_signal_to_quantization_noice_ratio, for any rank)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    diff = x - np.asarray(x_q, dtype=np.float64).ravel()
    eps = float(np.finfo(float).eps)
    return 20 * float(np.log10(max(float(np.linalg.norm(x)), eps) / max(float(np.linalg.norm(diff)), eps)))


def ranked_tensors(float_path: pathlib.Path, qdq_path: pathlib.Path, work_dir: pathlib.Path,
                   feeds: Callable[[], Iterable[Feed]], threads: int, group_bytes: float = math.inf) -> list[dict]:
    """Every quantized activation and weight as ``{tensor, kind, sqnr_db, ...}``, worst first: by
    the worse of the whole-tensor and the channel-averaged SQNR (see ``tensor_sqnr``)."""
    acts = tensor_sqnr(float_path, qdq_path, work_dir, feeds, threads, group_bytes)
    weights = weight_sqnr(float_path, qdq_path)
    ranked = [{"tensor": k, "kind": "activation", **v} for k, v in acts.items()]
    ranked += [{"tensor": k, "kind": "weight", "sqnr_db": v} for k, v in weights.items()]
    ranked.sort(key=lambda r: min(r["sqnr_db"], r.get("channel_sqnr_db", r["sqnr_db"])))
    return ranked
