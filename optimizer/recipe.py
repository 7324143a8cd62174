"""YAML recipe -> validated ``Recipe``.

Everything is checked before any work starts: unknown keys, wrong types and out-of-range values
raise ``UserError`` whose message names the place, e.g.
``passes[3].quantize.calibration: 'minmx' is not one of minmax, percentile, entropy, distribution``.
Every section is a settings dataclass (``deployopt.core.settings``): pass parameters are the
pass classes' own typed fields, so the recipe layer only knows the pass contract, not any pass.

``--set KEY=VALUE`` overrides use the same paths: ``passes[1].prune.sparsity=0.7``,
``gates.min_speedup=2``, ``benchmark.threads=[1,2]``, ``shapes.input1=[1,1,64,224]``,
``metrics.output=detection``; VALUE is parsed as YAML.

``metrics`` names the task metric of each model output, in the forms of
``deployopt.measure.tasks.choose`` (``{OUTPUT: KIND}``, ``{OUTPUT: {kind: KIND, ...settings}}``, a
spec string or a list of them); every accuracy decision of the run (gates, per-step accuracy,
quantize's fallback and latency trials, distillation) is judged by them
(``deployopt.measure.judge``). Output names are checked once the model is loaded; a relative
``charset`` resolves against the recipe's folder.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Literal

import yaml

from deployopt.core.errors import UserError
from deployopt.core.settings import Bounds, Settings, build_settings, check_value, setting

TOP_KEYS = ("model", "data", "passes", "benchmark", "gates", "seed", "shapes", "metrics")
# calibration: passes that calibrate or reconstruct; evaluation: accuracy (labels) and agreement;
# training: distillation (defaults to calibration); fidelity: an extra unlabeled set on which the
# output's agreement with the input model is measured (e.g. many natural-photo crops).
DATA_KEYS = ("calibration", "evaluation", "training", "fidelity")
EXPORT_KEYS = ("export", "input_shape", "dynamic_batch", "weights", "opset", "pretrained", "kwargs",
               "tolerance")


@dataclasses.dataclass
class BenchmarkSettings(Settings):
    enabled: bool = True
    threads: list[int] = setting(default_factory=lambda: [1], low=1, min_len=1)
    batch: list[int] = setting(default_factory=lambda: [1], low=1, min_len=1)
    warmup: int = setting(10, low=0)
    runs: int = setting(100, low=1)
    rounds: int = setting(3, low=1)
    timeout: float | None = setting(None, low=0, low_open=True)  # seconds per worker; None = no limit
    # The target every latency number of the run is measured on (benchmark, step guards,
    # latency-aware quantization): deployopt.measure.runtime.
    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"
    ep: str | None = None  # onnxruntime execution provider (default CPUExecutionProvider)

    def validate(self) -> None:
        from deployopt.measure.runtime import check_target

        check_target(self.runtime, self.ep, key="runtime", ep_key="ep")  # available here, or refused


@dataclasses.dataclass
class Gates(Settings):
    # the largest drop of any task metric vs the input model (deployopt.measure.judge): top-1 for a
    # labelled classifier, 1 - agreement when unlabelled
    max_accuracy_drop: float | None = setting(None, low=0, high=1)
    min_speedup: float | None = setting(None, low=0, low_open=True)  # p50(input) / p50(output), worst over the grid
    max_size_mb: float | None = setting(None, low=0, low_open=True)  # output model file size in MB (10^6 bytes)

    def active(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class Recipe:
    path: pathlib.Path | None
    model: str | dict[str, Any]  # a file path (resolved against the recipe's folder) or export spec
    data: dict[str, Any]
    passes: list[Any]  # pass instances, in order
    benchmark: BenchmarkSettings
    gates: Gates
    seed: int
    raw: dict[str, Any]  # the recipe after overrides, as written to report.json
    # Full shapes of model inputs by name, for dims neither the model nor the data fixes (the
    # width of a text-line recognizer fed random inputs); checked against the model on load.
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # Task metric specs (deployopt.measure.tasks.MetricSpec); empty: the defaults per output.
    metrics: list[Any] = dataclasses.field(default_factory=list)


# -- overrides -------------------------------------------------------------------------------------

_PATH_TOKEN = re.compile(r"([A-Za-z_][\w-]*)|\[(\d+)\]")


def _split_path(path: str) -> list[str | int]:
    tokens: list[str | int] = []
    pos = 0
    for m in _PATH_TOKEN.finditer(path):
        gap = path[pos:m.start()]
        if gap not in ("", "."):
            raise UserError(f"--set {path}: cannot parse the key path")
        tokens.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if not tokens or pos != len(path):
        raise UserError(f"--set {path}: cannot parse the key path")
    return tokens


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``KEY=VALUE`` to the raw recipe mapping (VALUE parsed as YAML)."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: expected KEY=VALUE")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"--set {key}: value is not valid YAML") from e
    tokens = _split_path(key.strip())
    node: Any = raw
    for i, token in enumerate(tokens[:-1]):
        where = key.split("=")[0]
        if isinstance(token, int):
            if not isinstance(node, list) or token >= len(node):
                raise UserError(f"--set {where}: index [{token}] does not exist")
            node = node[token]
        else:
            if not isinstance(node, dict):
                raise UserError(f"--set {where}: '{token}' is not a mapping")
            if token not in node or node[token] is None:
                # passes[i].NAME must name the pass that is there
                if i > 0 and isinstance(tokens[i - 1], int):
                    raise UserError(f"--set {where}: that step is not a '{token}' pass")
                node[token] = {}
            node = node[token]
    last = tokens[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise UserError(f"--set {key}: index [{last}] does not exist")
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: '{last}' is not a mapping")
        node[last] = value


# -- loading ---------------------------------------------------------------------------------------

def _validate_data(data: Any, base: pathlib.Path | None) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"data: expected a mapping with keys {', '.join(DATA_KEYS)}")
    from deployopt.core import data as data_module

    for key, spec in data.items():
        if key not in DATA_KEYS:
            raise UserError(f"data.{key}: unknown key (allowed: {', '.join(DATA_KEYS)})")
        validate = getattr(data_module, "validate_spec", None)
        if validate is not None:
            try:
                validate(spec)
            except UserError as e:
                raise UserError(f"data.{key}.{e}" if not str(e).startswith("data.") else str(e)) from e
    return dict(data)


def _validate_model(model: Any, base: pathlib.Path | None) -> str | dict[str, Any]:
    if isinstance(model, str):
        path = pathlib.Path(model)
        if base is not None and not path.is_absolute():
            path = base / path
        return str(path)
    if isinstance(model, dict):
        if "export" not in model:
            raise UserError("model: expected a file path or a mapping with 'export: NAME'")
        for key in model:
            if key not in EXPORT_KEYS:
                raise UserError(f"model.{key}: unknown key (allowed: {', '.join(EXPORT_KEYS)})")
        if not isinstance(model["export"], str):
            raise UserError(f"model.export: expected a model name or module:callable, got {model['export']!r}")
        shape = model.get("input_shape")
        if shape is not None and (not isinstance(shape, list) or not shape or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
            raise UserError(f"model.input_shape: expected a list of positive integers, got {shape!r}")
        spec = dict(model)
        if spec.get("weights") and base is not None and not pathlib.Path(spec["weights"]).is_absolute():
            spec["weights"] = str(base / spec["weights"])
        return spec
    raise UserError("model: missing; give a .onnx path or {export: NAME, input_shape: [...]}")


def _build_passes(entries: Any, base: pathlib.Path | None = None) -> list[Any]:
    from deployopt.passes import REGISTRY

    if entries is None:
        return []
    if not isinstance(entries, list):
        raise UserError("passes: expected a list of steps like '- cleanup: {}'")
    built = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise UserError(f"passes[{i}]: expected one mapping 'NAME: {{settings}}'")
        (name, settings), = entry.items()
        if name not in REGISTRY:
            raise UserError(f"passes[{i}].{name}: unknown pass (available: {', '.join(REGISTRY)})")
        where = f"passes[{i}].{name}"
        settings = dict(settings) if isinstance(settings, dict) else settings
        student = settings.get("student") if isinstance(settings, dict) else None
        if isinstance(student, dict) and isinstance(student.get("onnx"), str) and base is not None:
            settings["student"] = {**student, "onnx": str(base / student["onnx"])}  # relative to the recipe
        built.append(build_settings(REGISTRY[name], settings, where))
    return built


def _validate_shapes(shapes: Any) -> dict[str, list[int]]:
    if shapes is None:
        return {}
    check_value("shapes", shapes, dict[str, list[int]])
    for name, dims in shapes.items():
        check_value(f"shapes.{name}", dims, list[int], Bounds(low=1, min_len=1))
    return {name: list(dims) for name, dims in shapes.items()}


def _validate_metrics(metrics: Any, base: pathlib.Path | None) -> list[Any]:
    """Metric specs, checked without the model; a relative ``charset`` follows the recipe's folder."""
    from deployopt.measure.tasks import KINDS, metric_specs

    specs = metric_specs(metrics, "metrics")
    for spec in specs:
        charset = spec.options.get("charset")
        if isinstance(charset, str) and base is not None and not pathlib.Path(charset).is_absolute():
            spec.options["charset"] = str(base / charset)
        if not spec.custom:  # the kind's settings: types and bounds, before any work
            where = f"metrics.{','.join(spec.outputs)}" if spec.outputs else "metrics"
            build_settings(KINDS[spec.kind][1], spec.options, where)
    return specs


