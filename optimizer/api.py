"""deployopt's Python API: what the CLI does, callable from a pipeline script.

```python
import deployopt

report = deployopt.optimize("recipe.yaml", "runs/out")       # -> Report (report.json as an object)
if not report.passed:
    raise SystemExit(report.reason)
sweep = deployopt.sweep("sweep.yaml", "runs/sweep")        # -> SweepResult (sweep.json)
bench = deployopt.bench(["a.onnx", "b.onnx"], threads=[1, 2])  # -> BenchResult
result = deployopt.evaluate("b.onnx", "imagenet-samples", reference="a.onnx")  # -> EvalResult
deployopt.export("resnet18", "resnet18.onnx", input_shape=[1, 3, 224, 224])  # needs deployopt[torch]
stats = deployopt.inspect("b.onnx")                           # -> dict, as `inspect --json`
```

Results carry the same keys as the JSON the CLI writes (``to_dict()`` gives that JSON). Bad input
raises ``UserError`` (the CLI's exit 2); work that ran and failed raises ``WorkFailed`` (exit 1),
except that ``optimize`` returns its ``Report`` when only a gate or a pass tolerance failed
(``report.exit_code == 1``, ``report.reason`` says why), since the model and report are written.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from deployopt.core.errors import UserError, WorkFailed
from deployopt.measure.latency import BenchResult
from deployopt.report import Report

PathLike = str | os.PathLike

__all__ = ["optimize", "sweep", "bench", "profile", "evaluate", "export", "inspect", "Report", "BenchResult", "EvalResult"]


# -- optimize ----------------------------------------------------------------------------------------

def optimize(recipe: PathLike | Mapping[str, Any], out_dir: PathLike | None = None, *,
             overrides: Sequence[str] = (), isolate: bool = False, timeout: float | None = None,
             runtime: str | None = None, ep: str | None = None) -> Report:
    """Run a recipe (a YAML path or the same mapping) and write ``out_dir``/model.onnx, report.json,
    report.md. ``overrides`` are ``KEY=VALUE`` strings as for ``--set``. ``runtime``/``ep`` set the
    recipe's ``benchmark.runtime``/``benchmark.ep``: the target every latency decision and number
    of the run is measured on.

    ``isolate=True`` runs the work in a watched child process (what the CLI does), so a model that
    makes onnxruntime abort or hang raises ``WorkFailed`` instead of taking the caller down;
    ``timeout`` (seconds, needs ``isolate``) stops a run that takes too long.
    """
    from deployopt import pipeline
    from deployopt.recipe import from_mapping, load_recipe

    if timeout is not None and not isolate:
        raise UserError("timeout: only with isolate=True (a run in this process cannot be stopped safely)")
    target = {k: v for k, v in (("runtime", runtime), ("ep", ep)) if v is not None}
    if isinstance(recipe, Mapping):
        if overrides:
            raise UserError("overrides: apply them to the mapping itself")
        recipe = dict(recipe)
        if target:
            recipe["benchmark"] = {**(recipe.get("benchmark") or {}), **target}
        parsed = from_mapping(recipe)
        default_name = "recipe"
    else:
        parsed = load_recipe(recipe, [*overrides, *(f"benchmark.{k}={v}" for k, v in target.items())])
        default_name = pathlib.Path(recipe).stem
    out = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path("runs") / default_name
    if isolate:
        from deployopt.core.contain import run_contained

        report = out / "report.json"
        before = _stamp(report)
        code = run_contained(functools.partial(_optimize_in_child, parsed, out), verb="optimize", timeout=timeout)
        if _stamp(report) in (None, before):  # none written by this run (an old one may be there)
            raise WorkFailed(f"optimize ended with exit code {code} before writing {report} (the child's error "
                             "is printed above; a script that passes isolate=True must start its work under "
                             "`if __name__ == '__main__':`, because the child re-imports it)")
        return Report.read(report)
    return pipeline.run(parsed, out)


def _stamp(path: pathlib.Path) -> tuple[int, int] | None:
    """``path``'s inode and modification time, None when absent: tells a file rewritten from an old one."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _optimize_in_child(recipe, out_dir: pathlib.Path) -> int:
    from deployopt import pipeline

    return pipeline.run(recipe, out_dir).exit_code


