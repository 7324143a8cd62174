"""YAML recipe -> validated ``Recipe``.

Everything is checked before any work starts: unknown keys, wrong types and out-of-range values
raise ``UserError`` whose message names the place, e.g.
``passes[3].quantize.calibration: 'minmx' is not one of minmax, percentile, entropy, distribution``.
Pass parameters are validated by the pass classes themselves (their dataclass fields and
``validate()``), so the recipe layer only knows the pass contract, not any pass.

``--set KEY=VALUE`` overrides use the same paths: ``passes[1].prune.sparsity=0.7``,
``gates.min_speedup=2``, ``benchmark.threads=[1,2]``; VALUE is parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import types
import typing
from typing import Any

import yaml

from deployopt.core.errors import UserError

TOP_KEYS = ("model", "data", "passes", "benchmark", "gates", "seed")
# calibration: passes that calibrate or reconstruct; evaluation: accuracy (labels) and agreement;
# training: distillation (defaults to calibration); fidelity: an extra unlabeled set on which the
# output's agreement with the input model is measured (e.g. many natural-photo crops).
DATA_KEYS = ("calibration", "evaluation", "training", "fidelity")
EXPORT_KEYS = ("export", "input_shape", "dynamic_batch", "weights", "opset", "pretrained", "kwargs",
               "tolerance")


@dataclasses.dataclass
class BenchmarkSettings:
    enabled: bool = True
    threads: list[int] = dataclasses.field(default_factory=lambda: [1])
    batch: list[int] = dataclasses.field(default_factory=lambda: [1])
    warmup: int = 10
    runs: int = 100
    rounds: int = 3
    timeout: float | None = None  # seconds per worker; None = no limit

    def validate(self) -> None:
        for key in ("threads", "batch"):
            values = getattr(self, key)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise UserError(f"{key}: {values!r} must be a non-empty list of integers >= 1")
        for key, low in (("warmup", 0), ("runs", 1), ("rounds", 1)):
            if getattr(self, key) < low:
                raise UserError(f"{key}: {getattr(self, key)!r} must be >= {low}")
        if self.timeout is not None and self.timeout <= 0:
            raise UserError(f"timeout: {self.timeout!r} must be > 0 seconds")


@dataclasses.dataclass
class Gates:
    max_accuracy_drop: float | None = None  # absolute top-1 drop (or 1 - agreement when unlabeled)
    min_speedup: float | None = None  # p50(input) / p50(output), worst over the benchmark grid
    max_size_mb: float | None = None  # output model file size in MB (10^6 bytes)

    def validate(self) -> None:
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 1:
            raise UserError(f"max_accuracy_drop: {self.max_accuracy_drop!r} is outside [0, 1]")
        for key in ("min_speedup", "max_size_mb"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise UserError(f"{key}: {value!r} must be > 0")

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


# -- type checking of plain YAML values against dataclass annotations -----------------------------

def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_matches(v, inner) for v in value)
    if origin is dict:
        key_t, val_t = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(
            _matches(k, key_t) and _matches(v, val_t) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def build_dataclass(cls: type, values: Any, where: str, extra_prefix: str = "") -> Any:
    """Instantiate ``cls`` from a YAML mapping, with errors that name ``where.key``."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in fields:
            allowed = ", ".join(list(fields) + (["min_step_speedup"] if hasattr(cls, "call") else [])) \
                or "no settings"
            raise UserError(f"{where}.{key}: unknown key (allowed: {allowed})")
        hint = hints.get(key, Any)
        if key in ("threads", "batch") and isinstance(value, int) and not isinstance(value, bool):
            value = [value]
            values[key] = value
        if not _matches(value, hint):
            raise UserError(f"{where}.{key}: expected {_type_name(hint)}, got {value!r}")
    try:
        obj = cls(**values)
        if hasattr(obj, "validate") and not hasattr(cls, "call"):  # passes validate in __post_init__
            obj.validate()
    except UserError as e:
        message = str(e)
        raise UserError(f"{where}.{message}" if not message.startswith(where) else message) from e
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from e
    return obj


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


# The step guard: a step whose output is slower than its input by this ratio is reverted.
# Every pass accepts `min_step_speedup`; only quantize has it on by default (int8 that the CPU does
# not fuse is slower than float, and that is the most common surprise with int8 tools).
STEP_GUARD_DEFAULTS = {"quantize": 1.0}


def _pop_step_guard(name: str, settings: dict[str, Any], where: str) -> float | None:
    value = settings.pop("min_step_speedup", STEP_GUARD_DEFAULTS.get(name))
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise UserError(f"{where}.min_step_speedup: expected a number > 0 or null, got {value!r}")
    return None if value is None else float(value)


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
        guard = _pop_step_guard(name, settings, where) if isinstance(settings, dict) else None
        student = settings.get("student") if isinstance(settings, dict) else None
        if isinstance(student, dict) and isinstance(student.get("onnx"), str) and base is not None:
            settings["student"] = {**student, "onnx": str(base / student["onnx"])}  # relative to the recipe
        step = build_dataclass(REGISTRY[name], settings, where)
        step.min_step_speedup = guard  # read by the pipeline, not by the pass
        built.append(step)
    return built


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
        benchmark=build_dataclass(BenchmarkSettings, dict(raw.get("benchmark") or {}), "benchmark"),
        gates=build_dataclass(Gates, dict(raw.get("gates") or {}), "gates"),
        seed=seed,
        raw=raw,
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
