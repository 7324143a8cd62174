"""Run a recipe: load or export the model, run the passes, measure, gate, report.

The loaded model is first normalised (``deployopt.core.normalize``: weights listed as inputs,
Constant-node weights, unused opset imports; NaN/Inf weights refused), and upgraded to a newer
opset before a pass whose ``min_opset`` it is below; each rewrite is logged and reported.

For every pass the pipeline records a ``StepRecord`` (parameters, seconds, whether the model
changed, statistics before and after, the pass's notes and details). The input and the output
model are then measured side by side with the latency harness (interleaved rounds in worker
processes) and the accuracy harness (top-1 against labels, agreement with the input model), the
gates read those numbers, and report.json / report.md are written atomically.

Exit status (returned in ``Report.exit_code``): 0 all gates met; 1 a gate not met or a pass
that missed its own tolerance (its best model is still saved); bad input raises ``UserError``
before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

import onnx_ir as ir

from deployopt import report
from deployopt.core import io, stats
from deployopt.core.contain import report_status
from deployopt.core.normalize import Action, data_inputs, default_opset, normalize, upgrade_opset
from deployopt.passes.context import PassContext
from deployopt.core.errors import DeployoptError, UserError, WorkFailed
from deployopt.recipe import Recipe


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


def input_shape(model: ir.Model) -> list[int | str | None]:
    value = data_inputs(model)[0]
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else (d.value if hasattr(d, "value") else None) for d in value.shape]


def _prepare_out_dir(out_dir: pathlib.Path) -> pathlib.Path:
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


def _open_datasets(recipe: Recipe, shape: list, input_name: str) -> dict[str, Any]:
    from deployopt.core.data import open_dataset

    datasets = {}
    base_dir = recipe.path.parent if recipe.path else None  # relative data paths follow the recipe
    for key, spec in recipe.data.items():
        try:
            datasets[key] = open_dataset(spec, input_shape=shape, seed=recipe.seed, input_name=input_name,
                                         base_dir=base_dir)
        except UserError as e:
            raise UserError(f"data.{key}: {e}") from e
    return datasets


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


def _step_accuracy(model: ir.Model, index: int, input_path: pathlib.Path, ctx: PassContext) -> dict | None:
    """What the step cost: top-1 (with labels) and agreement with the pipeline's input model on
    the evaluation data, after this step. None without evaluation data."""
    if ctx.evaluation is None:
        return None
    from deployopt.measure.accuracy import evaluate

    path = ctx.work_dir / f"step{index}_eval.onnx"
    io.save(model, path)
    try:
        result = evaluate(path, ctx.evaluation, reference_path=input_path, threads=ctx.threads, progress=False)
    finally:
        path.unlink(missing_ok=True)
    return {k: result.get(k) for k in ("top1", "agreement", "cosine", "n")}


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
                input_path: pathlib.Path, normalization: list[Action], source: str) -> tuple[ir.Model, str | None]:
    total = len(recipe.passes)
    for i, p in enumerate(recipe.passes):
        model = _upgrade_opset_for(p, i, model, normalization, source)
        p.context = base_ctx
        guard = p.min_step_speedup
        snapshot = ir.to_proto(model) if guard else None  # in-place passes mutate the model
        before = stats.model_stats(model)
        _log(f"[{i + 1}/{total}] {p.name} ...")
        start = time.perf_counter()
        try:
            result = p(model)
        except DeployoptError as e:
            if isinstance(e, UserError):
                raise UserError(f"passes[{i}].{p.name}: {e}") from e
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
            verdict = _step_guard(p.name, snapshot, model, guard, recipe, base_ctx.work_dir, i)
            result.details["step_guard"] = verdict
            if verdict["reverted"]:
                result.notes.append(verdict["message"])
                _log(verdict["message"])
                model, status = ir.from_proto(snapshot), "reverted"
        after = stats.model_stats(model)
        record = StepRecord(p.name, p.params(), seconds, bool(result.modified) and status != "reverted",
                            before, after, result.notes, result.details, status)
        record.accuracy = _step_accuracy(model, i, input_path, base_ctx)
        steps.append(record)
        cost = record.accuracy or {}
        _log(f"[{i + 1}/{total}] {p.name} {status} in {seconds:.1f} s: "
             f"{before['bytes'] / 1e6:.2f} MB -> {after['bytes'] / 1e6:.2f} MB"
             + ("" if record.modified else " (unchanged)")
             + (f", top-1 {cost['top1']:.3f}" if cost.get("top1") is not None else "")
             + (f", agreement {cost['agreement']:.3f}" if cost.get("agreement") is not None else ""))
        if result.failure:
            record.status = "failed"
            return model, result.failure
    return model, None


def _step_guard(name: str, before: Any, model: ir.Model, limit: float, recipe: Recipe,
                work_dir: pathlib.Path, index: int) -> dict[str, Any]:
    """Short interleaved benchmark of a step's input vs its output on the first thread setting.

    The step is reverted only when it is slower with confidence: the whole 95% interval of its
    speedup lies below ``limit``. On shared machines (±15-30% noise) a point estimate alone would
    revert good steps at random.
    """
    from deployopt.measure import latency

    step_in = work_dir / f"step{index}_input.onnx"
    step_out = work_dir / f"step{index}_output.onnx"
    io.save(before, step_in)
    io.save(model, step_out)
    threads = recipe.benchmark.threads[0]
    result = latency.compare([step_in, step_out], labels=["step input", "step output"], threads=(threads,),
                             batch=(1,), warmup=5, runs=max(20, recipe.benchmark.runs // 2), rounds=3,
                             timeout=recipe.benchmark.timeout, seed=recipe.seed, progress=False)
    rows = {row["model"]: row for row in result.rows}
    out, inp = rows["step output"], rows["step input"]
    if out.get("error") or inp.get("error"):
        return {"limit": limit, "speedup": None, "reverted": False,
                "message": f"{name} step guard not measured: {out.get('error') or inp.get('error')}"}
    speedup, (low, high) = out["speedup"], out.get("speedup_ci") or (out["speedup"], out["speedup"])
    reverted = high < limit
    slower = f"{1 / speedup:.2f}x slower" if speedup < 1 else f"only {speedup:.2f}x faster"
    message = (f"{name} reverted: {slower} than its input (p50 {out['p50_ms']:.2f} ms vs {inp['p50_ms']:.2f} ms, "
               f"speedup 95% CI [{low:.2f}, {high:.2f}] below min_step_speedup {limit:g})")
    return {"limit": limit, "speedup": speedup, "speedup_ci": [low, high], "p50_ms_input": inp["p50_ms"],
            "p50_ms_output": out["p50_ms"], "threads": threads, "reverted": reverted,
            "message": message if reverted else f"{name} kept: {speedup:.2f}x vs its input"}


def _measure(recipe: Recipe, input_path: pathlib.Path, output_path: pathlib.Path,
             datasets: dict[str, Any]) -> tuple[list[dict], dict[str, Any], list[str], dict[str, Any]]:
    bench_rows: list[dict] = []
    warnings: list[str] = []
    profiles: dict[str, Any] = {}
    settings = recipe.benchmark
    if settings.enabled:
        from deployopt.measure import latency

        result = latency.compare([input_path, output_path], labels=["input", "output"],
                                 threads=tuple(settings.threads), batch=tuple(settings.batch),
                                 warmup=settings.warmup, runs=settings.runs, rounds=settings.rounds,
                                 timeout=settings.timeout, seed=recipe.seed)
        bench_rows = [{k: v for k, v in row.items() if k != "samples_ms"} for row in result.rows]
        warnings.extend(result.warnings)
        failed = [row for row in bench_rows if row.get("error")]
        if failed:
            raise WorkFailed(f"benchmark of {failed[0]['model']} failed: {failed[0]['error']}")
        profiles = _profiles(recipe, input_path, output_path, warnings)
    accuracy: dict[str, Any] = {}
    if "evaluation" in datasets:
        from deployopt.measure.accuracy import evaluate

        data = datasets["evaluation"]
        threads = settings.threads[0]
        acc_in = evaluate(input_path, data, threads=threads)
        acc_out = evaluate(output_path, data, reference_path=input_path, threads=threads)
        accuracy = {"dataset": data.name, "input": acc_in, "output": acc_out,
                    "agreement": acc_out.get("agreement")}
        if acc_in.get("top1") is not None and acc_out.get("top1") is not None:
            accuracy["metric"] = "top1"
            accuracy["drop"] = acc_in["top1"] - acc_out["top1"]
        else:
            accuracy["metric"] = "agreement"
            accuracy["drop"] = 1.0 - acc_out["agreement"]
    if "fidelity" in datasets:
        from deployopt.measure.accuracy import evaluate

        data = datasets["fidelity"]
        fidelity = evaluate(output_path, data, reference_path=input_path, threads=settings.threads[0])
        accuracy["fidelity"] = {"dataset": data.name, **fidelity}
    return bench_rows, accuracy, warnings, profiles


def _profiles(recipe: Recipe, input_path: pathlib.Path, output_path: pathlib.Path,
              warnings: list[str]) -> dict[str, Any]:
    """Where the time goes in the input and the output model: the 10 most expensive nodes."""
    from deployopt.measure.profile import profile_model

    profiles = {}
    for label, path in (("input", input_path), ("output", output_path)):
        try:
            profile = profile_model(path, threads=recipe.benchmark.threads[0], runs=20, warmup=5,
                                    seed=recipe.seed, label=label, timeout=recipe.benchmark.timeout or 600.0)
        except DeployoptError as e:  # the latency numbers stand without it; say why it is missing
            warnings.append(f"profile of {label} not available: {e}")
            continue
        data = profile.to_dict()
        data["rows"] = data["rows"][:10]
        profiles[label] = {"summary": data, "markdown": profile.to_markdown(10)}
    return profiles


def _evaluate_gates(recipe: Recipe, output_stats: dict, bench_rows: list[dict],
                    accuracy: dict) -> list[dict[str, Any]]:
    gates = []
    for name, limit in recipe.gates.active().items():
        if name == "max_accuracy_drop":
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
    return gates


def _gate_reason(gate: dict[str, Any]) -> str:
    value = "not measured" if gate["value"] is None else f"{gate['value']:.4g}"
    relation = "<" if gate["name"] == "min_speedup" else ">"
    return f"gate {gate['name']} not met: {value} {relation} {gate['limit']:g}"


STAGING_PREFIX = ".deployopt-staging-"


def run(recipe: Recipe, out_dir: str | pathlib.Path) -> report.Report:
    """Run the recipe; outputs are staged in a hidden folder inside ``out_dir`` and renamed into
    place only at the end, so a crash or an interrupt leaves no partial files behind."""
    started = time.time()
    out_dir = _prepare_out_dir(pathlib.Path(out_dir))
    if not isinstance(recipe.model, dict):
        io.check_output_path(out_dir / "model.onnx", input_path=recipe.model)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    try:
        result = _run(recipe, out_dir, staging, started)
        for name in ("input.onnx", "model.onnx", "report.json", "report.md"):
            if (staging / name).exists():
                os.replace(staging / name, out_dir / name)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(recipe: Recipe, out_dir: pathlib.Path, staging: pathlib.Path, started: float) -> report.Report:
    output_path = staging / "model.onnx"
    with tempfile.TemporaryDirectory(prefix="deployopt-") as tmp:
        work_dir = pathlib.Path(tmp)
        if isinstance(recipe.model, dict):
            exported = _export_input(recipe.model, work_dir)
            input_path = staging / "input.onnx"
            io.save(io.load_proto(exported), input_path)
        else:
            input_path = pathlib.Path(recipe.model)
        model = io.load(input_path)
        source = str(out_dir / "input.onnx") if isinstance(recipe.model, dict) else str(input_path)
        model, normalization = normalize(model, source=source)
        for action in normalization:
            _log(f"normalised on load: {action.line()}")
        shape = input_shape(model)
        datasets = _open_datasets(recipe, shape, data_inputs(model)[0].name)
        _check_requirements(recipe, datasets)

        input_stats = stats.model_stats(model, path=str(input_path))
        if isinstance(recipe.model, dict):  # report where the file will be, not the staging folder
            input_stats["path"] = str(out_dir / "input.onnx")
        reference = io.load(input_path)  # an untouched copy for passes that compare against it
        base_ctx = PassContext(calibration=datasets.get("calibration"),
                               evaluation=datasets.get("evaluation"),
                               training=datasets.get("training") or datasets.get("calibration"),
                               reference=reference, seed=recipe.seed, work_dir=work_dir,
                               threads=recipe.benchmark.threads[0])
        steps: list[StepRecord] = []
        model, failure = _run_passes(recipe, model, base_ctx, steps, input_path, normalization, source)

        io.save(model, output_path, input_path=input_path)
        output_stats = stats.model_stats(io.load_proto(output_path), path=str(output_path))
        output_stats["path"] = str(out_dir / "model.onnx")
        bench_rows, accuracy, warnings, profiles = _measure(recipe, input_path, output_path, datasets)
        gates = _evaluate_gates(recipe, output_stats, bench_rows, accuracy)

    reasons = ([failure] if failure else []) + [_gate_reason(g) for g in gates if not g["passed"]]
    exit_code = 1 if reasons else 0
    doc = report.build(recipe=recipe, input_stats=input_stats, output_stats=output_stats,
                       steps=[s.to_json() for s in steps], benchmark=bench_rows, accuracy=accuracy,
                       gates=gates, warnings=warnings, exit_code=exit_code, profiles=profiles,
                       reason="; ".join(reasons) or None, seconds=time.time() - started,
                       normalization=[a.to_json() for a in normalization])
    report.write(doc, staging, {k: v["markdown"] for k, v in profiles.items()})
    return report.Report.from_dict(doc, out_dir)