# -- sweep -------------------------------------------------------------------------------------------

def sweep(sweep: PathLike | Mapping[str, Any], out_dir: PathLike | None = None, *, engine: str | None = None,
          workers: int | None = None, address: str | None = None, cache: bool = True):
    """Run a sweep file (a YAML path or the same mapping): one optimize run per trial into
    ``out_dir``/trials/NNN, sharing a step cache in ``out_dir``/cache (``cache=False``: none), then
    sweep.json, sweep.md, pareto.png and the fastest trial that meets the gates in ``out_dir``/best.
    ``engine`` (local | ray), ``workers`` and ``address`` (a Ray cluster) override the file's.
    Returns ``deployopt.sweeps.SweepResult``; ``exit_code`` 1 when no trial meets the gates.
    """
    from deployopt.sweeps import run_sweep

    return run_sweep(dict(sweep) if isinstance(sweep, Mapping) else sweep, out_dir, engine=engine,
                     workers=workers, address=address, cache=cache)


# -- bench -------------------------------------------------------------------------------------------

def bench(models: Sequence[PathLike], *, labels: Sequence[str] | None = None, threads: Sequence[int] = (1,),
          batch: Sequence[int] = (1,), warmup: int = 10, runs: int = 100, rounds: int = 3,
          shapes: Mapping[str, Sequence[int]] | None = None, data: Any = None, seed: int = 0,
          timeout: float | None = None, optimization_level: str = "all", progress: bool = False,
          runtime: str = "onnxruntime", ep: str | None = None, instances: int = 1) -> BenchResult:
    """Side-by-side latency of ``models`` in interleaved rounds, one worker process per model;
    speedups are p50 ratios against the first model with a 95% bootstrap interval.

    ``runtime`` (onnxruntime or openvino) and ``ep`` (an onnxruntime execution provider) name the
    target; ``instances`` > 1 runs that many concurrent worker processes per model (each with
    ``threads`` intra-op threads) and reports their aggregate throughput and latency under load.

    ``data`` is a dataset spec (``"photos"``, ``"folder:imgs/"``, a recipe-style mapping) or a
    Dataset whose samples are fed instead of seeded random inputs. A model that crashes or fails gives a failure row.
    """
    from deployopt.core import io
    from deployopt.measure.inputs import check_settings
    from deployopt.measure.latency import compare
    from deployopt.measure.model_io import input_specs, open_data
    from deployopt.measure.runtime import check_target

    threads, batch = list(threads), list(batch)
    check_settings(threads=threads, batch=batch, warmup=warmup, runs=runs, rounds=rounds, timeout=timeout,
                   instances=instances)
    check_target(runtime, ep, key="runtime", ep_key="ep")
    shapes = {name: tuple(dims) for name, dims in (shapes or {}).items()}
    specs = [input_specs(io.load_proto(path)) for path in models]  # an unreadable model is bad input
    if isinstance(data, (str, Mapping)):
        data = open_data(data, specs[0], shapes)  # feeds every input (npz by name, constants)
    return compare(list(models), labels=labels, threads=threads, batch=batch, warmup=warmup, runs=runs,
                   rounds=rounds, shapes=shapes, data=data, seed=seed, timeout=timeout,
                   progress=progress, optimization_level=optimization_level, runtime=runtime, ep=ep,
                   instances=instances)


def profile(model: PathLike, *, threads: int = 1, batch: int | None = None, runs: int = 50, warmup: int = 10,
            shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0, data: Any = None,
            optimization_level: str = "all", timeout: float | None = 600.0, label: str | None = None,
            runtime: str = "onnxruntime", ep: str | None = None):
    """Per-node profile of ``model`` with onnxruntime's profiler, mapped back to the model's own node
    names (fused kernels list the nodes they replaced). Returns ``deployopt.measure.profile.Profile``."""
    from deployopt.measure.profile import profile_model

    return profile_model(model, threads=threads, batch=batch, runs=runs, warmup=warmup,
                         shapes={k: tuple(v) for k, v in (shapes or {}).items()}, seed=seed, data=data,
                         optimization_level=optimization_level, timeout=timeout, label=label,
                         runtime=runtime, ep=ep)


