"""The sweep file -> a validated ``SweepSpec`` and the recipe of every trial.

```yaml
base: recipe.yaml              # or the recipe itself as a mapping
models: [a.onnx, {export: resnet_mnist}]   # default: the base recipe's model
space:                         # recipe override paths, as for ``optimize --set``
  passes[1].quantize.calibration: [minmax, percentile]
  passes[0].channel_prune.keep: [0.9, 0.75]
search: {strategy: grid, trials: 12, seed: 0}  # grid | random | tpe
engine: local                  # local | ray
workers: 2
address: null                  # the Ray cluster (engine ray); null starts a local instance
targets:                       # machines to benchmark the candidates on; default: this machine
  - {name: big, resources: {big_node: 1}, threads: [4], batch: [1]}
```

A trial is the base recipe with one model and one value per space key. Every trial's recipe is
built and validated (``apply_override`` then ``from_mapping``) before any work, so a key that
names no recipe path, or a value a pass refuses, is bad input naming the sweep file and the key.
Relative model paths in the sweep file follow the sweep file; the base recipe's own relative
paths (data, weights) follow the base recipe.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import pathlib
from typing import Any, Literal

import yaml

from deployopt.core.errors import UserError
from deployopt.core.settings import Settings, build_settings, setting
from deployopt.recipe import apply_override, from_mapping

TOP_KEYS = ("base", "models", "space", "search", "engine", "workers", "address", "targets")
ENGINES = ("local", "ray")
#: Space combinations validated one by one before any work; above this only each value on its own.
MAX_CHECKED = 4096


@dataclasses.dataclass
class SearchSettings(Settings):
    strategy: Literal["grid", "random", "tpe"] = "grid"
    trials: int | None = setting(None, low=1)  # the budget; grid: at most this many (default: all)
    seed: int = setting(0, low=0)


@dataclasses.dataclass
class Target(Settings):
    """A machine to benchmark on: ``resources``/``labels`` pick its Ray nodes (none: this machine)."""

    name: str = "local"
    resources: dict[str, float] = setting(default_factory=dict)
    labels: dict[str, str] = setting(default_factory=dict)
    threads: list[int] | None = setting(None, low=1, min_len=1)
    batch: list[int] | None = setting(None, low=1, min_len=1)


@dataclasses.dataclass
class Trial:
    index: int
    model: str | dict[str, Any]  # what the trial's recipe names
    model_label: str
    settings: dict[str, Any]  # space key -> value

    @property
    def name(self) -> str:
        return f"{self.index:03d}"


@dataclasses.dataclass
class SweepSpec:
    path: pathlib.Path | None
    base: dict[str, Any]  # the base recipe mapping
    base_path: pathlib.Path | None  # what its relative paths follow
    models: list[str | dict[str, Any]]
    labels: list[str]
    space: dict[str, list[Any]]
    search: SearchSettings
    engine: str
    workers: int
    address: str | None
    targets: list[Target]

    def grid(self) -> list[tuple[int, dict[str, Any]]]:
        """Every (model index, settings) combination, in file order."""
        keys = list(self.space)
        return [(m, dict(zip(keys, values)))
                for m in range(len(self.models)) for values in itertools.product(*self.space.values())]

    def size(self) -> int:
        n = len(self.models)
        for values in self.space.values():
            n *= len(values)
        return n


def _model_label(model: str | dict[str, Any]) -> str:
    if isinstance(model, dict):
        return str(model.get("export", "model")).rsplit(":", 1)[-1]
    return pathlib.Path(model).name.removesuffix(".onnx")


def _labels(models: list[str | dict[str, Any]]) -> list[str]:
    labels, seen = [], {}
    for model in models:
        label = _model_label(model)
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return labels


def _read_yaml(path: pathlib.Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: no such {what} file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}: not valid YAML{f' (line {mark.line + 1})' if mark else ''}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the {what}: {e}") from e


def _base(raw: Any, sweep_path: pathlib.Path | None) -> tuple[dict[str, Any], pathlib.Path | None]:
    folder = sweep_path.parent if sweep_path else None
    if isinstance(raw, str):
        path = pathlib.Path(raw)
        if folder is not None and not path.is_absolute():
            path = folder / path
        base = _read_yaml(path, "recipe")
        if not isinstance(base, dict):
            raise UserError(f"base: {path}: expected a recipe mapping")
        return base, path
    if isinstance(raw, dict):
        # an inline recipe's relative paths follow the sweep file (from_mapping reads them from
        # the folder of the path it is given)
        return copy.deepcopy(raw), sweep_path
    raise UserError("base: expected a recipe mapping or the path of a recipe file")


def _models(raw: Any, base: dict[str, Any], folder: pathlib.Path | None) -> list[str | dict[str, Any]]:
    if raw is None:
        if base.get("model") is None:
            raise UserError("models: missing, and the base recipe names no model")
        return [base["model"]]  # resolved by from_mapping against the base recipe
    if not isinstance(raw, list) or not raw:
        raise UserError("models: expected a non-empty list of model paths or export specs")
    models = []
    for i, model in enumerate(raw):
        if isinstance(model, str):
            path = pathlib.Path(model)
            models.append(str(path if path.is_absolute() or folder is None else (folder / path).resolve()))
        elif isinstance(model, dict):
            models.append(dict(model))
        else:
            raise UserError(f"models[{i}]: expected a .onnx path or {{export: NAME, ...}}, got {model!r}")
    return models


def _space(raw: Any) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError("space: expected a mapping of recipe paths to lists of values")
    space = {}
    for key, values in raw.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"space.{key}: expected a non-empty list of values")
        space[str(key)] = values
    return space


def _targets(raw: Any) -> list[Target]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise UserError("targets: expected a non-empty list of {name, resources, threads, batch}")
    targets = [build_settings(Target, entry, f"targets[{i}]") for i, entry in enumerate(raw)]
    names = [t.name for t in targets]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise UserError(f"targets[{i}].name: '{name}' is used twice")
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"targets[{i}].name: {name!r} is not a folder name")
    return targets


def load_sweep(source: str | os.PathLike | dict[str, Any], *, engine: str | None = None,
               workers: int | None = None, address: str | None = None) -> SweepSpec:
    """Read and validate a sweep (a YAML path or the same mapping); flags override the file."""
    if isinstance(source, dict):
        raw, path = copy.deepcopy(source), None
    else:
        path = pathlib.Path(source)
        raw = _read_yaml(path, "sweep")
    try:
        spec = _parse(raw, path, engine, workers, address)
        check_trials(spec)
    except UserError as e:
        raise UserError(f"{path}: {e}" if path else str(e)) from e
    return spec


def _parse(raw: Any, path: pathlib.Path | None, engine: str | None, workers: int | None,
           address: str | None) -> SweepSpec:
    if not isinstance(raw, dict):
        raise UserError("expected a mapping with keys " + ", ".join(TOP_KEYS))
    for key in raw:
        if key not in TOP_KEYS:
            raise UserError(f"{key}: unknown key (allowed: {', '.join(TOP_KEYS)})")
    folder = path.parent if path else None
    if "base" not in raw:
        raise UserError("base: missing; give a recipe mapping or the path of a recipe file")
    base, base_path = _base(raw["base"], path)
    models = _models(raw.get("models"), base, folder)
    engine = engine or raw.get("engine") or "local"
    if engine not in ENGINES:
        raise UserError(f"engine: {engine!r} is not one of {', '.join(ENGINES)}")
    workers = workers if workers is not None else raw.get("workers", min(4, os.cpu_count() or 1))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers: expected an integer >= 1, got {workers!r}")
    address = address or raw.get("address")
    if address is not None and (engine != "ray" or not isinstance(address, str)):
        raise UserError(f"address: {address!r} is only used with engine ray (a Ray cluster address)")
    targets = _targets(raw.get("targets"))
    if engine == "local":
        for i, target in enumerate(targets):
            if target.resources or target.labels:
                raise UserError(f"targets[{i}].resources: picks Ray nodes; needs engine ray (--engine ray)")
    spec = SweepSpec(path=path, base=base, base_path=base_path, models=models, labels=_labels(models),
                     space=_space(raw.get("space")),
                     search=build_settings(SearchSettings, raw.get("search"), "search"),
                     engine=engine, workers=workers, address=address, targets=targets)
    if spec.search.strategy == "grid" and spec.search.trials is not None and spec.search.trials < spec.size():
        raise UserError(f"search.trials: {spec.search.trials} is fewer than the grid's {spec.size()} "
                        "combinations; use strategy random or tpe to sample a budget")
    return spec


def check_trials(spec: SweepSpec) -> None:
    """Build every trial's recipe (each value alone when the space is too large to enumerate):
    a bad key or value is refused before any work, naming the space key."""
    if spec.size() <= MAX_CHECKED:
        combos = spec.grid()
    else:
        first = {k: v[0] for k, v in spec.space.items()}
        combos = [(m, {**first, key: value}) for m in range(len(spec.models))
                  for key, values in spec.space.items() for value in values]
    for m, settings in combos:
        build_trial_recipe(spec, spec.models[m], settings)


def trial_mapping(spec: SweepSpec, model: str | dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The trial's recipe mapping: the base with the model and one value per space key."""
    raw = copy.deepcopy(spec.base)
    raw["model"] = copy.deepcopy(model)
    for key, value in settings.items():
        try:
            apply_override(raw, f"{key}={json.dumps(value)}")  # JSON is YAML: the value as given
        except UserError as e:
            reason = str(e).removeprefix("--set ").removeprefix(f"{key}: ").removeprefix(f"{key} ")
            raise UserError(f"space.{key}: no such recipe path ({reason})") from e
    return raw


def build_trial_recipe(spec: SweepSpec, model: str | dict[str, Any], settings: dict[str, Any]):
    """The trial's validated ``Recipe``; a bad space key or value is a ``UserError`` naming it."""
    raw = trial_mapping(spec, model, settings)
    try:
        return from_mapping(raw, spec.base_path)
    except UserError as e:
        message = str(e)
        for key in settings:
            if message.startswith(f"{key}:"):  # the recipe names the key itself: say it is the space's
                raise UserError(f"space.{message}") from e
            if key.startswith(message.split(":")[0]):
                raise UserError(f"space.{key}: {message}") from e
        raise UserError(f"base: {message}") from e
