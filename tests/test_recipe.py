"""Recipe validation: every error names the step and the key; --set overrides."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
import yaml

from deployopt import passes
from deployopt.core.errors import UserError
from deployopt.recipe import apply_override, from_mapping, load_recipe
from deployopt.core.settings import setting
from deployopt.passes.base import DeployInPlacePass


@dataclasses.dataclass
class FakePrune(DeployInPlacePass):
    name = "fakeprune"
    sparsity: float = setting(0.5, low=0, high=1, high_open=True)
    scope: Literal["layer", "global"] = "layer"
    exclude: list[str] = dataclasses.field(default_factory=list)
    reconstruct: bool = False

    def call(self, model):  # pragma: no cover - never run here
        raise AssertionError


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch):
    monkeypatch.setitem(passes.REGISTRY, "fakeprune", FakePrune)


def _recipe(**changes):
    raw = {"model": "m.onnx", "passes": [{"fakeprune": {"sparsity": 0.3}}],
           "benchmark": {"threads": [1, 2], "runs": 10}, "gates": {"min_speedup": 1.5}}
    raw.update(changes)
    return raw


def test_valid_recipe_builds_passes_and_settings(tmp_path):
    recipe = from_mapping(_recipe(), tmp_path / "r.yaml")
    assert recipe.model == str(tmp_path / "m.onnx")  # relative to the recipe's folder
    assert isinstance(recipe.passes[0], FakePrune) and recipe.passes[0].sparsity == 0.3
    assert recipe.benchmark.threads == [1, 2] and recipe.benchmark.runs == 10
    assert recipe.gates.active() == {"min_speedup": 1.5}


@pytest.mark.parametrize("changes, message", [
    ({"passes": [{"nosuchpass": {}}]}, r"passes\[0\].nosuchpass: unknown pass \(available: .*fakeprune"),
    ({"passes": [{"fakeprune": {"sparsty": 0.3}}]},
     r"passes\[0\].fakeprune.sparsty: unknown key \(allowed: min_step_speedup, sparsity, scope, exclude, reconstruct\)"),
    ({"passes": [{"fakeprune": {"sparsity": "high"}}]}, r"passes\[0\].fakeprune.sparsity: expected float, got 'high'"),
    ({"passes": [{"fakeprune": {"sparsity": 1.5}}]}, r"passes\[0\].fakeprune.sparsity: 1.5 is outside \[0, 1\)"),
    ({"passes": [{"fakeprune": {"scope": "globl"}}]},
     r"passes\[0\].fakeprune.scope: 'globl' is not one of layer, global"),
    ({"passes": [{"fakeprune": {"reconstruct": "yes"}}]}, r"passes\[0\].fakeprune.reconstruct: expected bool"),
    ({"passes": [{"fakeprune": {"exclude": "conv1"}}]}, r"passes\[0\].fakeprune.exclude: expected list\[str\]"),
    ({"benchmark": {"threads": [0]}}, r"benchmark.threads: 0 is outside \[1, inf\)"),
    ({"benchmark": {"rnus": 3}}, r"benchmark.rnus: unknown key"),
    ({"gates": {"min_speedup": -1}}, r"gates.min_speedup: -1 is outside \(0, inf\)"),
    ({"gates": {"max_accuracy_drop": 2}}, r"gates.max_accuracy_drop: 2 is outside \[0, 1\]"),
    ({"extra": 1}, r"extra: unknown top-level key"),
    ({"model": {"export": "resnet18", "input_shap": [1, 3, 224, 224]}}, r"model.input_shap: unknown key"),
    ({"model": {"export": "resnet18", "input_shape": [1, 0]}}, r"model.input_shape: expected a list of positive"),
    ({"model": None}, r"model: missing"),
    ({"seed": -3}, r"seed: expected an integer >= 0"),
])
def test_errors_name_the_step_and_key(tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        from_mapping(_recipe(**changes), tmp_path / "r.yaml")


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [\n  - {cleanup: \n")
    with pytest.raises(UserError, match=r"bad.yaml: not valid YAML \(line \d+\)"):
        load_recipe(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(UserError, match="the recipe is empty"):
        load_recipe(empty)


def test_yaml_is_parsed_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(evil)


def test_set_overrides_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe()))
    recipe = load_recipe(path, ["passes[0].fakeprune.sparsity=0.7", "gates.max_size_mb=10",
                                "benchmark.threads=[1]"])
    assert recipe.passes[0].sparsity == 0.7
    assert recipe.gates.max_size_mb == 10
    assert recipe.benchmark.threads == [1]
    with pytest.raises(UserError, match=r"passes\[0\].fakeprune.sparsity: 0.99 is not|outside"):
        load_recipe(path, ["passes[0].fakeprune.sparsity=1.2"])


@pytest.mark.parametrize("assignment, message", [
    ("passes[5].fakeprune.sparsity=0.1", r"index \[5\] does not exist"),
    ("passes[0].quantize.samples=3", "that step is not a 'quantize' pass"),
    ("novalue", "expected KEY=VALUE"),
    ("a..b=1", "cannot parse the key path"),
])
def test_set_errors(assignment, message):
    with pytest.raises(UserError, match=message):
        apply_override(_recipe(), assignment)