# -- evaluate ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalResult:
    """Accuracy against labels and fidelity against a reference model (keys of ``eval --json``).

    The classification keys (classes .. kl) are those of the first classification metric, None
    without one: top1/top5 are None on unlabelled data (top5 also with 5 classes or fewer); the
    fidelity keys are None without a reference. Intervals are Wilson 95% [low, high].
    ``metrics`` holds every task metric's result (``outputs``, ``kind``, ``score``,
    ``score_name`` and its own keys); ``score``/``score_name`` are the first metric's.
    ``noise_floor`` (with ``noise_floor=L``): the same metrics for the reference on its own inputs
    moved by up to L grey levels, against its clean outputs, and the model's agreement on the
    samples that noise leaves unchanged (``deployopt.measure.accuracy``), or {levels, skipped: reason}.
    """

    model: str
    dataset: str
    n: int
    classes: int | None
    top1: float | None
    top1_ci: list[float] | None
    top5: float | None
    top5_ci: list[float] | None
    reference: str | None
    agreement: float | None
    agreement_ci: list[float] | None
    cosine: float | None
    max_abs_diff: float | None
    kl: float | None
    seconds: float
    score: float | None = None
    score_name: str | None = None
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    noise_floor: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvalResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_text(self) -> str:
        """Human-readable summary, as ``deployopt eval`` prints it."""
        def pct(value, ci):
            return f"{value:.2%} [{ci[0]:.2%}, {ci[1]:.2%}]"

        classes = f", {self.classes} classes" if self.classes is not None else ""
        lines = [f"{self.model} on {self.dataset}: {self.n} samples{classes}"]
        if self.top1 is not None:
            lines.append(f"top-1 {pct(self.top1, self.top1_ci)}"
                         + (f"   top-5 {pct(self.top5, self.top5_ci)}" if self.top5 is not None else "")
                         + "   (Wilson 95%)")
        if self.reference is not None and self.agreement is not None:
            lines.append(f"vs {self.reference}: agreement {pct(self.agreement, self.agreement_ci)}, cosine "
                         f"{self.cosine:.6f}, max |diff| {self.max_abs_diff:.4g}, KL {self.kl:.3g}")
        for res in self.metrics:
            if res["kind"] != "classification":
                lines.append(_metric_line(res))
        if self.noise_floor is not None:
            from deployopt.measure.accuracy import noise_floor_text

            lines.append(noise_floor_text(self.noise_floor))
        return "\n".join(lines) + "\n"


