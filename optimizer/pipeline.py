"""Run a recipe: load or export the model, run the passes, measure, gate, report.

The loaded model is first normalised (``deployopt.core.normalize``: weights listed as inputs,
Constant-node weights, unused opset imports; NaN/Inf weights refused), and upgraded to a newer
opset before a pass whose ``min_opset`` it is below; each rewrite is logged and reported.

For every pass the pipeline records a ``StepRecord`` (parameters, seconds, whether the model
changed, statistics before and after, the pass's notes and details). The input and the output
model are then measured side by side with the latency harness (interleaved rounds in worker
processes) and the accuracy harness, and the gates read those numbers; report.json / report.md are
written atomically. Every accuracy figure (after each step, at the end, for the gate) is one
``deployopt.measure.judge.Judge`` verdict against the input model on data.evaluation, by the
recipe's ``metrics`` (default: top-1 drop for a labelled classifier, 1 - agreement unlabelled, the
fidelity metric for other outputs): per metric, drop = the input's score against labels (1 when
the metric compares with the input model) - the model's score; the largest drop decides.
The metrics are checked against the model's outputs right after it is loaded.

Exit status (returned in ``Report.exit_code``): 0 all gates met; 1 a gate not met or a pass
that missed its own tolerance (its best model is still saved); bad input raises ``UserError``
before any work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import onnx_ir as ir

from deployopt import report
from deployopt.core import io, stats
from deployopt.core.contain import STAGING_PREFIX, Skipped, best_effort, report_status
from deployopt.core.normalize import Action, data_inputs, default_opset, normalize, upgrade_opset
from deployopt.passes.context import PassContext
from deployopt.core.errors import DeployoptError, UserError, WorkFailed, one_line
from deployopt.measure.accuracy import LABEL_READERS
from deployopt.measure.judge import Judge, check_metrics, noise_floor_note
from deployopt.measure.model_io import TensorSpec, format_shape, with_shapes
from deployopt.measure.tasks import LABEL_KINDS
from deployopt.recipe import Recipe

if TYPE_CHECKING:
    from deployopt.cache import StepCache

T = TypeVar("T")
#: Runs a latency measurement: ``slot(measure)`` returns ``measure()``, called while the run holds the
#: machine's benchmark slot (a sweep runs trials side by side; their timings must not overlap).
BenchSlot = Callable[[Callable[[], T]], T]


def _now(measure: Callable[[], T]) -> T:
    return measure()


@dataclasses.dataclass
class StepRecord:
    name: str
    params: dict[str, Any]
    seconds: float
    modified: bool
    before: dict[str, Any]
    after: dict[str, Any]
    notes: list[str]
    details: dict[str, Any]
    status: str = "ok"  # ok | failed (missed its tolerance; best model kept) | reverted (step guard)
    accuracy: dict[str, Any] | None = None  # after this step, on data.evaluation, vs the input model

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.name, "params": self.params, "seconds": round(self.seconds, 3),
                "modified": self.modified, "status": self.status, "before": self.before,
                "after": self.after, "accuracy": self.accuracy, "notes": self.notes, "details": self.details}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    report_status(message)


def prepare_out_dir(out_dir: pathlib.Path) -> pathlib.Path:
    """The output folder, created and checked writable (one-line ``UserError`` naming it)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: output path exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the output folder: {e.strerror}") from e
    probe = out_dir / ".deployopt-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{out_dir}: output folder is not writable: {e.strerror}") from e
    return out_dir


def _export_input(spec: dict[str, Any], work_dir: pathlib.Path) -> pathlib.Path:
    from deployopt import models
    from deployopt.models.export import export_model

    kwargs = dict(spec.get("kwargs") or {})
    if "pretrained" in spec:
        kwargs["pretrained"] = spec["pretrained"]
    module = models.resolve(spec["export"], **kwargs)
    if spec.get("weights"):
        models.load_weights(module, spec["weights"])
    shape = spec.get("input_shape") or list(getattr(module, "default_input_shape", (1, 3, 224, 224)))
    target = work_dir / "input.onnx"
    result = export_model(module, target, tuple(shape), dynamic_batch=bool(spec.get("dynamic_batch")),
                          opset=spec.get("opset"), tolerance=spec.get("tolerance", 1e-4))
    _log(f"exported {spec['export']} {tuple(shape)}: max |torch - onnxruntime| = {result.max_abs_diff:.2e}")
    return target