def _scalar_lists(benchmark: Any) -> Any:
    """``threads: 2`` means ``threads: [2]`` (and the same for ``batch``)."""
    if not isinstance(benchmark, dict):
        return benchmark
    return {k: [v] if k in ("threads", "batch") and isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in benchmark.items()}


def from_mapping(raw: Any, path: pathlib.Path | None = None) -> Recipe:
    where = str(path) if path else "recipe"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping at the top level")
    for key in raw:
        if key not in TOP_KEYS:
            raise UserError(f"{key}: unknown top-level key (allowed: {', '.join(TOP_KEYS)})")
    base = path.parent if path else None
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed: expected an integer >= 0, got {seed!r}")
    return Recipe(
        path=path,
        model=_validate_model(raw.get("model"), base),
        data=_validate_data(raw.get("data"), base),
        passes=_build_passes(raw.get("passes"), base),
        benchmark=build_settings(BenchmarkSettings, _scalar_lists(raw.get("benchmark")), "benchmark"),
        gates=build_settings(Gates, raw.get("gates"), "gates"),
        seed=seed,
        raw=raw,
        shapes=_validate_shapes(raw.get("shapes")),
        metrics=_validate_metrics(raw.get("metrics"), base),
    )


def load_recipe(path: str | pathlib.Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))  # safe: a recipe never runs code
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{at}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the recipe: {e}") from e
    if raw is None:
        raise UserError(f"{path}: the recipe is empty")
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return from_mapping(raw, path)
    except UserError as e:
        raise UserError(f"{path}: {e}") from e
