"""Signal-to-quantization-noise ratio of every quantized tensor, for the report and the ``sqnr``
fallback ranking.

``SQNR = 10 log10(sum x^2 / sum (x - x_q)^2)`` dB, where ``x`` is the tensor before its Q/DQ pair
and ``x_q`` after it (local error, qdq_loss_debug's ``qdq_err``), plus the same against the float
model's tensor (accumulated error, ``xmodel_err``). Same formula and tensor matching as
onnxruntime.quantization.qdq_loss_debug, but the sums are accumulated batch by batch instead of
keeping every activation of every sample (qdq_loss_debug.collect_activations does).
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib
from collections.abc import Iterator

import numpy as np
import onnx
from onnxruntime.quantization import qdq_loss_debug
from onnxruntime.quantization.calibrate import CalibraterBase
from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX

from deployopt.core.session import open_session
from deployopt.passes.quantize.data import Feed
from deployopt.passes.quantize.report import folded_activations


def _augment(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Expose every float tensor onnxruntime would calibrate as a graph output, keeping its shape
    (qdq_loss_debug.modify_model_output_intermediate_tensors flattens them, which loses the
    channel axis the per-channel SQNR needs)."""
    saver = CalibraterBase(str(src))  # loads with shape inference, as qdq_loss_debug does
    model = saver.model
    tensors, value_infos = saver.select_tensors_to_calibrate(model)
    present = {o.name for o in model.graph.output}
    for name in sorted(tensors - present):
        model.graph.output.append(value_infos[name])
    onnx.save(model, str(dst))


def _outputs(sess, feed) -> dict[str, list[np.ndarray]]:
    names = [o.name for o in sess.get_outputs()]
    return {n: [v] for n, v in zip(names, sess.run(names, feed))}


def _db(signal, noise):
    eps = float(np.finfo(np.float32).eps) ** 2  # qdq_loss_debug clamps both norms at eps
    return 10 * np.log10(np.maximum(signal, eps) / np.maximum(noise, eps))


def _energy(x: np.ndarray) -> np.ndarray:
    """Sum of squares per channel (axis 1), or one total for tensors without a channel axis."""
    x = x.astype(np.float64) ** 2
    return x.sum(axis=tuple(i for i in range(x.ndim) if i != 1)) if x.ndim >= 2 else np.array([x.sum()])


def tensor_sqnr(float_path: pathlib.Path, qdq_path: pathlib.Path, work_dir: pathlib.Path,
                feeds: Iterator[Feed], threads: int) -> dict[str, dict[str, float]]:
    """``{tensor: {"sqnr_db", "channel_sqnr_db", "xmodel_sqnr_db"}}`` over the feeds.

    ``sqnr_db`` is the whole-tensor local SQNR (qdq_loss_debug's ``qdq_err``); ``channel_sqnr_db``
    averages the SQNR of each channel (axis 1) in dB: one outlier channel that sets the
    per-tensor scale carries most of the energy, so the whole-tensor figure stays high while the
    other channels round to zero; the channel average exposes that. ``xmodel_sqnr_db`` compares
    with the float model's tensor (error accumulated up to here).
    """
    folded = folded_activations(onnx.load(str(float_path)), onnx.load(str(qdq_path)))
    float_aug, qdq_aug = work_dir / "sqnr_float.onnx", work_dir / "sqnr_qdq.onnx"
    _augment(float_path, float_aug)
    _augment(qdq_path, qdq_aug)
    float_sess = open_session(float_aug, threads=threads, optimization_level="disable",
                              what="the float model with its tensors as outputs")
    qdq_sess = open_session(qdq_aug, threads=threads, optimization_level="disable",
                            what="the quantized model with its tensors as outputs")
    # per tensor: [signal, noise] per channel (local), [signal, noise] in total (vs float model)
    sums: dict[str, list] = {}
    for feed in feeds:
        matched = qdq_loss_debug.create_activation_matching(_outputs(qdq_sess, feed), _outputs(float_sess, feed))
        for name, m in matched.items():
            pre, post = m["pre_qdq"][0], m["post_qdq"][0]
            if name in folded:
                pre = np.clip(pre, *folded[name])
            ref = m["float"][0] if "float" in m else pre
            acc = sums.setdefault(name, [0.0, 0.0, 0.0, 0.0])
            acc[0] = acc[0] + _energy(pre)
            acc[1] = acc[1] + _energy(pre.astype(np.float64) - post)
            acc[2] += float(np.sum(ref.astype(np.float64) ** 2))
            acc[3] += float(np.sum((ref.astype(np.float64) - post) ** 2))
    del float_sess, qdq_sess
    float_aug.unlink()
    qdq_aug.unlink()
    result = {}
    for name, (signal, noise, ref_signal, ref_noise) in sums.items():
        live = signal > 0  # dead channels (always 0) carry no signal to lose
        per_channel = _db(signal[live], noise[live]) if live.any() else np.array([_db(0.0, 0.0)])
        result[name] = {"sqnr_db": round(float(_db(signal.sum(), noise.sum())), 2),
                        "channel_sqnr_db": round(float(per_channel.mean()), 2),
                        "xmodel_sqnr_db": round(float(_db(ref_signal, ref_noise)), 2)}
    return result


@contextlib.contextmanager
def _drop_log_records(marker: str):
    """Drop root-logger records whose message contains ``marker`` (others pass)."""
    def keep(record: logging.LogRecord) -> bool:
        return marker not in record.getMessage()
    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def weight_sqnr(float_path: pathlib.Path, qdq_path: pathlib.Path) -> dict[str, float]:
    """SQNR of each quantized weight against its float values (qdq_loss_debug's own helpers)."""
    with contextlib.redirect_stdout(io.StringIO()), _drop_log_records("_bias_correction"):
        # Biases added by bias correction (refine.py) have no float original, which
        # create_weight_matching logs as an error for each.
        matched = qdq_loss_debug.create_weight_matching(str(float_path), str(qdq_path))
    qdq = onnx.load(str(qdq_path), load_external_data=False)
    int32 = {t.name for t in qdq.graph.initializer if t.data_type == onnx.TensorProto.INT32}
    # Biases (int32 at scale s_x * s_w) are left out: their error follows the input's scale, which
    # the activation entries already rank.
    matched = {k: v for k, v in matched.items() if k + TENSOR_NAME_QUANT_SUFFIX not in int32}
    return {k: round(v, 2) for k, v in qdq_loss_debug.compute_weight_error(matched).items()}


def ranked_tensors(float_path: pathlib.Path, qdq_path: pathlib.Path, work_dir: pathlib.Path,
                   feeds: Iterator[Feed], threads: int) -> list[dict]:
    """Every quantized activation and weight as ``{tensor, kind, sqnr_db, ...}``, worst first: by
    the worse of the whole-tensor and the channel-averaged SQNR (see ``tensor_sqnr``)."""
    acts = tensor_sqnr(float_path, qdq_path, work_dir, feeds, threads)
    weights = weight_sqnr(float_path, qdq_path)
    ranked = [{"tensor": k, "kind": "activation", **v} for k, v in acts.items()]
    ranked += [{"tensor": k, "kind": "weight", "sqnr_db": v} for k, v in weights.items()]
    ranked.sort(key=lambda r: min(r["sqnr_db"], r.get("channel_sqnr_db", r["sqnr_db"])))
    return ranked