def _shapes_hint(name: str, example: list[int]) -> str:
    """How ``optimize`` sets an input's shape: the recipe's ``shapes`` key."""
    return f"set shapes.{name} in the recipe (--set shapes.{name}=[{','.join(map(str, example))}])"


def _dims(value: ir.Value) -> tuple | None:
    """A graph value's dims: ints, symbolic names, None where unknown; None when the rank is."""
    return None if value.shape is None else tuple(
        d if isinstance(d, int) else getattr(d, "value", None) for d in value.shape)


def _model_inputs(model: ir.Model, recipe: Recipe) -> tuple[list[TensorSpec], dict[str, tuple[int, ...]]]:
    """The model's data inputs, and the recipe's ``shapes`` checked against them."""
    specs = []
    for value in data_inputs(model):
        dims = _dims(value)
        try:
            dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else None
        except (TypeError, ValueError, AttributeError):  # element types numpy cannot hold
            dtype = None
        specs.append(TensorSpec(value.name, dtype, dims))
    by_name = {s.name: s for s in specs}
    given = {}
    for name, dims in recipe.shapes.items():
        spec = by_name.get(name)
        if spec is None:
            raise UserError(f"shapes.{name}: not an input of the model (inputs: {', '.join(by_name)})")
        fixed = spec.dims or ()
        if spec.dims is not None and (len(dims) != len(fixed) or any(
                isinstance(w, int) and w != g for i, (w, g) in enumerate(zip(fixed, dims)) if i > 0)):
            raise UserError(f"shapes.{name}: {dims} does not fit model input '{name}' ({spec.shape_text()})")
        given[name] = tuple(dims)
    return specs, given


def _open_datasets(recipe: Recipe, inputs: list[TensorSpec]) -> dict[str, Any]:
    from deployopt.core.data import UnfixedDims, open_model_data

    datasets = {}
    base_dir = recipe.path.parent if recipe.path else None  # relative data paths follow the recipe
    for key, spec in recipe.data.items():
        try:
            datasets[key] = open_model_data(spec, inputs, seed=recipe.seed, base_dir=base_dir)
        except UnfixedDims as e:
            raise UserError(f"data.{key}: {e}; {_shapes_hint(e.input_name, e.example())}") from e
        except UserError as e:  # a bad labels file is the key data.<key>.labels
            sep = "." if str(e).startswith("labels: ") else ": "
            raise UserError(f"data.{key}{sep}{e}") from e
    return datasets


