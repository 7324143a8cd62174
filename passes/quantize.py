"""Static int8 quantization (QDQ) with streamed calibration and accuracy-aware float fallback.

Every quantized tensor is stored as ``q = clamp(round(x / s) + z, qmin, qmax)`` and read back as
``x' = s (q - z)``. Activations are uint8 with a per-tensor ``(s, z)`` from calibration ranges;
weights are int8, symmetric (``z = 0``) and per output channel (``s_c = max|W_c| / 127``, the
DequantizeLinear node carries ``axis``); biases are int32 with ``s = s_x s_w``. This U8S8
per-channel QDQ layout is the one onnxruntime's CPU graph optimizer fuses into QLinearConv /
QGemm / QLinearAdd kernels (VNNI ``vpdpbusd`` multiplies uint8 by int8). onnxruntime's own
``quantize_static`` default (int8 activations) leaves most Q/DQ pairs unfused and was 0.94-1.2x
fp32 on ResNet-18 here, against 2.6-3.4x for U8S8 per-channel.

Flow: constants lifted to initializers and nodes named (onnx_ir passes), opset raised when the
quantizer needs it, ``quant_pre_process`` (shape inference + onnxruntime basic optimization, which
keeps node names), calibration streamed chunk by chunk (passes.quantize_data), QDQ insertion by
``quantize_static`` reading the ranges from a calibration cache, so fallback trials re-quantize
without re-calibrating, then the int8 weights and int32 biases of every quantized model refined
against float statistics of the calibration data (passes.quantize_refine: GPTQ rounding and
bias correction; the graph and scales stay as onnxruntime made them). With
``max_accuracy_drop`` the quantized model is evaluated; if it misses, activation tensors are
ranked by the output error their quantization adds (passes.quantize_sensitivity; ``fallback_rank:
sqnr`` ranks by local SQNR, passes.quantize_report, instead) and the nodes around the k first go
back to float, k found by doubling then bisection within ``max_trials``. The best model is always
returned; a missed tolerance sets ``context.failure`` (the pipeline saves the model and exits 1).

With ``latency_aware`` (the default) the result is then timed against the float model on this
CPU, and where int8 costs more than it saves (conversions around ops without int8 kernels, small
convolutions) nodes go back to float, chosen by a minimum cut over per-node profiles and confirmed
by interleaved timing (passes.quantize_latency); when no int8 configuration is faster the float
model is returned unchanged. Every trial is in ``details['latency_trials']``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, NameFixPass
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process

from deployopt.core.errors import UserError, WorkFailed
from deployopt.passes import quantize_data as qdata
from deployopt.passes import quantize_latency as qlat
from deployopt.passes import quantize_refine as qrefine
from deployopt.passes import quantize_report as qreport
from deployopt.passes import quantize_sensitivity as qsens
from deployopt.core.settings import setting
from deployopt.passes.base import DeployFunctionalPass, check_choice, check_range

logger = logging.getLogger(__name__)

_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
#: Samples for the per-tensor SQNR and output-sensitivity rankings (report and fallback).
SQNR_SAMPLES = 32
SQNR_BATCH = 4
#: QDQ per-channel weights need DequantizeLinear's ``axis`` (opset 13); below 11 onnxruntime
#: does not fuse Q/DQ at all.
PER_CHANNEL_OPSET = 13
MIN_OPSET = 11
#: The float model as given to quantize_static's pre-processing (in the pass's private folder).
FLOAT_FILE = "float.onnx"


def _vnni(isa: list[str]) -> bool:
    return any(flag in isa for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def auto_reduce_range() -> tuple[bool, str]:
    """``reduce_range`` for this CPU and why (decided once per run, recorded in the report).

    Without VNNI, x86 int8 kernels multiply uint8 by int8 with ``vpmaddubsw``, whose pairwise
    int16 sums saturate when both operands use the full 8 bits; 7-bit weights avoid that.
    """
    from deployopt.measure.machine import stamp  # the project's single reading of /proc/cpuinfo

    arch = platform.machine().lower()
    if arch not in ("x86_64", "amd64", "i386", "i686"):
        return False, f"{arch} CPU: onnxruntime's int8 kernels here do not saturate, full 8-bit weights"
    isa = stamp()["isa"]
    if _vnni(isa):
        return False, "CPU has VNNI (" + ", ".join(f for f in isa if "vnni" in f or "amx" in f) + \
            "): full 8-bit weights"
    return True, ("CPU has no VNNI: uint8 x int8 products can saturate the int16 sums of "
                  "vpmaddubsw, so weights use 7 bits (reduce_range=True); set reduce_range: false "
                  "to override")


@contextlib.contextmanager
def _private_dir(parent: pathlib.Path | None) -> Iterator[pathlib.Path]:
    if parent is not None:
        pathlib.Path(parent).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantize-", dir=parent) as name:
        yield pathlib.Path(name)


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


@dataclasses.dataclass
class QuantizePass(DeployFunctionalPass):
    """Static int8 QDQ quantization, fast on this CPU, with accuracy-aware float fallback."""

    name: ClassVar[str] = "quantize"
    needs_calibration: ClassVar[bool] = True
    # int8 that the CPU does not fuse is slower than float, the most common surprise with int8
    # tools: the step guard is on by default here.
    min_step_speedup: float | None = setting(1.0, low=0, low_open=True)

    calibration: str = "minmax"  # minmax | percentile | entropy | distribution
    percentile: float = 99.999  # for calibration: percentile
    per_channel: bool = True
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    reduce_range: bool | None = None  # None: decided by the CPU (True without VNNI)
    activation_type: str = "uint8"
    weight_type: str = "int8"
    op_types: list[str] | None = None  # None: every op type onnxruntime can quantize
    exclude_nodes: list[str] = dataclasses.field(default_factory=list)  # names or regexes
    samples: int = 256  # calibration samples used (at most)
    batch_size: int = 8
    rounding: str = "gptq"  # gptq (error-compensating, passes.quantize_refine) | nearest (onnxruntime's)
    bias_correction: bool = True  # remove the output-mean shift the int8 weights cause
    refine_samples: int = 64  # calibration samples whose float statistics drive both
    max_accuracy_drop: float | None = None  # None: no evaluation, no fallback
    relative: bool = False  # max_accuracy_drop relative to the float model's score
    fallback_rank: str = "sensitivity"  # sensitivity (output error each tensor adds) | sqnr (local)
    max_trials: int = 8  # quantize+evaluate rounds the fallback may spend, and as many timed latency trials
    latency_aware: bool = True  # time int8 against float here; keep int8 only where it is faster
    latency_min_ms: float = 0.1  # float models faster than this are left to the pipeline's step guard
    latency_budget_s: float = 60.0  # wall time the latency search may spend on new trials
    #: What the latency search measures (onnxruntime in this process); tests put synthetic timings here.
    probe: qlat.LatencyProbe = dataclasses.field(default_factory=qlat.LatencyProbe, init=False,
                                                 repr=False, compare=False)

    def validate(self) -> None:
        check_choice("calibration", self.calibration, tuple(qdata.METHODS))
        check_range("percentile", self.percentile, 0, 100, low_open=True)
        check_choice("rounding", self.rounding, ("gptq", "nearest"))
        check_choice("fallback_rank", self.fallback_rank, ("sensitivity", "sqnr"))
        check_choice("activation_type", self.activation_type, tuple(_TYPES))
        check_choice("weight_type", self.weight_type, ("int8", "uint8"))
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise UserError("weight_type: 'uint8' with activation_type 'int8' is not supported by "
                            "onnxruntime (use int8 weights)")
        for field in ("per_channel", "symmetric_activations", "symmetric_weights", "relative", "latency_aware",
                      "bias_correction"):
            if not isinstance(getattr(self, field), bool):
                raise UserError(f"{field}: expected true or false, got {getattr(self, field)!r}")
        if self.reduce_range is not None and not isinstance(self.reduce_range, bool):
            raise UserError(f"reduce_range: expected true, false or null, got {self.reduce_range!r}")
        for op in self.op_types or []:
            if op not in qreport.QUANTIZABLE:
                raise UserError(f"op_types: {op!r} is not an op type onnxruntime can quantize "
                                f"(one of {', '.join(sorted(qreport.QUANTIZABLE))})")
        if self.op_types is not None and not self.op_types:
            raise UserError("op_types: empty list (omit it to quantize every supported op type)")
        for pattern in self.exclude_nodes:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise UserError(f"exclude_nodes: {pattern!r} is not a node name or regex ({e})") from e
        for field, low, high in (("samples", 1, None), ("batch_size", 1, 4096), ("max_trials", 1, 64),
                                 ("refine_samples", 1, None)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{field}: expected an integer, got {value!r}")
            check_range(field, value, low, high)
        if self.max_accuracy_drop is not None:
            check_range("max_accuracy_drop", self.max_accuracy_drop, 0, 1)
        check_range("latency_min_ms", self.latency_min_ms, 0)
        check_range("latency_budget_s", self.latency_budget_s, 0, low_open=True)

    # -- the pass -------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        start = time.perf_counter()
        ctx = self.context
        proto = ir.to_proto(model)
        found = qreport.already_quantized(proto)
        if found:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(found.items()))
            raise UserError(f"model: already quantized ({ops}); quantize the float model instead")
        inputs = qdata.model_inputs(proto)
        if not inputs:
            raise UserError("model: has no runtime inputs to calibrate")
        # All data checks happen before anything is written.
        n_cal = qdata.scan(ctx.calibration, inputs, "data.calibration", self.samples, self.batch_size)
        if self.max_accuracy_drop is not None:
            if ctx.evaluation is None:
                raise UserError("data.evaluation: max_accuracy_drop needs an evaluation dataset")
            qdata.scan(ctx.evaluation, inputs, "data.evaluation", None, self.batch_size)
        elif self.latency_aware and ctx.evaluation is not None:  # the latency trials' agreement check
            qdata.scan(ctx.evaluation, inputs, "data.evaluation", qlat.AGREEMENT_SAMPLES, self.batch_size)
        reduce_range, why = (self.reduce_range, "set in the recipe") if self.reduce_range is not None \
            else auto_reduce_range()
        if reduce_range and self.reduce_range is None:
            logger.warning("quantize: %s", why)
            self.note(f"warning: {why}")
        ctx.details["reduce_range"] = {"value": reduce_range, "reason": why}
        ctx.details["settings"] = {
            "format": "QDQ", "activations": self.activation_type, "weights": self.weight_type,
            "per_channel": self.per_channel, "symmetric_activations": self.symmetric_activations,
            "symmetric_weights": self.symmetric_weights, "reduce_range": reduce_range}

        timings = ctx.details.setdefault("timings_s", {})

        def timed(step: str, fn, *args):
            t0 = time.perf_counter()
            out = fn(*args)
            timings[step] = round(timings.get(step, 0.0) + time.perf_counter() - t0, 3)
            return out

        with _private_dir(ctx.work_dir) as tmp:
            pre_path = timed("preprocess", self._prepare, proto, tmp)
            pre_proto = onnx.load(str(pre_path))
            inputs = qdata.model_inputs(pre_proto)
            excluded = self._resolve_excludes(pre_proto)
            cache = timed("calibration", self._calibrate, pre_path, inputs, tmp, n_cal)

            refiner = self._refiner(pre_path, inputs, reduce_range)
            refinements: dict[pathlib.Path, dict] = {}

            def quantize(fallback: list[str], path: pathlib.Path) -> pathlib.Path:
                timed("quantize", self._quantize, pre_path, path, cache, [*excluded, *fallback], reduce_range)
                if refiner is not None:
                    refinements[path] = timed("refine", refiner, path)
                return path

            best = quantize([], tmp / "trial0.onnx")
            sqnr = timed("sqnr", self._sqnr, pre_path, best, inputs, tmp)
            fallback: dict[str, str] = {}
            scorer = self._scorer(pre_path, inputs) if self.max_accuracy_drop is not None else None
            if scorer is not None:
                trial0 = best
                best, fallback = timed("fallback", self._fallback, pre_proto, best,
                                       lambda: self._fallback_order(sqnr, pre_path, trial0, inputs), tmp,
                                       quantize, excluded, scorer)
            ctx.details["ort_optimized"] = timed("ort_kernels", qreport.ort_kernels, best, tmp, ctx.threads)
            latency: dict[str, str] = {}
            if self.latency_aware and ctx.failure is not None:
                self.note("latency-aware: not run, the accuracy tolerance is not met")
            elif self.latency_aware:
                best, latency = timed("latency", self._latency, pre_path, pre_proto, best, inputs, tmp,
                                      quantize, list(fallback), scorer)
            if best is None:  # no int8 configuration was faster: the float model, unchanged
                self._summarize(time.perf_counter() - start)
                return ir.passes.PassResult(ir.from_proto(proto), False)
            best_proto = onnx.load(str(best))
            if best in refinements:  # the refinement of the model returned
                ctx.details["refinement"] = refinements[best]
            reasons = {**{n: "excluded by exclude_nodes" for n in excluded}, **fallback, **latency}
            ctx.details.update(qreport.node_accounting(
                pre_proto, best_proto, op_types=self._op_types(), excluded=reasons))
            if latency:
                ctx.details["ort_optimized"] = timed("ort_kernels", qreport.ort_kernels, best, tmp, ctx.threads)
            result = ir.from_proto(best_proto)
        self._summarize(time.perf_counter() - start)
        return ir.passes.PassResult(result, True)

    # -- steps ----------------------------------------------------------------------------------
    def _op_types(self) -> list[str]:
        return list(self.op_types) if self.op_types else sorted(qreport.QUANTIZABLE)

    def _prepare(self, proto: onnx.ModelProto, tmp: pathlib.Path) -> pathlib.Path:
        """Lift Constant weights, name nodes, raise the opset if needed, then quant_pre_process."""
        work = ir.from_proto(proto)
        constants = sum(1 for n in work.graph if n.op_type == "Constant")
        LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(work)
        NameFixPass()(work)
        lifted = constants - sum(1 for n in work.graph if n.op_type == "Constant")
        if lifted:
            self.note(f"{lifted} Constant nodes lifted to initializers (their weights can be quantized)")
        self.context.details["constants_lifted"] = lifted
        proto = ir.to_proto(work)
        opset = _opset(proto)
        target = PER_CHANNEL_OPSET if self.per_channel else MIN_OPSET
        if opset < target:
            try:
                proto = onnx.version_converter.convert_version(proto, target)
            except Exception as e:
                raise UserError(f"model: opset {opset} cannot be upgraded to {target} for "
                                f"quantization: {' '.join(str(e).split())[:200]}") from e
            need = "per-channel QDQ weights need DequantizeLinear axis" if self.per_channel \
                else "onnxruntime fuses Q/DQ only from opset 11"
            self.note(f"opset upgraded from {opset} to {target} ({need})")
        self.context.details["opset"] = {"input": opset, "quantized": max(opset, target)}
        src, pre = tmp / FLOAT_FILE, tmp / "preprocessed.onnx"
        onnx.save(proto, str(src))
        try:
            quant_pre_process(str(src), str(pre))
            self.context.details["preprocess"] = "symbolic + onnx shape inference, onnxruntime basic optimization"
        except Exception as e:  # symbolic shape inference does not know every op
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            self.note(f"symbolic shape inference skipped ({type(e).__name__}); onnx shape inference used")
            self.context.details["preprocess"] = "onnx shape inference, onnxruntime basic optimization"
        pre_proto = onnx.load(str(pre))
        if any(not n.name for n in pre_proto.graph.node):
            # Inlined function bodies (HardSwish -> HardSigmoid, Mul) come out unnamed; nodes_to_exclude
            # and the per-node profile need names.
            work = ir.from_proto(pre_proto)
            NameFixPass()(work)
            onnx.save(ir.to_proto(work), str(pre))
        return pre

    def _resolve_excludes(self, pre_proto: onnx.ModelProto) -> list[str]:
        names = [n.name for n in pre_proto.graph.node]
        chosen: list[str] = []
        for pattern in self.exclude_nodes:
            hits = [n for n in names if n == pattern or re.fullmatch(pattern, n)]
            if not hits:
                self.note(f"exclude_nodes: {pattern!r} matched no node of the pre-processed model")
            chosen += [h for h in hits if h not in chosen]
        return chosen

    def _calibrate(self, pre_path: pathlib.Path, inputs, tmp: pathlib.Path, n_cal: int) -> pathlib.Path:
        ctx = self.context
        start = time.perf_counter()
        stream = qdata.feeds(ctx.calibration, inputs, self.samples, self.batch_size)
        with qdata.RssSampler() as rss:
            ranges = qdata.calibrate(pre_path, tmp, method=self.calibration, percentile=self.percentile,
                                     op_types=self._op_types(), chunks=qdata.chunked(stream, self.batch_size),
                                     threads=ctx.threads)
        clamped = qdata.clamp_to_activations(ranges, qreport.activation_bounds(onnx.load(str(pre_path))))
        if clamped:
            self.note(f"{clamped} calibration ranges of Relu/Clip outputs clamped to the activation's "
                      "bounds (onnxruntime folds those activations into the range)")
        if self.calibration == "distribution":
            self.note("distribution calibration gives symmetric ranges (it is designed for float8): "
                      "uint8 tensors that are never negative lose about one bit")
        cache = tmp / "ranges.json"
        save_tensors_data(ranges, cache)
        seconds = time.perf_counter() - start
        ctx.details["calibration"] = {
            "method": self.calibration, "samples": n_cal, "dataset": ctx.calibration.name,
            "chunk_samples": self.batch_size, "tensors": len(ranges.data),
            "seconds": round(seconds, 3),
            # highest RSS sampled during calibration, and the process's peak so far
            "rss_peak_during_mb": None if rss.peak_mb is None else round(rss.peak_mb, 1),
            "process_peak_rss_mb": round(qdata.peak_rss_mb(), 1)}
        if self.calibration == "percentile":
            ctx.details["calibration"]["percentile"] = self.percentile
        self.note(f"calibrated {len(ranges.data)} tensors with {self.calibration} on {n_cal} samples "
                  f"of '{ctx.calibration.name}' in {seconds:.1f} s")
        return cache

    def _quantize(self, pre_path: pathlib.Path, out: pathlib.Path, cache: pathlib.Path,
                  exclude: list[str], reduce_range: bool) -> None:
        try:
            quantize_static(
                str(pre_path), str(out), calibration_data_reader=None, calibration_cache_path=str(cache),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=self._op_types(),
                per_channel=self.per_channel, reduce_range=reduce_range,
                activation_type=_TYPES[self.activation_type], weight_type=_TYPES[self.weight_type],
                nodes_to_exclude=exclude, calibrate_method=qdata.METHODS[self.calibration],
                extra_options={"ActivationSymmetric": self.symmetric_activations,
                               "WeightSymmetric": self.symmetric_weights})
        except Exception as e:
            raise WorkFailed(f"onnxruntime quantize_static failed: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]}") from e

    def _refiner(self, pre_path: pathlib.Path, inputs, reduce_range: bool) -> qrefine.Refiner | None:
        if self.rounding == "nearest" and not self.bias_correction:
            return None
        return qrefine.Refiner(
            pre_path, self.context.calibration, inputs, samples=min(self.refine_samples, self.samples),
            batch_size=self.batch_size, threads=self.context.threads, rounding=self.rounding,
            bias_correction=self.bias_correction, damp=qrefine.DAMP, reduce_range=reduce_range,
            symmetric=self.symmetric_weights)

    def _sample_feeds(self, inputs) -> Iterator[dict[str, np.ndarray]]:
        """Up to SQNR_SAMPLES samples of data.evaluation (else data.calibration), small batches."""
        data = self.context.evaluation if self.context.evaluation is not None else self.context.calibration
        # Small batches: both augmented models return every intermediate tensor of the batch.
        for feed, _ in qdata.feeds(data, inputs, SQNR_SAMPLES, min(self.batch_size, SQNR_BATCH)):
            yield feed

    def _sqnr(self, pre_path: pathlib.Path, qdq_path: pathlib.Path, inputs, tmp: pathlib.Path) -> list[dict]:
        """All quantized tensors ranked worst first; the ten worst go into the report."""
        threads = self.context.threads
        acts = qreport.tensor_sqnr(pre_path, qdq_path, tmp, self._sample_feeds(inputs), threads)
        weights = qreport.weight_sqnr(pre_path, qdq_path)
        ranked = [{"tensor": k, "kind": "activation", **v} for k, v in acts.items()]
        ranked += [{"tensor": k, "kind": "weight", "sqnr_db": v} for k, v in weights.items()]
        # Rank by the worse of the whole-tensor and the channel-averaged SQNR (see tensor_sqnr).
        ranked.sort(key=lambda r: min(r["sqnr_db"], r.get("channel_sqnr_db", r["sqnr_db"])))
        self.context.details["worst_sqnr"] = ranked[:10]
        return ranked

    def _fallback_order(self, ranked: list[dict], pre_path: pathlib.Path, trial0: pathlib.Path,
                        inputs) -> list[dict]:
        """The fallback's order: with ``fallback_rank: sensitivity``, activation tensors whose
        quantization adds output error, most first (passes.quantize_sensitivity), then the rest
        in SQNR order; with ``sqnr``, worst SQNR first."""
        if self.fallback_rank == "sqnr":
            return ranked
        feeds = list(self._sample_feeds(inputs))
        t0 = time.perf_counter()
        sensitivity = qsens.tensor_sensitivity(pre_path, trial0, feeds, self.context.threads)
        total = sum(v for v in sensitivity.values() if v > 0) or 1.0
        top = sorted((t for t, v in sensitivity.items() if v > 0), key=lambda t: -sensitivity[t])
        self.context.details["sensitivity"] = {
            "samples": sum(len(next(iter(f.values()))) for f in feeds), "tensors": len(sensitivity),
            "seconds": round(time.perf_counter() - t0, 2),
            "top": [{"tensor": t, "output_error_removed": float(f"{sensitivity[t]:.4g}"),
                     "share": round(sensitivity[t] / total, 4)} for t in top[:10]]}
        by_tensor = {r["tensor"]: r for r in ranked}
        first = [{**by_tensor.get(t, {"tensor": t, "kind": "activation"}), "sensitivity": sensitivity[t]}
                 for t in top]
        placed = set(top)
        return first + [r for r in ranked if r["tensor"] not in placed]

    def _scorer(self, pre_path: pathlib.Path, inputs
                ) -> tuple[str, float, Callable[[pathlib.Path], tuple[float, float]]]:
        """(metric, float model's score, score(path) -> (value, drop)) on data.evaluation: top-1
        with labels, else top-1 agreement with the float model; drop relative when ``relative``."""
        ctx = self.context
        reference, labels = qdata.predict(qdata.session(pre_path, ctx.threads),
                                          qdata.feeds(ctx.evaluation, inputs, None, self.batch_size))
        metric = "top1" if labels is not None else "agreement"
        base = float(np.mean(reference == labels)) if labels is not None else 1.0

        def score(path: pathlib.Path) -> tuple[float, float]:
            preds, _ = qdata.predict(qdata.session(path, ctx.threads),
                                     qdata.feeds(ctx.evaluation, inputs, None, self.batch_size))
            value = float(np.mean(preds == (labels if labels is not None else reference)))
            drop = base - value
            return value, (drop / base if self.relative and base > 0 else drop)

        return metric, base, score

    def _fallback(self, pre_proto, trial0: pathlib.Path, ranked: Callable[[], list[dict]], tmp: pathlib.Path,
                  quantize: Callable[[list[str], pathlib.Path], pathlib.Path], user_excluded: list[str],
                  scorer):
        """Meet max_accuracy_drop by returning the nodes around the first tensors of ``ranked()``
        (most damaging first) to float."""
        ctx = self.context
        tol = float(self.max_accuracy_drop)
        metric, base, score = scorer

        units: list[tuple[dict, list[str]]] = []
        trials: list[dict] = []
        paths: dict[int, pathlib.Path] = {}

        def run(k: int) -> bool:
            t0 = time.perf_counter()
            nodes = [n for _, unit in units[:k] for n in unit]
            path = trial0 if k == 0 else quantize(nodes, tmp / f"trial{len(trials)}.onnx")
            value, drop = score(path)
            paths[k] = path
            trials.append({"trial": len(trials), "float_nodes": len(nodes), "tensors": k,
                           metric: round(value, 5), "drop": round(drop, 5), "met": drop <= tol + 1e-12,
                           "seconds": round(time.perf_counter() - t0, 2)})
            return trials[-1]["met"]

        lo, hi = -1, None  # lo: largest k known to fail; hi: smallest k known to meet
        if run(0):
            hi = 0
        else:
            lo = 0
            # Cumulative node sets: unit k = nodes that carry a Q/DQ pair on the k-th tensor of
            # the ranking (ranked only now: the sensitivity ranking costs a pass per tensor).
            seen = set(user_excluded)
            for entry in ranked():
                nodes = [n for n in qreport.tensor_nodes(pre_proto, entry["tensor"]) if n not in seen]
                if nodes:
                    seen.update(nodes)
                    units.append((entry, nodes))
            k = 1
            while units and len(trials) < self.max_trials:
                if run(k):
                    hi = k
                    break
                lo = k
                if k >= len(units):
                    break
                k = min(len(units), 2 * k)
        while hi is not None and hi - lo > 1 and len(trials) < self.max_trials:
            mid = (lo + hi) // 2
            if run(mid):
                hi = mid
            else:
                lo = mid
        by_k = {t["tensors"]: t for t in trials}
        chosen = hi if hi is not None else min(by_k, key=lambda kk: (by_k[kk]["drop"], kk))
        nodes = [n for _, unit in units[:chosen] for n in unit]
        reasons = {}
        for entry, unit in units[:chosen]:
            for n in unit:
                reasons[n] = (f"fallback: tensor '{entry['tensor']}' output sensitivity {entry['sensitivity']:.3g}"
                              if "sensitivity" in entry else
                              f"fallback: tensor '{entry['tensor']}' SQNR {entry.get('sqnr_db')} dB")
        best = by_k[chosen]
        ctx.details["fallback"] = {
            "max_accuracy_drop": tol, "relative": self.relative, "metric": metric,
            "evaluation": ctx.evaluation.name, "float_" + metric: round(base, 5),
            "trials": trials, "chosen_trial": best["trial"], "met": best["met"],
            "nodes_to_float": nodes}
        if best["met"]:
            if chosen:
                how = "most output-sensitive" if self.fallback_rank == "sensitivity" else "worst-SQNR"
                self.note(f"fallback: {len(nodes)} nodes returned to float around the {chosen} {how} "
                          f"tensors; drop {best['drop']:.4f} <= {tol} after {len(trials)} trials")
        else:
            ctx.failure = (f"quantize: max_accuracy_drop not met after {len(trials)} trials: best drop "
                           f"{best['drop']:.4f} > {tol} ({len(nodes)} nodes in float)")
            self.note(ctx.failure)
        return paths[chosen], reasons

    def _latency(self, pre_path: pathlib.Path, pre_proto: onnx.ModelProto, best: pathlib.Path, inputs,
                 tmp: pathlib.Path, quantize: Callable[[list[str], pathlib.Path], pathlib.Path],
                 fallback: list[str], scorer) -> tuple[pathlib.Path | None, dict[str, str]]:
        """Time ``best`` against the float model and search for a faster int8 configuration
        (passes.quantize_latency). Returns the chosen model (None: the float model) and the nodes
        it returned to float for latency, with the reason."""
        ctx = self.context
        best_proto = onnx.load(str(best))
        capable = qreport.int8_nodes(pre_proto, best_proto, op_types=self._op_types())
        fixed = max((s.fixed_batch or 1) for s in inputs)
        feed = next(qdata.feeds(ctx.calibration, inputs, fixed, fixed))[0]  # one sample (or one fixed batch)
        # The float reference is the model as given (constants lifted, opset raised), not the
        # pre-processed one: onnxruntime's pre-processing inlines HardSwish into HardSigmoid + Mul,
        # which the float runtime would otherwise fuse into the convolution before it.
        outcome = qlat.search(
            float_path=tmp / FLOAT_FILE, trial0=best, pre_proto=pre_proto, qdq0_proto=best_proto, capable=capable,
            feeds=feed, threads=ctx.threads, probe=self.probe,
            quantize=lambda nodes, path: quantize([*fallback, *nodes], path),
            check=self._latency_check(pre_path, inputs, best, scorer),
            internal_unfused=qlat.internal_unfused(ctx.details["ort_optimized"], best_proto),
            max_trials=self.max_trials, budget_s=self.latency_budget_s, min_ms=self.latency_min_ms, tmp=tmp)
        ctx.details["latency_aware"] = outcome.summary
        ctx.details["latency_trials"] = outcome.trials
        self.note(outcome.note)
        if outcome.path is None:
            ctx.details["first_quantization_ort_optimized"] = ctx.details.pop("ort_optimized")
            return None, {}
        chosen = outcome.summary["chosen_trial"]
        return outcome.path, {n: f"latency: int8 was slower here (latency trial {chosen})" for n in outcome.excluded}

    def _latency_check(self, pre_path: pathlib.Path, inputs, first: pathlib.Path, scorer):
        """The accuracy rule of a latency trial: max_accuracy_drop when set (same scoring as the
        fallback), else top-1 agreement with the float model at most AGREEMENT_SLACK below the
        first quantization's, on up to AGREEMENT_SAMPLES samples of data.evaluation (else
        data.calibration)."""
        ctx = self.context
        if scorer is not None:
            metric, _, score = scorer
            tol = float(self.max_accuracy_drop)

            def check(path: pathlib.Path) -> dict:
                value, drop = score(path)
                return {metric: round(value, 5), "drop": round(drop, 5), "met": drop <= tol + 1e-12}
            return check

        data = ctx.evaluation if ctx.evaluation is not None else ctx.calibration

        def top1(path: pathlib.Path) -> np.ndarray:
            stream = qdata.feeds(data, inputs, qlat.AGREEMENT_SAMPLES, self.batch_size)
            return qlat.top1(qdata.session(path, ctx.threads), (feed for feed, _ in stream))

        reference = top1(pre_path)
        floor: list[float] = []

        def check(path: pathlib.Path) -> dict:
            value = qlat.agreement(reference, top1(path))
            if path == first:
                floor.append(value - qlat.AGREEMENT_SLACK)
            return {"agreement": round(value, 5), "data": data.name,
                    "met": bool(value >= floor[0] - 1e-12)}
        return check

    def _summarize(self, seconds: float) -> None:
        d = self.context.details
        d["seconds"] = round(seconds, 3)
        d["peak_rss_mb"] = round(qdata.peak_rss_mb(), 1)
        if "ort_optimized" not in d:  # the float model was returned; the latency note says why
            return
        ort_opt = d["ort_optimized"]
        self.note(f"{sum(d['int8_ops'].values())} nodes int8, {sum(d['float_ops'].values())} float; "
                  f"onnxruntime fused {ort_opt['fused_int8_total']} int8 kernels, "
                  f"{ort_opt['unfused_quantize_linear']} QuantizeLinear / "
                  f"{ort_opt['unfused_dequantize_linear']} DequantizeLinear left unfused")
        r = d.get("refinement")
        if r and r.get("layers_gptq", 0) + r.get("biases_corrected", 0):
            self.note(f"weights refined on {r['samples']} calibration samples: {r['layers_gptq']} layers "
                      f"rounded by GPTQ ({r['layers_nearest']} to nearest), {r['biases_corrected']} biases "
                      f"corrected; GPTQ layers' output error from int8 weights "
                      f"{r['weight_output_error_reduction_db']:.1f} dB below round-to-nearest (mean)")
        for entry in d["float_nodes"][:20]:
            self.note(f"float: {entry['node']} ({entry['op_type']}): {entry['reason']}")
        if len(d["float_nodes"]) > 20:
            self.note(f"float: ... {len(d['float_nodes']) - 20} more in details.float_nodes")
