"""Static int8 quantization (QDQ) with streamed calibration, weight refinement, accuracy-aware
float fallback and latency-aware placement.

Every quantized tensor is stored as ``q = clamp(round(x / s) + z, qmin, qmax)`` and read back as
``x' = s (q - z)``. Activations are uint8 with a per-tensor ``(s, z)`` from calibration ranges;
weights are int8, symmetric (``z = 0``) and per output channel (``s_c = max|W_c| / 127``, the
DequantizeLinear node carries ``axis``); biases are int32 with ``s = s_x s_w``. This U8S8
per-channel QDQ layout is the one onnxruntime's CPU graph optimizer fuses into QLinearConv /
QGemm / QLinearAdd kernels (VNNI ``vpdpbusd`` multiplies uint8 by int8); onnxruntime's own
``quantize_static`` default (int8 activations) leaves most Q/DQ pairs unfused.

Flow of ``call``:

1. checks: the model is float and has runtime inputs; every dataset batch fits them (before
   anything is written); the run's peak memory, estimated from the model's activation sizes,
   against ``max_memory_mb`` (memory.py: refused when it cannot fit); ``reduce_range`` for this
   CPU (cpu.py: 7-bit weights without VNNI, except depthwise Conv weights, whose kernel sums in
   int32).
2. ``prepare``: constants lifted, nodes named, opset raised, ``quant_pre_process`` (prepare.py);
   with ``equalize``, the channels of each depthwise convolution's input scaled to one range and
   the depthwise weights scaled back (equalize.py); accuracy is still judged against the model
   before that.
3. calibration streamed chunk by chunk into a range cache (calibration.py), each range cut to
   what its readers can tell apart (dead_zones.py: below -3 before a hardswish); with
   ``calibration: mse`` each activation's range is the clipping with the least
   quantize-dequantize error on its calibration histogram (ranges.py); with ``calibration: auto``
   minmax, mse and entropy are calibrated in one pass over the data, each goes through step 4,
   and the int8 model with the highest output SQNR against the float model on calibration
   samples is kept (calibration_choice.py); with
   ``tune_ranges`` the chosen ranges are then rescaled one tensor at a time by that output error
   (range_tuning.py).
4. the first quantization, by ``quantize_static`` reading that cache, its int8 weights and int32
   biases refined against float statistics of the calibration data (quantizer.py, refine.py;
   ``rounding: adaround`` learns the rounding per layer, rounding.py).
5. per-tensor SQNR for the report (sqnr.py).
6. with ``max_accuracy_drop``: the model is scored on data.evaluation by the task metrics
   (accuracy.py: the largest drop of any metric against the float model) and, if it misses, the
   nodes around the most damaging tensors go back to float (fallback.py, ranked by
   sensitivity.py or sqnr.py). A missed tolerance is a failure; the best model is still returned.
7. with ``latency_aware``: the result is timed against the float model on this CPU, and where
   int8 costs more than it saves nodes go back to float, chosen by a minimum cut over per-node
   profiles and confirmed by timing (latency_search.py); when no int8 configuration is faster
   the float model is returned unchanged.
8. the node accounting of the model returned: which nodes run int8, which stayed float and why
   (report.py), and the kernels onnxruntime runs (kernels.py).

Activations are never 16-bit, measured on EfficientNet-Lite0 (benchmarks/results/activations16.md):
onnxruntime's CPU EP has no 16-bit kernels, so a uint16 tensor's readers run in float between
Q/DQ, as slow as the float fallback and less exact; OpenVINO runs the same graph fast but
computes wrong outputs (agreement with fp32 0.5%).

The SQNR ranking and the kernel count are diagnostics: when one cannot be computed on a graph its
report section reads ``{"skipped": reason}``, a note says why, and the model returned is the same
(the fallback then ranks by output sensitivity; the latency search assumes unfused Q/DQ).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import re
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import ClassVar, Literal

import onnx
import onnx_ir as ir
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.calibrate import TensorsData, load_tensors_data, save_tensors_data
from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

from deployopt.core.contain import Skipped, best_effort
from deployopt.core.errors import UserError, WorkFailed
from deployopt.core.settings import setting
from deployopt.measure.judge import noise_floor_note
from deployopt.measure.memory import RssSampler, peak_rss_mb
from deployopt.passes.base import DeployFunctionalPass
from deployopt.passes.quantize import fallback, latency_search, memory, range_tuning
from deployopt.passes.quantize.accuracy import AGREEMENT_SAMPLES, AgreementCheck, Scorer
from deployopt.passes.quantize.calibration import (METHODS, Activations, calibrate, chunked,
                                                   clamp_ranges, histogram_method)
from deployopt.passes.quantize.calibration_choice import AUTO_METHODS, best_method, output_sqnr_db
from deployopt.passes.quantize.cpu import auto_reduce_range, full_range_weights
from deployopt.passes.quantize.dead_zones import dead_zones
from deployopt.passes.quantize.equalize import equalize
from deployopt.passes.quantize.data import Feed, InputSpec, feeds, model_inputs, samples_in, scan
from deployopt.passes.quantize.kernels import internal_unfused, ort_kernels
from deployopt.passes.quantize.latency_probe import LatencyProbe
from deployopt.passes.quantize.output_error import OutputError, sqnr_db
from deployopt.passes.quantize.prepare import MIN_OPSET, PER_CHANNEL_OPSET, Prepared, matching_nodes, prepare
from deployopt.passes.quantize.quantizer import QUANT_TYPES, Quantizer
from deployopt.passes.quantize.refine import DAMP, MAX_COLUMNS, Refiner, Rounding
from deployopt.passes.quantize.report import (QUANTIZABLE, activation_bounds, already_quantized, int8_nodes,
                                              node_accounting)
from deployopt.passes.quantize.sensitivity import most_sensitive, tensor_sensitivity
from deployopt.passes.quantize.sqnr import ranked_tensors
from deployopt.passes.quantize.step_times import StepTimes

logger = logging.getLogger(__name__)

#: Samples for the per-tensor SQNR and output-sensitivity rankings (report and fallback).
SQNR_SAMPLES = 32
SQNR_BATCH = 4


@dataclasses.dataclass
class QuantizePass(DeployFunctionalPass):
    """Static int8 QDQ quantization, fast on this CPU, with accuracy-aware float fallback."""

    name: ClassVar[str] = "quantize"
    needs_calibration: ClassVar[bool] = True

    @property
    def min_opset(self) -> int:  # the pipeline upgrades older models before this pass
        return PER_CHANNEL_OPSET if self.per_channel else MIN_OPSET

    # int8 that the CPU does not fuse is slower than float, the most common surprise with int8
    # tools: the step guard is on by default here.
    min_step_speedup: float | None = setting(1.0, low=0, low_open=True)

    # mse: per-tensor clipping range with the least quantize-dequantize error (ranges.py); auto:
    # minmax, mse and entropy each make the int8 model, the one closest to float is kept
    # (calibration_choice.py)
    calibration: Literal["minmax", "percentile", "entropy", "distribution", "mse", "auto"] = "minmax"
    percentile: float = setting(99.999, low=0, high=100, low_open=True)  # for calibration: percentile
    per_channel: bool = True
    # scale the channels of each depthwise convolution's input to one range before calibration
    # (equalize.py; per-channel weights only): off by default, it clips small channels at their
    # calibrated maximum
    equalize: bool = False
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    reduce_range: bool | None = None  # None: decided by the CPU (True without VNNI)
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    # None: every op type onnxruntime can quantize
    op_types: list[str] | None = setting(None, choices=sorted(QUANTIZABLE), min_len=1)
    exclude_nodes: list[str] = setting(default_factory=list)  # names or regexes
    samples: int = setting(256, low=1)  # calibration samples used (at most)
    batch_size: int = setting(8, low=1, high=4096)
    # gptq (error-compensating, refine.py) | adaround (learned, rounding.py; per layer the better of it
    # and gptq) | nearest (onnxruntime's)
    rounding: Literal["gptq", "nearest", "adaround"] = "gptq"
    adaround_iterations: int = setting(1000, low=50, high=100_000)  # per layer, at most
    adaround_budget_s: float = setting(300.0, low=0, low_open=True)  # wall time AdaRound may spend on all layers
    bias_correction: bool = True  # remove the output-mean shift the int8 weights cause
    # rescale each activation range by the int8 model's output error (range_tuning.py)
    tune_ranges: bool = False
    tune_ranges_budget_s: float = setting(300.0, low=0, low_open=True)  # wall time the range search may spend
    # calibration samples whose float statistics drive rounding and bias correction, and on which
    # calibration: auto and tune_ranges measure the output error
    refine_samples: int = setting(64, low=1)
    max_accuracy_drop: float | None = setting(None, low=0, high=1)  # None: no evaluation, no fallback
    relative: bool = False  # max_accuracy_drop relative to the float model's score
    #: output error each tensor adds | local SQNR | earliest blocks first (a float prefix)
    fallback_rank: Literal["sensitivity", "sqnr", "depth"] = "sensitivity"
    max_trials: int = setting(8, low=1, high=64)  # quantize+evaluate rounds of the fallback, and timed latency trials
    latency_aware: bool = True  # time int8 against float here; keep int8 only where it is faster
    latency_min_ms: float = setting(0.1, low=0)  # float models faster than this are left to the step guard
    latency_budget_s: float = setting(60.0, low=0, low_open=True)  # wall time the latency search may spend
    # MiB the run may peak at (estimated before any work, memory.py); None: 75% of what is available
    max_memory_mb: float | None = setting(None, low=0, low_open=True)
    #: What the latency search measures (onnxruntime in this process); tests put synthetic timings here.
    probe: LatencyProbe = dataclasses.field(default_factory=LatencyProbe, init=False, repr=False, compare=False)

    def validate(self) -> None:
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise UserError("weight_type: 'uint8' with activation_type 'int8' is not supported by "
                            "onnxruntime (use int8 weights)")
        for pattern in self.exclude_nodes:  # a rule bounds cannot state: each entry compiles
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"exclude_nodes: {pattern!r} is not a node name or regex ({e})") from e

    # -- the pass -------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        start = time.perf_counter()
        proto = ir.to_proto(model)
        n_cal = self._check_model_and_data(proto)
        self._chunk_samples = self._check_memory(proto)
        reduce_range = self._decide_reduce_range()
        times = StepTimes(self.details.setdefault("timings_s", {}))
        with RssSampler() as rss, self.private_folder() as folder:  # every file of the pass goes in here
            quantized = self._quantize(proto, folder, n_cal, reduce_range, times)
        self.details["memory"]["measured_peak_mb"] = None if rss.peak_mb is None else round(rss.peak_mb)
        self._summarize(time.perf_counter() - start)
        if quantized is None:  # no int8 configuration was faster: the float model, unchanged
            return ir.passes.PassResult(ir.from_proto(proto), False)
        return ir.passes.PassResult(quantized, True)

    def _quantize(self, proto: onnx.ModelProto, folder: pathlib.Path, n_cal: int, reduce_range: bool,
                  times: StepTimes) -> ir.Model | None:
        """Steps 2-8 of the module doc in ``folder``; None when the float model is faster."""
        with times("preprocess"):
            prepared = self._prepare(proto, folder)
        if self.equalize and not self.per_channel:
            self.note("equalize: not applied, it needs per-channel weights (per_channel: true)")
        elif self.equalize:
            with times("equalize"):
                self._equalize(prepared)
        excluded = self._excluded_nodes(prepared)
        methods = AUTO_METHODS if self.calibration == "auto" else (self.calibration,)
        refiner = self._refiner(prepared, reduce_range)  # float statistics shared by every method
        quantizers, firsts, calibrations = {}, {}, {}
        with times("calibration"):
            caches = self._calibrate(prepared, folder, n_cal, methods)
        for method, (cache, calibrations[method]) in caches.items():
            options = self._static_options(prepared, reduce_range, method)
            quantizers[method] = Quantizer(prepared.path, cache, options, times, refiner, float_nodes=excluded)
            firsts[method] = quantizers[method]([], folder / f"trial0-{method}.onnx")
        method = methods[0]
        if len(methods) > 1:
            with times("calibration_choice"):
                method = self._choose_calibration(prepared, firsts, calibrations)
        self.details["calibration"] = calibrations[method]
        quantizer, best = quantizers[method], firsts[method]
        if self.tune_ranges:
            with times("tune_ranges"):
                quantizer, best = self._tune_ranges(prepared, quantizer, best, folder)
        with times("sqnr"), RssSampler() as rss:
            ranked = self._rank_by_sqnr(prepared, best, folder)
        self.details["memory"]["sqnr_peak_mb"] = None if rss.peak_mb is None else round(rss.peak_mb)
        scorer = self._scorer(prepared)
        reasons = {n: "excluded by exclude_nodes" for n in excluded}
        fallback_nodes: list[str] = []
        if scorer is not None:
            with times("fallback"):
                chosen = self._fallback(prepared, best, ranked, quantizer, scorer, folder)
            best, fallback_nodes = chosen.path, chosen.nodes()
            reasons.update(chosen.reasons())
        with times("ort_kernels"):
            self._kernels(best, folder)
        latency: dict[str, str] = {}
        if self.latency_aware and self.failure is not None:
            self.note("latency-aware: not run, the accuracy tolerance is not met")
        elif self.latency_aware:
            with times("latency"):
                best, latency = self._latency(prepared, best, quantizer.keeping_float(fallback_nodes), scorer,
                                              folder)
            if best is None:
                return None
        best_proto = onnx.load(str(best))
        if best in quantizer.refinements:  # the refinement of the model returned
            self.details["refinement"] = quantizer.refinements[best]
        self.details.update(node_accounting(prepared.proto, best_proto, op_types=self._op_types(),
                                            excluded={**reasons, **latency}))
        if latency:  # the kernels of the model returned, not of the first quantization
            with times("ort_kernels"):
                self._kernels(best, folder)
        return ir.from_proto(best_proto)

    # -- 1. checks --------------------------------------------------------------------------------
    def _check_model_and_data(self, proto: onnx.ModelProto) -> int:
        """Refuse quantized models and bad data before anything is written; the calibration samples."""
        found = already_quantized(proto)
        if found:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(found.items()))
            raise UserError(f"model: already quantized ({ops}); quantize the float model instead")
        inputs = model_inputs(proto)
        if not inputs:
            raise UserError("model: has no runtime inputs to calibrate")
        ctx = self.context
        n_cal = scan(ctx.calibration, inputs, "data.calibration", self.samples, self.batch_size)
        if self.max_accuracy_drop is not None:
            if ctx.evaluation is None:
                raise UserError("data.evaluation: max_accuracy_drop needs an evaluation dataset")
            scan(ctx.evaluation, inputs, "data.evaluation", None, self.batch_size)
        elif self.latency_aware and ctx.evaluation is not None:  # the latency trials' agreement check
            scan(ctx.evaluation, inputs, "data.evaluation", AGREEMENT_SAMPLES, self.batch_size)
        return n_cal

    def _check_memory(self, proto: onnx.ModelProto) -> int:
        """The run's memory estimate against ``max_memory_mb`` (memory.py), before any work:
        refused when it cannot fit. Returns the calibration chunk (samples) that fits."""
        inputs = model_inputs(proto)
        fixed = max((s.fixed_batch or 0) for s in inputs)  # 0: the batch is dynamic
        feed = next(feeds(self.context.calibration, inputs, fixed or 1, fixed or 1))[0]
        shapes = {k: v.shape for k, v in feed.items()}
        per_feed = samples_in(feed)
        work = memory.Workload(
            method=histogram_method(self.calibration), run_samples=fixed or self.batch_size, batch_size=self.batch_size,
            sqnr_samples=fixed or min(self.batch_size, SQNR_BATCH),
            fixed_batch=fixed > 0, refine=self.rounding != "nearest" or self.bias_correction, max_columns=MAX_COLUMNS)
        budget = self.max_memory_mb if self.max_memory_mb is not None else memory.default_budget_mb()
        est = memory.estimate(proto, shapes, work, budget, samples_per_shape=per_feed)
        self.details["memory"] = est.to_json(budget)
        memory.check_budget(est, budget)
        self._sqnr_batch, self._sqnr_group_mb = est.sqnr_samples, est.sqnr_group_mb
        return est.chunk_samples

    def _decide_reduce_range(self) -> bool:
        """``reduce_range`` as set, else for this CPU (a warning when it costs a bit of precision)."""
        if self.reduce_range is not None:
            reduce_range, why = self.reduce_range, "set in the recipe"
        else:
            reduce_range, why = auto_reduce_range()
            if reduce_range:
                logger.warning("quantize: %s", why)
                self.note(f"warning: {why}")
        self.details["reduce_range"] = {"value": reduce_range, "reason": why}
        self.details["settings"] = {
            "format": "QDQ", "activations": self.activation_type, "weights": self.weight_type,
            "per_channel": self.per_channel, "symmetric_activations": self.symmetric_activations,
            "symmetric_weights": self.symmetric_weights, "reduce_range": reduce_range}
        return reduce_range

    # -- 2. preparation ---------------------------------------------------------------------------
    def _prepare(self, proto: onnx.ModelProto, folder: pathlib.Path) -> Prepared:
        prepared = prepare(proto, folder, per_channel=self.per_channel)
        for message in prepared.notes:
            self.note(message)
        self.details["constants_lifted"] = prepared.constants_lifted
        self.details["opset"] = prepared.opset
        self.details["preprocess"] = prepared.preprocess
        return prepared

    def _equalize(self, prepared: Prepared) -> None:
        """Equalize the depthwise inputs' channel ranges (equalize.py) in ``prepared``, in place;
        the model before it stays the accuracy reference."""
        batches = (feed for feed, _ in feeds(self.context.calibration, prepared.inputs, self.samples,
                                             self.batch_size))
        equalized, summary = equalize(prepared.proto, batches, self.context.threads)
        self.details["equalization"] = summary
        if not summary["pairs"]:
            return
        prepared.reference = prepared.path.with_name("unequalized.onnx")
        prepared.path.replace(prepared.reference)
        onnx.save(equalized, str(prepared.path))
        prepared.proto = equalized
        self.note(f"equalized the channel ranges of {summary['pairs']} depthwise convolution inputs before "
                  f"calibration: {summary['channels_scaled']} of {summary['channels']} channels scaled up "
                  f"(median x{summary['median_scale']:g}, at most x{summary['max_scale']:g}), the depthwise "
                  "weights scaled down to match (equalize.py)")

    def _excluded_nodes(self, prepared: Prepared) -> list[str]:
        """The nodes ``exclude_nodes`` names in the pre-processed model."""
        names, unmatched = matching_nodes(prepared.proto, self.exclude_nodes)
        for pattern in unmatched:
            self.note(f"exclude_nodes: {pattern!r} matched no node of the pre-processed model")
        return names

    def _op_types(self) -> list[str]:
        return list(self.op_types) if self.op_types else sorted(QUANTIZABLE)

    # -- 3. calibration ---------------------------------------------------------------------------
    def _calibrate(self, prepared: Prepared, folder: pathlib.Path, n_cal: int,
                   methods: Sequence[str]) -> dict[str, tuple[pathlib.Path, dict]]:
        """Calibration ranges of the pre-processed model by each of ``methods`` (one pass over the
        data, calibration.py), each saved as a cache for quantize_static, with what the report
        says of them."""
        ctx = self.context
        start = time.perf_counter()
        stream = feeds(ctx.calibration, prepared.inputs, self.samples, self.batch_size)
        search: dict = {}
        with RssSampler() as rss:
            by_method = calibrate(prepared.path, folder, methods=methods, percentile=self.percentile,
                                  op_types=self._op_types(), chunks=chunked(stream, self._chunk_samples),
                                  threads=ctx.threads, activations=self._activation_grid(), search=search)
        seconds = time.perf_counter() - start
        tensors = len(next(iter(by_method.values())).data)
        self.note(f"calibrated {tensors} tensors with {', '.join(methods)} on {n_cal} samples of "
                  f"'{ctx.calibration.name}' in one pass over the data, {seconds:.1f} s")
        return {method: self._calibration_cache(prepared, folder, n_cal, method, ranges, seconds,
                                                search if method == "mse" else None, rss.peak_mb)
                for method, ranges in by_method.items()}

    def _calibration_cache(self, prepared: Prepared, folder: pathlib.Path, n_cal: int, method: str,
                           ranges: TensorsData, seconds: float, search: dict | None,
                           rss_peak_mb: float | None) -> tuple[pathlib.Path, dict]:
        """One method's ranges clamped (activation bounds, dead zones) and saved as a cache."""
        ctx = self.context
        clamped = clamp_ranges(ranges, activation_bounds(prepared.proto))
        if clamped:
            self.note(f"{method}: {len(clamped)} calibration ranges of Relu/Clip outputs clamped to the "
                      "activation's bounds (onnxruntime folds those activations into the range)")
        cut = clamp_ranges(ranges, dead_zones(prepared.proto))
        if cut:
            self.note(f"{method}: {len(cut)} calibration ranges cut to the values their readers can tell apart "
                      f"(e.g. below -3 before a hardswish, which gives 0 there: dead_zones.py); their int8 steps are "
                      f"{statistics.median(cut.values()):.2f} of the calibrated ones (median)")
        if method == "distribution":
            self.note("distribution calibration gives symmetric ranges (it is designed for float8): "
                      "uint8 tensors that are never negative lose about one bit")
        cache = folder / f"ranges-{method}.json"
        save_tensors_data(ranges, cache)
        details = {
            "method": method, "samples": n_cal, "dataset": ctx.calibration.name,
            "chunk_samples": self._chunk_samples, "tensors": len(ranges.data),
            # tensor -> int8 step after / before the cut (dead_zones.py)
            "ranges_cut_to_readers": {name: round(ratio, 4) for name, ratio in cut.items()},
            "seconds": round(seconds, 3),
            # highest RSS sampled during calibration, and the process's peak so far
            "rss_peak_during_mb": None if rss_peak_mb is None else round(rss_peak_mb, 1),
            "process_peak_rss_mb": round(peak_rss_mb(), 1)}
        if method == "percentile":
            details["percentile"] = self.percentile
        if search:
            details["range_search"] = search
            self.note(f"mse range search: {search['tensors_clipped']} of {len(ranges.data)} activation ranges "
                      f"clipped inside minmax; quantize-dequantize error "
                      f"{search['tensor_error_reduction_db']:.1f} dB below minmax (mean)")
        return cache, details

    def _choose_calibration(self, prepared: Prepared, models: dict[str, pathlib.Path],
                            calibrations: dict[str, dict]) -> str:
        """``calibration: auto``: the method whose int8 model has the highest output SQNR against
        the float model on the first ``refine_samples`` calibration samples (calibration_choice.py)."""
        error = self._output_error(prepared)
        n = error.samples
        scores = {method: round(db, 2) for method, db in output_sqnr_db(error, models).items()}
        chosen = best_method(scores)
        calibrations[chosen]["choice"] = {"output_sqnr_db": scores, "samples": n,
                                          "tried": list(calibrations)}
        self.note("calibration auto: " + ", ".join(f"{m} {v:.1f} dB" for m, v in scores.items())
                  + f" output SQNR on {n} calibration samples; {chosen} kept")
        return chosen

    def _output_error(self, prepared: Prepared) -> OutputError:
        """The float model's outputs on the first ``refine_samples`` calibration samples (fewer
        when the data is smaller), made once per run: ``calibration: auto`` and ``tune_ranges``
        score against the same."""
        if getattr(self, "_error_for", None) is not prepared:
            n = min(self.refine_samples, self.samples)
            batches = (feed for feed, _ in feeds(self.context.calibration, prepared.inputs, n, self.batch_size))
            self._error, self._error_for = OutputError(prepared.path, batches, self.context.threads), prepared
        return self._error

    def _tune_ranges(self, prepared: Prepared, quantizer: Quantizer, first: pathlib.Path,
                     folder: pathlib.Path) -> tuple[Quantizer, pathlib.Path]:
        """``tune_ranges``: the activation ranges rescaled by the int8 model's output error on the
        first ``refine_samples`` calibration samples (range_tuning.py); the quantizer of the tuned
        ranges and its model (``first`` unchanged when no range moved)."""
        error = self._output_error(prepared)
        n = error.samples
        ranges = load_tensors_data(quantizer.cache)
        units = range_tuning.units_of(onnx.load(str(first)), ranges, activation_bounds(prepared.proto))
        tuning = range_tuning.tune(first, units, error, self.tune_ranges_budget_s)
        record = self.details["range_tuning"] = {"samples": n, **tuning.to_json()}
        searched = f"{tuning.units_searched} of {tuning.units} activation ranges searched" + (
            f" (tune_ranges_budget_s {self.tune_ranges_budget_s:g} s ran out)" if tuning.out_of_time else "")
        if not tuning.factors:
            record["kept"] = "calibrated"
            self.note(f"tune_ranges: {searched}; none lowered the output error, the calibrated ranges are kept")
            return quantizer, first
        cache = folder / "ranges-tuned.json"
        save_tensors_data(range_tuning.scaled_ranges(ranges, tuning.tensors), cache)
        tuned = dataclasses.replace(quantizer, cache=cache)
        best = tuned([], folder / "trial0-tuned.onnx")
        requantized = error.error(best)
        after = record["output_sqnr_db_requantized"] = round(sqnr_db(requantized), 2)
        moved = f"tune_ranges: {searched}, {len(tuning.factors)} moved; output SQNR on {n} calibration samples"
        # The search scored edits of the first model; the quantizer re-rounds the weights of channels
        # it re-scales (GPTQ on the new grid), so the gain is confirmed on the model it made.
        if requantized >= tuning.error_before:
            record["kept"] = "calibrated"
            self.note(f"{moved} {record['output_sqnr_db_before']} dB calibrated, {after} dB re-quantized from the "
                      "tuned ranges: the calibrated ranges are kept")
            return quantizer, first
        # The search can fit its samples (measured on a digits CNN: +0.55 dB on its 64 samples, 12%
        # more output error on unseen digits), so the ranges must also win on calibration samples
        # it did not see.
        held_out = self._held_out_error(prepared, n)
        gain = f"{record['output_sqnr_db_before']} -> {after} dB"
        if held_out is None:
            record["held_out"] = "no calibration samples beyond the searched ones"
            gain += " (no calibration samples beyond these to confirm on)"
        else:
            calibrated_db, tuned_db = (round(sqnr_db(held_out.error(m)), 2) for m in (first, best))
            record["held_out"] = {"samples": held_out.samples, "output_sqnr_db_calibrated": calibrated_db,
                                  "output_sqnr_db_tuned": tuned_db}
            if tuned_db <= calibrated_db:
                record["kept"] = "calibrated"
                self.note(f"{moved} {gain}, but on {held_out.samples} "
                          f"calibration samples it did not search {calibrated_db} dB calibrated, {tuned_db} dB "
                          "tuned: the calibrated ranges are kept")
                return quantizer, first
            gain += f"; {calibrated_db} -> {tuned_db} dB on {held_out.samples} samples it did not search"
        record["kept"] = "tuned"
        self.note(f"{moved} {gain}")
        return tuned, best

    def _held_out_error(self, prepared: Prepared, searched: int) -> OutputError | None:
        """The output error on the calibration samples after the first ``searched`` (up to
        ``samples``), or None when there are none; feeds that straddle the boundary are left out."""
        if self.samples <= searched:
            return None
        batches, seen = [], 0
        for feed, _ in feeds(self.context.calibration, prepared.inputs, self.samples, self.batch_size):
            if seen >= searched:
                batches.append(feed)
            seen += samples_in(feed)
        return OutputError(prepared.path, batches, self.context.threads) if batches else None

    def _activation_grid(self) -> Activations:
        """The integer range and symmetry of activations, as onnxruntime's quantizer sets them."""
        qmin, qmax = get_qmin_qmax_for_qType(QUANT_TYPES[self.activation_type].tensor_type,
                                             symmetric=self.symmetric_activations)
        return Activations(int(qmin), int(qmax), self.symmetric_activations)

    # -- 4. quantization --------------------------------------------------------------------------
    def _static_options(self, prepared: Prepared, reduce_range: bool, method: str) -> dict:
        """quantize_static's format arguments for these settings. Under ``reduce_range`` the
        depthwise Conv weights keep 8 bits (cpu.py: their kernel cannot saturate)."""
        extra: dict = {"ActivationSymmetric": self.symmetric_activations, "WeightSymmetric": self.symmetric_weights}
        if reduce_range:
            full = full_range_weights(prepared.proto)
            self.details["reduce_range"]["full_range_weights"] = len(full)
            if full:
                # onnxruntime reads an override without "axis" as per-tensor quantization
                override = {"reduce_range": False, **({"axis": 0} if self.per_channel else {})}
                extra["TensorQuantOverrides"] = {name: [override] for name in full}
        return {"quant_format": QuantFormat.QDQ, "op_types_to_quantize": self._op_types(),
                "per_channel": self.per_channel, "reduce_range": reduce_range,
                "activation_type": QUANT_TYPES[self.activation_type], "weight_type": QUANT_TYPES[self.weight_type],
                "calibrate_method": METHODS[method], "extra_options": extra}

    def _refiner(self, prepared: Prepared, reduce_range: bool) -> Refiner | None:
        if self.rounding == "nearest" and not self.bias_correction:
            return None
        return Refiner(
            prepared.path, self.context.calibration, prepared.inputs,
            samples=min(self.refine_samples, self.samples), batch_size=self.batch_size,
            threads=self.context.threads, bias_correction=self.bias_correction,
            rounding=Rounding(self.rounding, iterations=self.adaround_iterations, budget_s=self.adaround_budget_s),
            damp=DAMP, reduce_range=reduce_range, symmetric=self.symmetric_weights)

    # -- 5. SQNR ----------------------------------------------------------------------------------
    def _sample_feeds(self, inputs: list[InputSpec]) -> Iterator[Feed]:
        """Up to SQNR_SAMPLES samples of data.evaluation (else data.calibration), small batches."""
        data = self.context.evaluation if self.context.evaluation is not None else self.context.calibration
        # Small batches: both augmented models return every intermediate tensor of the batch.
        for feed, _ in feeds(data, inputs, SQNR_SAMPLES, self._sqnr_batch):
            yield feed

    def _rank_by_sqnr(self, prepared: Prepared, qdq_path: pathlib.Path, folder: pathlib.Path) -> list[dict]:
        """All quantized tensors ranked worst first; the ten worst go into the report (empty when
        the SQNR cannot be computed on this graph)."""
        ranked = best_effort(ranked_tensors, prepared.path, qdq_path, folder,
                             lambda: self._sample_feeds(prepared.inputs), self.context.threads,
                             self._sqnr_group_mb * memory.MB)
        if isinstance(ranked, Skipped):
            self._skipped("worst_sqnr", "per-tensor SQNR", ranked)
            return []
        self.details["worst_sqnr"] = ranked[:10]
        return ranked

    def _skipped(self, key: str, what: str, skipped: Skipped) -> None:
        """A diagnostic that could not be computed: its report section and a note say why."""
        self.details[key] = skipped.to_json()
        self.note(f"{what} skipped: {skipped.reason}")

    def _kernels(self, qdq_path: pathlib.Path, folder: pathlib.Path) -> None:
        kernels = best_effort(ort_kernels, qdq_path, folder, self.context.threads)
        if isinstance(kernels, Skipped):
            self._skipped("ort_optimized", "onnxruntime kernel count", kernels)
        else:
            self.details["ort_optimized"] = kernels

    # -- 6. accuracy fallback ---------------------------------------------------------------------
    def _scorer(self, prepared: Prepared) -> Scorer | None:
        """The max_accuracy_drop rule on data.evaluation (None without max_accuracy_drop)."""
        if self.max_accuracy_drop is None:
            return None
        return Scorer(prepared.reference, self.context.evaluation, metrics=self.context.metrics,
                      tolerance=self.max_accuracy_drop, relative=self.relative, batch_size=self.batch_size,
                      threads=self.context.threads)

    def _fallback(self, prepared: Prepared, trial0: pathlib.Path, ranked: list[dict], quantizer: Quantizer,
                  scorer: Scorer, folder: pathlib.Path) -> fallback.Fallback:
        """Meet max_accuracy_drop by returning the first units of the fallback order to float (the
        nodes around the top-ranked tensors, or the first blocks of the graph: fallback.py); records
        the trials, and the failure when it is missed."""
        units = functools.partial(self._fallback_units, ranked, prepared, trial0, quantizer.float_nodes)
        chosen = fallback.search(trial0, units, quantize=quantizer, scorer=scorer, max_trials=self.max_trials,
                                 tmp=folder)
        best, nodes, tol = chosen.best, chosen.nodes(), scorer.tolerance
        metric, base = best["metric"], scorer.base(best["metric"])
        self.details["fallback"] = {
            "max_accuracy_drop": tol, "relative": self.relative, "metric": metric,
            "evaluation": self.context.evaluation.name, "float_" + metric: None if base is None else round(base, 5),
            "trials": chosen.trials, "chosen_trial": best["trial"], "met": best["met"],
            "nodes_to_float": nodes}
        if not best["met"]:
            what = "drop" if metric in ("top1", "agreement") else f"{metric} drop"  # a classifier's, as always
            floor = best_effort(scorer.judge.noise_floor)  # a diagnostic: never fails the work
            self.details["fallback"]["noise_floor"] = floor.to_json() if isinstance(floor, Skipped) else floor
            self.fail(f"quantize: max_accuracy_drop not met after {len(chosen.trials)} trials: best {what} "
                      f"{best['drop']:.4f} > {tol} ({len(nodes)} nodes in float)"
                      + ("" if isinstance(floor, Skipped) else noise_floor_note(floor, tol)))
            self.note(self.failure)
        elif chosen.chosen:
            where = {"sensitivity": f"around the {chosen.chosen} most output-sensitive tensors",
                     "sqnr": f"around the {chosen.chosen} worst-SQNR tensors",
                     "depth": f"in the first {chosen.chosen} blocks in graph order"}[self.fallback_rank]
            self.note(f"fallback: {len(nodes)} nodes returned to float {where}; drop {best['drop']:.4f} <= {tol} "
                      f"after {len(chosen.trials)} trials")
        return chosen

    def _fallback_units(self, ranked: list[dict], prepared: Prepared, trial0: pathlib.Path,
                        already_float: list[str]) -> list[fallback.Unit]:
        """The fallback's units in the order of ``fallback_rank`` (fallback.py)."""
        if self.fallback_rank == "depth":
            return fallback.depth_units(prepared.proto, already_float)
        return fallback.units_of(prepared.proto, self._fallback_ranking(ranked, prepared, trial0), already_float)

    def _fallback_ranking(self, ranked: list[dict], prepared: Prepared, trial0: pathlib.Path) -> list[dict]:
        """The fallback's order: with ``fallback_rank: sensitivity``, activation tensors whose
        quantization adds output error, most first, then the rest in SQNR order; with ``sqnr``,
        worst SQNR first. When the chosen ranking cannot be computed, the other one is used."""
        if self.fallback_rank == "sqnr" and ranked:
            return ranked
        if self.fallback_rank == "sqnr":
            self.note("fallback: ranked by output sensitivity (the SQNR ranking is not available)")
        sample = list(self._sample_feeds(prepared.inputs))
        t0 = time.perf_counter()
        sensitivity = best_effort(tensor_sensitivity, prepared.path, trial0, sample, self.context.threads)
        if isinstance(sensitivity, Skipped):
            self._skipped("sensitivity", "output sensitivity", sensitivity)
            if not ranked:
                raise WorkFailed(f"no ranking for the float fallback: output sensitivity failed "
                                 f"({sensitivity.reason}) and so did the SQNR")
            self.note("fallback: ranked by SQNR (output sensitivity is not available)")
            return ranked
        order = most_sensitive(sensitivity)
        total = sum(v for v in sensitivity.values() if v > 0) or 1.0
        self.details["sensitivity"] = {
            "samples": sum(samples_in(f) for f in sample), "tensors": len(sensitivity),
            "seconds": round(time.perf_counter() - t0, 2),
            "top": [{"tensor": t, "output_error_removed": float(f"{sensitivity[t]:.4g}"),
                     "share": round(sensitivity[t] / total, 4)} for t in order[:10]]}
        return fallback.sensitivity_first(ranked, sensitivity, order)

    # -- 7. latency -------------------------------------------------------------------------------
    def _latency(self, prepared: Prepared, best: pathlib.Path, quantizer: Quantizer, scorer: Scorer | None,
                 folder: pathlib.Path) -> tuple[pathlib.Path | None, dict[str, str]]:
        """Time ``best`` against the float model and search for a faster int8 configuration
        (latency_search.py). Returns the chosen model (None: the float model) and the nodes it
        returned to float for latency, with the reason."""
        ctx = self.context
        best_proto = onnx.load(str(best))
        capable = int8_nodes(prepared.proto, best_proto, op_types=self._op_types())
        fixed = max((s.fixed_batch or 1) for s in prepared.inputs)
        feed = next(feeds(ctx.calibration, prepared.inputs, fixed, fixed))[0]  # one sample (or one fixed batch)
        outcome = latency_search.search(
            float_path=prepared.float_path, trial0=best, pre_proto=prepared.proto, qdq0_proto=best_proto,
            capable=capable, feeds=feed, threads=ctx.threads, probe=self.probe.on_target(ctx.runtime, ctx.ep, ctx.bench_slot),
            quantize=quantizer,
            check=self._latency_check(prepared, best, scorer),
            internal_unfused=internal_unfused(self.details["ort_optimized"], best_proto),
            max_trials=self.max_trials, budget_s=self.latency_budget_s, min_ms=self.latency_min_ms, tmp=folder)
        self.details["latency_aware"] = outcome.summary
        self.details["latency_trials"] = outcome.trials
        self.note(outcome.note)
        if outcome.path is None:
            self.details["first_quantization_ort_optimized"] = self.details.pop("ort_optimized")
            return None, {}
        chosen = outcome.summary["chosen_trial"]
        return outcome.path, {n: f"latency: int8 was slower here (latency trial {chosen})" for n in outcome.excluded}

    def _latency_check(self, prepared: Prepared, first: pathlib.Path,
                       scorer: Scorer | None) -> Scorer | AgreementCheck:
        """The accuracy rule of a latency trial: max_accuracy_drop when set (the fallback's
        scoring), else agreement with the float model (accuracy.py) on data.evaluation, else
        data.calibration."""
        if scorer is not None:
            return scorer
        ctx = self.context
        data = ctx.evaluation if ctx.evaluation is not None else ctx.calibration
        return AgreementCheck(prepared.reference, data, metrics=ctx.metrics, first=first, batch_size=self.batch_size,
                              threads=ctx.threads)

    # -- 8. summary -------------------------------------------------------------------------------
    def _summarize(self, seconds: float) -> None:
        d = self.details
        d["seconds"] = round(seconds, 3)
        d["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if "ort_optimized" not in d:  # the float model was returned; the latency note says why
            return
        ort_opt = d["ort_optimized"]
        counted = f"{sum(d['int8_ops'].values())} nodes int8, {sum(d['float_ops'].values())} float"
        if "skipped" in ort_opt:
            self.note(counted)
        else:
            self.note(f"{counted}; onnxruntime fused {ort_opt['fused_int8_total']} int8 kernels, "
                      f"{ort_opt['unfused_quantize_linear']} QuantizeLinear / "
                      f"{ort_opt['unfused_dequantize_linear']} DequantizeLinear left unfused")
        r = d.get("refinement")
        learned = r.get("adaround", {}).get("layers_adaround", 0) if r else 0
        if r and r.get("layers_gptq", 0) + learned + r.get("biases_corrected", 0):
            by_adaround = f"{learned} by AdaRound, " if "adaround" in r else ""
            self.note(f"weights refined on {r['samples']} calibration samples: {by_adaround}{r['layers_gptq']} "
                      f"layers rounded by GPTQ ({r['layers_nearest']} to nearest), {r['biases_corrected']} "
                      f"biases corrected; refined layers' output error from int8 weights "
                      f"{r['weight_output_error_reduction_db']:.1f} dB below round-to-nearest (mean)")
        ada = r.get("adaround") if r else None
        if ada:
            skipped = ada["not_learned"]
            first = f" (e.g. {next(iter(skipped))}: {next(iter(skipped.values()))})" if skipped else ""
            self.note(f"AdaRound: {ada['layers_learned']} layers learned in {ada['seconds']:.1f} s "
                      f"({ada['mean_iterations']:.0f} iterations each, mean), kept on {ada['layers_adaround']}; "
                      f"{len(skipped)} not learned{first}")
        for entry in d["float_nodes"][:20]:
            self.note(f"float: {entry['node']} ({entry['op_type']}): {entry['reason']}")
        if len(d["float_nodes"]) > 20:
            self.note(f"float: ... {len(d['float_nodes']) - 20} more in details.float_nodes")