def _fed_shapes(recipe: Recipe, specs: list[TensorSpec], given: dict[str, tuple[int, ...]],
                datasets: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The shapes the latency harness feeds inputs whose non-batch dims are dynamic: the recipe's
    ``shapes``, else the samples of the first dataset that feeds the input (every sample of a
    dataset has one shape), with a note saying so. Refused before any work when neither fixes
    them and something will time the model (the benchmark or a step guard)."""
    shapes, notes = dict(given), []
    timed = recipe.benchmark.enabled or any(p.min_step_speedup for p in recipe.passes)
    for spec in specs:
        open_dims = [f"{i} ({d or '?'})" for i, d in enumerate(spec.dims or ()) if i > 0 and not isinstance(d, int)]
        if spec.name in shapes or (spec.dims is not None and not open_dims):
            continue
        for key, data in datasets.items():
            sample = (data.sample_shapes or ({spec.name: data.sample_shape} if len(specs) == 1 else {})).get(spec.name)
            if sample is not None:
                shapes[spec.name] = (1, *sample)
                notes.append(f"input '{spec.name}' ({spec.shape_text()}): dynamic dim {', '.join(open_dims)} "
                             f"taken from the data: every sample of data.{key} is {format_shape(sample)}")
                break
        else:
            if timed:
                example = [d if isinstance(d, int) else (1 if i == 0 else 224) for i, d in enumerate(spec.dims or ())]
                raise UserError(f"model input '{spec.name}' ({spec.shape_text()}) has dynamic dims that no dataset "
                                f"of the recipe fixes; {_shapes_hint(spec.name, example)}")
    return shapes, notes


def _check_requirements(recipe: Recipe, datasets: dict[str, Any]) -> None:
    for i, p in enumerate(recipe.passes):
        if p.needs_calibration and "calibration" not in datasets:
            raise UserError(f"passes[{i}].{p.name}: needs data.calibration in the recipe")
        if p.needs_training and not ({"training", "calibration"} & set(datasets)):
            raise UserError(f"passes[{i}].{p.name}: needs data.training (or data.calibration) in the recipe")
        if p.needs_evaluation and "evaluation" not in datasets:
            raise UserError(f"passes[{i}].{p.name}: needs data.evaluation in the recipe")
    gates = recipe.gates
    if gates.max_accuracy_drop is not None and "evaluation" not in datasets:
        raise UserError("gates.max_accuracy_drop: needs data.evaluation in the recipe")
    if gates.min_speedup is not None and not recipe.benchmark.enabled:
        raise UserError("gates.min_speedup: needs the benchmark (benchmark.enabled is false)")


def _check_metrics(recipe: Recipe, model: ir.Model, datasets: dict[str, Any]) -> None:
    """The recipe's metrics against the model's outputs, and a labels file some metric reads,
    before any work (one-line ``UserError`` naming the recipe key)."""
    check_metrics(recipe.metrics, {v.name: _dims(v) or () for v in model.graph.outputs})
    evaluation = datasets.get("evaluation")
    if evaluation is None or not evaluation.label_file:
        return
    kind = next((s.kind for s in recipe.metrics if s.kind in LABEL_KINDS), None)
    if kind is None:
        raise UserError(f"data.evaluation.labels: no metric reads a labels file ({evaluation.label_file}); name "
                        f"one in the recipe, metrics: {{OUTPUT: {'|'.join(LABEL_KINDS)}}}")
    try:  # read now: labels that do not match the samples (count, file names) are refused before any work
        LABEL_READERS[kind](evaluation.label_file, evaluation)
    except UserError as e:
        raise UserError(f"data.evaluation.labels: {e}") from e


def _judge(recipe: Recipe, input_path: pathlib.Path, datasets: dict[str, Any]) -> Judge | None:
    """The judge of every accuracy figure of the run (module doc), None without data.evaluation."""
    if "evaluation" not in datasets:
        return None
    return Judge(input_path, datasets["evaluation"], metrics=recipe.metrics or None,
                 threads=recipe.benchmark.threads[0])


def _step_accuracy(model: ir.Model, index: int, judge: Judge | None, ctx: PassContext) -> dict | None:
    """What the step cost on the evaluation data, judged against the pipeline's input model: the
    task score and drop (``score``, ``score_name``, ``drop``) beside top-1 (with labels),
    agreement and cosine of a classifier. None without evaluation data."""
    if judge is None:
        return None
    path = ctx.work_dir / f"step{index}_eval.onnx"
    io.save(model, path)
    try:
        verdict = _judged("evaluation", path, lambda: judge.score(path, with_reference=True))
    except UserError:  # the evaluation data does not fit the model: bad input
        raise
    except Exception as e:  # anything else only costs this report-only figure; the step stands
        return Skipped.of(e).to_json()
    finally:
        path.unlink(missing_ok=True)
    result = verdict.result
    return {**{k: result.get(k) for k in ("top1", "agreement", "cosine", "n")},
            "score": verdict.score, "score_name": verdict.metric, "drop": verdict.drop}


def _judged(key: str, path: pathlib.Path, measure: Callable[[], T]) -> T:
    """``measure()`` whose bad-data errors name the recipe key and the model: ``data.<key>: <model>: ...``."""
    try:
        return measure()
    except UserError as e:
        where = "" if str(path) in str(e) else f"{path}: "
        raise UserError(f"data.{key}: {where}{e}") from e


def _upgrade_opset_for(p, index: int, model: ir.Model, normalization: list[Action], source: str) -> ir.Model:
    """The model at the opset the pass needs (``min_opset``), the upgrade recorded as normalisation."""
    need = p.min_opset
    if need is None or default_opset(model) >= need:
        return model
    model, action = upgrade_opset(model, need, source=source, why=f"passes[{index}].{p.name} needs opset {need}")
    normalization.append(action)
    _log(f"normalised: {action.line()}")
    return model


def _run_passes(recipe: Recipe, model: ir.Model, base_ctx: PassContext, steps: list[StepRecord],
                input_path: pathlib.Path, normalization: list[Action], source: str,
                shapes: dict[str, tuple[int, ...]], cache: StepCache | None = None,
                bench_slot: BenchSlot = _now, judge: Judge | None = None) -> tuple[ir.Model, str | None]:
    total = len(recipe.passes)
    for i, p in enumerate(recipe.passes):
        model = _upgrade_opset_for(p, i, model, normalization, source)
        p.context = base_ctx
        before = stats.model_stats(model)
        _log(f"[{i + 1}/{total}] {p.name} ...")
        compute = functools.partial(_run_step, p, i, model, recipe, base_ctx, shapes, bench_slot)
        model, result, status, seconds = compute() if cache is None else cache.step(
            model, p, f"passes[{i}].{p.name}", recipe, base_ctx, shapes, compute)
        after = stats.model_stats(model)
        record = StepRecord(p.name, p.params(), seconds, bool(result.modified) and status != "reverted",
                            before, after, result.notes, result.details, status)
        record.accuracy = _step_accuracy(model, i, judge, base_ctx)
        if "skipped" in (record.accuracy or {}):
            record.notes.append(f"accuracy after this step skipped: {record.accuracy['skipped']}")
        steps.append(record)
        cost = record.accuracy or {}
        _log(f"[{i + 1}/{total}] {p.name} {status} in {seconds:.1f} s: "
             f"{before['bytes'] / 1e6:.2f} MB -> {after['bytes'] / 1e6:.2f} MB"
             + ("" if record.modified else " (unchanged)")
             + (f", top-1 {cost['top1']:.3f}" if cost.get("top1") is not None else "")
             + (f", agreement {cost['agreement']:.3f}" if cost.get("agreement") is not None else "")
             + (f", {cost['score_name']} {cost['score']:.4f}" if cost.get("score") is not None
                and cost.get("score_name") not in ("top1", "agreement") else ""))
        if result.failure:
            record.status = "failed"
            return model, result.failure
    return model, None


def _run_step(p, i: int, model: ir.Model, recipe: Recipe, base_ctx: PassContext, shapes: dict[str, tuple[int, ...]],
              bench_slot: BenchSlot) -> tuple[ir.Model, Any, str, float]:
    """Pass ``p`` on ``model``, then its step guard: (model, result, status, seconds)."""
    guard = p.min_step_speedup
    snapshot = ir.to_proto(model) if guard else None  # in-place passes mutate the model
    start = time.perf_counter()
    try:
        result = p(model)
    except DeployoptError as e:
        if isinstance(e, UserError):  # "setting: why" names the recipe key passes[i].NAME.setting
            sep = "." if str(e).split(":")[0] in {f.name for f in dataclasses.fields(p)} else ": "
            raise UserError(f"passes[{i}].{p.name}{sep}{e}") from e
        raise WorkFailed(f"passes[{i}].{p.name}: {e}") from e
    except KeyboardInterrupt:
        raise
    except Exception as e:
        # Unexpected failures inside a pass become one clear line (traceback with --debug).
        cause = " ".join(str(e).split())[:300] or type(e).__name__
        raise WorkFailed(f"passes[{i}].{p.name} failed: {type(e).__name__}: {cause}") from e
    seconds = time.perf_counter() - start
    model = result.model
    status = "ok"
    if guard and result.modified and not result.failure:
        verdict = best_effort(_step_guard, p.name, snapshot, model, guard, recipe, base_ctx.work_dir, i, shapes,
                              bench_slot)
        if isinstance(verdict, Skipped):  # not measured: the step is kept, and the note says why
            verdict = {"limit": guard, "speedup": None, "reverted": False, "skipped": verdict.reason,
                       "message": f"{p.name} step guard not measured: {verdict.reason}"}
        result.details["step_guard"] = verdict
        if verdict["speedup"] is None:
            result.notes.append(verdict["message"])
        if verdict["reverted"]:
            result.notes.append(verdict["message"])
            _log(verdict["message"])
            model, status = ir.from_proto(snapshot), "reverted"
    return model, result, status, seconds


def _step_guard(name: str, before: Any, model: ir.Model, limit: float, recipe: Recipe,
                work_dir: pathlib.Path, index: int, shapes: dict[str, tuple[int, ...]],
                bench_slot: BenchSlot = _now) -> dict[str, Any]:
    """Interleaved benchmark of a step's input vs its output on the first thread setting.

    A short benchmark first: the step is reverted when it is slower with confidence (the whole 95%
    interval of its speedup lies below ``limit``) and kept when it is faster with confidence. When
    the interval straddles ``limit`` the short run cannot tell (timings on shared machines vary by
    15-30%), so a longer one (six rounds instead of three) decides on its point estimate: a step that
    is not at least ``limit`` faster there is reverted, because it buys no latency and the run must
    never ship a model slower than its input.
    """
    from deployopt.measure import latency

    step_in = work_dir / f"step{index}_input.onnx"
    step_out = work_dir / f"step{index}_output.onnx"
    io.save(before, step_in)
    io.save(model, step_out)
    threads = recipe.benchmark.threads[0]
    # per round (the first measurement has 3 rounds, the second 6): half the benchmark's runs, at
    # least 20, unless the recipe asks for fewer (a short benchmark of a large model)
    runs = max(min(20, recipe.benchmark.runs), recipe.benchmark.runs // 2)
    verdict: dict[str, Any] = {"limit": limit, "threads": threads, "reverted": False}
    for attempt, (runs, rounds) in enumerate(((runs, 3), (runs, 6))):
        result = bench_slot(functools.partial(
            latency.compare, [step_in, step_out], labels=["step input", "step output"], threads=(threads,),
            batch=(1,), warmup=5, runs=runs, rounds=rounds, timeout=recipe.benchmark.timeout,
            seed=recipe.seed + attempt, progress=False, shapes=shapes, runtime=recipe.benchmark.runtime,
            ep=recipe.benchmark.ep))
        rows = {row["model"]: row for row in result.rows}
        out, inp = rows["step output"], rows["step input"]
        if out.get("error") or inp.get("error"):
            return {**verdict, "speedup": None,
                    "message": f"{name} step guard not measured: {out.get('error') or inp.get('error')}"}
        speedup, (low, high) = out["speedup"], out.get("speedup_ci") or (out["speedup"], out["speedup"])
        verdict.update(speedup=speedup, speedup_ci=[low, high], p50_ms_input=inp["p50_ms"],
                       p50_ms_output=out["p50_ms"], measurements=attempt + 1)
        if attempt == 0 and not low < limit <= high:
            verdict["reverted"] = high < limit
            break
        verdict["reverted"] = speedup < limit  # the longer run, on its point estimate
    slower = f"{1 / speedup:.2f}x slower" if speedup < 1 else f"only {speedup:.2f}x faster"
    how = ("95% CI below" if verdict["measurements"] == 1
           else "not above it in a longer second benchmark:")
    verdict["message"] = (f"{name} reverted: {slower} than its input (p50 {verdict['p50_ms_output']:.2f} ms vs "
                          f"{verdict['p50_ms_input']:.2f} ms, speedup {speedup:.2f} [{low:.2f}, {high:.2f}], "
                          f"{how} min_step_speedup {limit:g})" if verdict["reverted"]
                          else f"{name} kept: {speedup:.2f}x vs its input")
    return verdict


def _measure(recipe: Recipe, input_path: pathlib.Path, output_path: pathlib.Path, datasets: dict[str, Any],
             shapes: dict[str, tuple[int, ...]], bench_slot: BenchSlot = _now, judge: Judge | None = None,
             ) -> tuple[list[dict], dict[str, Any], list[str], dict[str, Any]]:
    bench_rows: list[dict] = []
    warnings: list[str] = []
    profiles: dict[str, Any] = {}
    settings = recipe.benchmark
    if settings.enabled:
        from deployopt.measure import latency

        result = bench_slot(functools.partial(
            latency.compare, [input_path, output_path], labels=["input", "output"],
            threads=tuple(settings.threads), batch=tuple(settings.batch), warmup=settings.warmup,
            runs=settings.runs, rounds=settings.rounds, timeout=settings.timeout, seed=recipe.seed, shapes=shapes,
            runtime=settings.runtime, ep=settings.ep))
        bench_rows = [{k: v for k, v in row.items() if k != "samples_ms"} for row in result.rows]
        warnings.extend(result.warnings)
        failed = [row for row in bench_rows if row.get("error")]
        if failed:
            raise WorkFailed(f"benchmark of {failed[0]['model']} failed: {failed[0]['error']}")
        profiles = _profiles(recipe, input_path, output_path, warnings, shapes, bench_slot)
    accuracy: dict[str, Any] = {}
    if judge is not None:  # data.evaluation: the verdict on the output, the gate's number
        acc_in = _judged("evaluation", input_path, lambda: judge.reference_result(progress=True))
        verdict = _judged("evaluation", output_path, lambda: judge.score(output_path, progress=True,
                                                                          with_reference=True))
        acc_out = verdict.result
        accuracy = {"dataset": judge.dataset.name, "input": acc_in, "output": acc_out,
                    "agreement": acc_out.get("agreement"), "metric": verdict.metric, "score_in": verdict.base,
                    "score_out": verdict.score, "drop": verdict.drop, "metrics": verdict.per_metric}
        limit = recipe.gates.max_accuracy_drop
        if limit is not None and verdict.drop is not None and verdict.drop > limit + 1e-12:
            # a missed gate says whether it asked for more than the input's own noise floor
            floor = best_effort(judge.noise_floor)
            accuracy["noise_floor"] = floor.to_json() if isinstance(floor, Skipped) else floor
    if "fidelity" in datasets:
        from deployopt.measure.accuracy import evaluate

        data = datasets["fidelity"]
        # noise_floor: what the input scores against itself one grey level away, so the report
        # can say whether the output's agreement is limited by near-tie samples
        fidelity = _judged("fidelity", output_path, lambda: evaluate(
            output_path, data, reference_path=input_path, threads=settings.threads[0], metrics=recipe.metrics or None,
            noise_floor=1))
        accuracy["fidelity"] = {"dataset": data.name, **fidelity}
    return bench_rows, accuracy, warnings, profiles


def _profiles(recipe: Recipe, input_path: pathlib.Path, output_path: pathlib.Path,
              warnings: list[str], shapes: dict[str, tuple[int, ...]], bench_slot: BenchSlot = _now) -> dict[str, Any]:
    """Where the time goes in the input and the output model: the 10 most expensive nodes."""
    from deployopt.measure.profile import profile_model

    profiles = {}
    for label, path in (("input", input_path), ("output", output_path)):
        try:
            profile = bench_slot(functools.partial(
                profile_model, path, threads=recipe.benchmark.threads[0], runs=min(20, recipe.benchmark.runs),
                warmup=5, seed=recipe.seed,
                label=label, timeout=recipe.benchmark.timeout or 600.0, shapes=shapes,
                runtime=recipe.benchmark.runtime, ep=recipe.benchmark.ep))
        except Exception as e:  # report-only: the latency numbers stand without it; say why it is missing
            reason = one_line(e, with_type=not isinstance(e, DeployoptError))
            warnings.append(f"profile of {label} not available: {reason}")
            profiles[label] = {"summary": {"skipped": reason}, "markdown": f"profile of {label} skipped: {reason}"}
            continue
        data = profile.to_dict()
        data["rows"] = data["rows"][:10]
        profiles[label] = {"summary": data, "markdown": profile.to_markdown(10)}
    return profiles


def _evaluate_gates(recipe: Recipe, output_stats: dict, bench_rows: list[dict],
                    accuracy: dict) -> list[dict[str, Any]]:
    gates = []
    for name, limit in recipe.gates.active().items():
        if name == "max_accuracy_drop":  # the judge's largest drop over the task metrics
            value = accuracy.get("drop")
            passed = value is not None and value <= limit + 1e-12
        elif name == "min_speedup":
            speedups = [r["speedup"] for r in bench_rows if r.get("model") == "output" and r.get("speedup")]
            value = min(speedups) if speedups else None
            passed = value is not None and value >= limit
        else:  # max_size_mb
            value = output_stats["bytes"] / 1e6
            passed = value <= limit
        gates.append({"name": name, "limit": limit, "value": value, "passed": bool(passed)})
        if name == "max_accuracy_drop" and accuracy.get("metric"):
            gates[-1]["metric"] = accuracy["metric"]
        if name == "max_accuracy_drop" and not passed and accuracy.get("noise_floor"):
            gates[-1]["noise_floor"] = accuracy["noise_floor"]
    return gates


def _gate_reason(gate: dict[str, Any]) -> str:
    value = "not measured" if gate["value"] is None else f"{gate['value']:.4g}"
    relation = "<" if gate["name"] == "min_speedup" else ">"
    metric = f" (drop of {gate['metric']})" if gate.get("metric") else ""
    floor = noise_floor_note(gate["noise_floor"], gate["limit"]) if gate.get("noise_floor") else ""
    return f"gate {gate['name']} not met: {value} {relation} {gate['limit']:g}{metric}{floor}"


def run(recipe: Recipe, out_dir: str | pathlib.Path, *, cache: StepCache | None = None,
        bench_slot: BenchSlot = _now) -> report.Report:
    """Run the recipe; outputs are staged in a hidden folder inside ``out_dir`` and renamed into
    place only at the end, so a crash or an interrupt leaves no partial files behind.

    ``cache`` (``deployopt.cache.StepCache``) restores exports and steps an earlier run computed
    from the same input and settings; ``bench_slot`` runs every latency measurement (benchmark,
    profiles, step guards) while the run holds the machine's benchmark slot."""
    started = time.time()
    with _output_folder(pathlib.Path(out_dir)) as out_dir:
        if not isinstance(recipe.model, dict):
            io.check_output_path(out_dir / "model.onnx", input_path=recipe.model)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
        names = report.UserPaths()
        names.add(staging, str(out_dir))  # staged outputs are named where they will be
        try:
            result = _run(recipe, out_dir, staging, started, names, cache, bench_slot)
            for name in ("input.onnx", "model.onnx", "report.json", "report.md"):
                if (staging / name).exists():
                    os.replace(staging / name, out_dir / name)
            return result
        except DeployoptError as e:  # the message names the user's files, not the run's copies
            message = names(str(e))
            if message == str(e):
                raise
            raise (UserError if isinstance(e, UserError) else WorkFailed)(message) from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _output_folder(out_dir: pathlib.Path) -> Iterator[pathlib.Path]:
    """``prepare_out_dir``; when the run then raises (bad input, a crash, Ctrl-C), the folders it
    created are removed again if still empty, so a refused run leaves not even an empty folder."""
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    prepare_out_dir(out_dir)
    try:
        yield out_dir
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty: something else is in it now
                break
        raise


def _name_work_files(names: report.UserPaths, work_dir: pathlib.Path, recipe: Recipe, source: str) -> None:
    """What the run's working files are to the user: the model they gave, at a recipe step."""
    names.add_scratch(work_dir, f"a working copy of {source}")
    for i, p in enumerate(recipe.passes):
        step = f"passes[{i}].{p.name}"
        names.add(work_dir / f"step{i}_input.onnx", f"{source} before {step}")
        names.add(work_dir / f"step{i}_output.onnx", f"{source} after {step}")
        names.add(work_dir / f"step{i}_eval.onnx", f"{source} after {step}")


def _run(recipe: Recipe, out_dir: pathlib.Path, staging: pathlib.Path, started: float,
         names: report.UserPaths, cache: StepCache | None = None, bench_slot: BenchSlot = _now) -> report.Report:
    output_path = staging / "model.onnx"
    with tempfile.TemporaryDirectory(prefix="deployopt-") as tmp:
        work_dir = pathlib.Path(tmp)
        _name_work_files(names, work_dir, recipe,
                         str(out_dir / "input.onnx") if isinstance(recipe.model, dict) else str(recipe.model))
        if isinstance(recipe.model, dict):
            export = functools.partial(_export_input, recipe.model, work_dir)
            exported = export() if cache is None else cache.export(recipe.model, export)[0]
            input_path = staging / "input.onnx"
            io.save(io.load_proto(exported), input_path)
        else:
            input_path = pathlib.Path(recipe.model)
        model = io.load(input_path)
        source = str(out_dir / "input.onnx") if isinstance(recipe.model, dict) else str(input_path)
        model, normalization = normalize(model, source=source)
        for action in normalization:
            _log(f"normalised on load: {action.line()}")
        specs, given = _model_inputs(model, recipe)
        datasets = _open_datasets(recipe, with_shapes(specs, given))
        _check_requirements(recipe, datasets)
        _check_metrics(recipe, model, datasets)
        shapes, shape_notes = _fed_shapes(recipe, specs, given, datasets)
        for note in shape_notes:
            _log(note)

        input_stats = stats.model_stats(model, path=str(input_path))
        if isinstance(recipe.model, dict):  # report where the file will be, not the staging folder
            input_stats["path"] = str(out_dir / "input.onnx")
        reference = io.load(input_path)  # an untouched copy for passes that compare against it
        base_ctx = PassContext(calibration=datasets.get("calibration"),
                               evaluation=datasets.get("evaluation"),
                               training=datasets.get("training") or datasets.get("calibration"),
                               reference=reference, seed=recipe.seed, work_dir=work_dir,
                               threads=recipe.benchmark.threads[0], metrics=recipe.metrics,
                               runtime=recipe.benchmark.runtime, ep=recipe.benchmark.ep,
                               bench_slot=None if bench_slot is _now else bench_slot)
        judge = _judge(recipe, input_path, datasets)
        steps: list[StepRecord] = []
        model, failure = _run_passes(recipe, model, base_ctx, steps, input_path, normalization, source, shapes,
                                     cache, bench_slot, judge)
        if steps:  # the shapes every step's data and timing used
            steps[0].notes[:0] = shape_notes

        io.save(model, output_path, input_path=input_path)
        output_stats = stats.model_stats(io.load_proto(output_path), path=str(output_path))
        output_stats["path"] = str(out_dir / "model.onnx")
        bench_rows, accuracy, warnings, profiles = _measure(recipe, input_path, output_path, datasets, shapes,
                                                            bench_slot, judge)
        if cache is not None:
            warnings.extend(cache.take_warnings())
        if not steps:
            warnings[:0] = shape_notes
        gates = _evaluate_gates(recipe, output_stats, bench_rows, accuracy)

    reasons = ([failure] if failure else []) + [_gate_reason(g) for g in gates if not g["passed"]]
    exit_code = 1 if reasons else 0
    doc = report.build(recipe=recipe, input_stats=input_stats, output_stats=output_stats,
                       steps=[s.to_json() for s in steps], benchmark=bench_rows, accuracy=accuracy,
                       gates=gates, warnings=warnings, exit_code=exit_code, profiles=profiles,
                       reason="; ".join(reasons) or None, seconds=time.time() - started,
                       normalization=[a.to_json() for a in normalization], names=names)
    report.write(doc, staging, {k: v["markdown"] for k, v in profiles.items()})
    return report.Report.from_dict(doc, out_dir)