def _metric_line(res: Mapping[str, Any]) -> str:
    """One task metric's result as a line: kind, outputs, score, then its other numbers."""
    def fmt(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    outputs = ", ".join(res["outputs"]) or "all outputs"
    rest = ", ".join(f"{k} {fmt(v)}" for k, v in res.items()
                     if k not in ("outputs", "kind", "score", "score_name") and v is not None
                     and not isinstance(v, (list, dict)))
    return f"{res['kind']} ({outputs}): {res['score_name']} {fmt(res['score'])}" + (f"; {rest}" if rest else "")


def evaluate(model: PathLike, data: Any, *, reference: PathLike | None = None, batch_size: int = 32,
             threads: int = 1, progress: bool = False,
             shapes: Mapping[str, Sequence[int]] | None = None, metrics: Any = None,
             labels: PathLike | None = None, charset: PathLike | None = None,
             runtime: str = "onnxruntime", ep: str | None = None, noise_floor: int = 0) -> EvalResult:
    """Task metrics of ``model`` on ``data`` (a dataset spec string like ``"digits?split=test"``, a
    recipe-style mapping, or a Dataset), against the labels and, with ``reference``, against the
    reference model's outputs.

    ``metrics``: a spec ``"OUTPUT=KIND[:key=value,...]"`` or ``"KIND"``, a list of them, or a
    mapping ``{OUTPUT: KIND | {"kind": KIND, **settings}}`` with KIND one of classification,
    detection, segmentation, sequence, regression, or ``package.module:function`` (user code:
    imported and run, only code you trust; see ``deployopt.measure.tasks.custom``). Without one,
    2-D logits get classification (top-1/top-5, agreement, cosine, max abs difference, KL) and
    other outputs the generic fidelity metric. ``labels``: a COCO JSON (detection), a folder of
    masks (segmentation) or a text file with one label per line (sequence); ``charset``: the
    sequence metric's charset file, one character per line. ``shapes`` gives the
    full shape of inputs whose dynamic dims the data does not fix (sizes images follow).
    ``runtime``/``ep``: the target both models run on (onnxruntime with an execution provider, or
    openvino). ``noise_floor=L`` (grey levels, image data only) also scores the reference (or the
    model without one) on its own inputs moved by up to L grey levels against its clean outputs:
    the agreement no quantized model can be held to (``deployopt.measure.accuracy``)."""
    from deployopt.core import io
    from deployopt.measure.accuracy import evaluate as evaluate_model
    from deployopt.measure.model_io import input_specs, open_data
    from deployopt.measure.runtime import check_target

    check_target(runtime, ep, key="runtime", ep_key="ep")
    specs = input_specs(io.load_proto(model))
    if reference is not None:
        io.load_proto(reference)
    shapes = {name: tuple(dims) for name, dims in (shapes or {}).items()}
    dataset = open_data(data, specs, shapes) if isinstance(data, (str, Mapping)) else data
    if not dataset.labeled and reference is None and labels is None:
        raise UserError(f"data {dataset.name}: the dataset has no labels and no reference was given, "
                        "so there is nothing to measure")
    result = evaluate_model(model, dataset, reference_path=reference, batch_size=batch_size,
                            threads=threads, progress=progress, metrics=metrics, labels=labels, charset=charset,
                            runtime=runtime, ep=ep, noise_floor=noise_floor)
    return EvalResult.from_dict(result)


# -- export and inspect -------------------------------------------------------------------------------

def export(model: Any, output: PathLike, *, input_shape: Sequence[int] | None = None, dynamic_batch: bool = False,
           opset: int | None = None, weights: PathLike | None = None, pretrained: bool | None = None,
           tolerance: float = 1e-4, exporter: str = "auto", seed: int = 0):
    """Export a PyTorch model to one self-contained .onnx file, checked against torch.

    ``model`` is a reference model name (``deployopt.models.NAMES``), ``"package.module:callable"``
    (imported and run: only code you trust) or an ``nn.Module``. Needs the ``torch`` extra.
    Returns ``deployopt.models.export.ExportResult``.
    """
    from deployopt import models
    from deployopt.core import io

    models.require_torch("export")
    from deployopt.models.export import export_model

    io.check_output_path(output, inputs=[weights] if weights is not None else [])

    if isinstance(model, str):
        kwargs = {} if pretrained is None else {"pretrained": pretrained}
        module = models.resolve(model, seed=seed, **kwargs)
    else:
        module = model
    if weights is not None:
        models.load_weights(module, weights)
    if input_shape is None:
        if not getattr(module, "default_input_shape", None):
            raise UserError("input_shape: required for a model without default_input_shape")
        input_shape = tuple(module.default_input_shape)
    return export_model(module, output, tuple(input_shape), dynamic_batch=dynamic_batch, opset=opset,
                        tolerance=tolerance, seed=seed, exporter=exporter)


def inspect(model: PathLike) -> dict[str, Any]:
    """Statistics of an ONNX model (the keys of ``inspect --json``): opset, inputs/outputs, op
    histogram, params and non-zero params, MACs per layer and in total, bytes, zipped bytes, and
    ``metrics``: a suggested task metric per output from the output shapes."""
    from deployopt.core import io, stats

    result = stats.model_stats(io.load_proto(model), path=str(model))
    result["metrics"] = stats.suggest_metrics(result["outputs"])
    return result
