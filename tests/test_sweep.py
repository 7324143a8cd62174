"""Sweeps: trials from a grid or optuna, the shared step cache, best/ per target, exit codes, and
the Ray engine on a simulated two-node cluster (inside a private network namespace)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from benchmarks.tiny_resnet import export_tiny_resnet
from deployopt.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
SWEEP_KEYS = {"version", "machine", "sweep", "models", "space", "search", "engine", "workers", "targets",
              "cache", "seconds", "trials", "best", "closest", "exit_code", "reason"}
ROW_KEYS = {"trial", "dir", "model", "settings", "status", "exit_code", "reason", "p50_ms", "speedup", "metric",
            "metric_value", "drop", "score", "size_mb", "gate_miss", "cache", "targets"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two tiny ResNets (seeds 0 and 1) and a fast base recipe: cleanup then magnitude pruning,
    a 5-run benchmark, top-1 on 60 digits."""
    root = tmp_path_factory.mktemp("sweep")
    export_tiny_resnet(root / "a.onnx", seed=0)
    export_tiny_resnet(root / "b.onnx", seed=1)
    recipe = {
        "model": "a.onnx",
        "data": {"evaluation": "digits?split=test&limit=60"},
        "passes": [{"cleanup": {}}, {"prune": {"sparsity": 0.3}}],
        "benchmark": {"threads": [1], "batch": [1], "warmup": 1, "runs": 5, "rounds": 1},
        "gates": {"max_accuracy_drop": 1.0},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _write_sweep(root: pathlib.Path, name: str, **sweep) -> pathlib.Path:
    path = root / name
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", **sweep}))
    return path


def _digest(path: pathlib.Path) -> bytes:
    return path.read_bytes()


def test_grid_sweep_end_to_end(workspace, tmp_path, capsys):
    sweep = _write_sweep(workspace, "grid.yaml", models=["a.onnx", "b.onnx"],
                         space={"passes[1].prune.sparsity": [0.3, 0.6]}, workers=2)
    before = {p.name: p.read_bytes() for p in (workspace / "a.onnx", workspace / "b.onnx", sweep)}
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert "| trial | model | passes[1].prune.sparsity |" in printed.out
    doc = json.loads((out / "sweep.json").read_text())
    assert SWEEP_KEYS <= set(doc)
    assert doc["targets"] == ["local"] and doc["exit_code"] == 0 and doc["reason"] is None
    assert [r["trial"] for r in doc["trials"]] == ["000", "001", "002", "003"]
    assert [(r["model"], r["settings"]["passes[1].prune.sparsity"]) for r in doc["trials"]] == [
        ("a", 0.3), ("a", 0.6), ("b", 0.3), ("b", 0.6)]
    for row in doc["trials"]:
        assert ROW_KEYS <= set(row)
        report = json.loads((out / row["dir"] / "report.json").read_text())
        assert row["status"] == "met" and row["exit_code"] == report["exit_code"] == 0
        assert row["metric"] == report["accuracy"]["metric"] == "top1"
        assert row["drop"] == pytest.approx(report["accuracy"]["drop"])
        output = [b for b in report["benchmark"] if b["model"] == "output"][0]
        assert row["p50_ms"] == pytest.approx(output["p50_ms"]) and row["speedup"] == pytest.approx(output["speedup"])
        assert row["size_mb"] == pytest.approx(report["output"]["bytes"] / 1e6)
        assert report["recipe"]["passes"][1]["prune"]["sparsity"] == row["settings"]["passes[1].prune.sparsity"]
        assert row["gate_miss"] == 0 and row["targets"]["local"]["met"] is True
    # the fastest trial that meets the gates, copied with its report
    best = min(doc["trials"], key=lambda r: (r["p50_ms"], r["trial"]))
    assert doc["best"] == {"local": best["trial"]}
    assert (out / "best" / "model.onnx").read_bytes() == (out / best["dir"] / "model.onnx").read_bytes()
    assert json.loads((out / "best" / "report.json").read_text()) == json.loads(
        (out / best["dir"] / "report.json").read_text())
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"best: trial {best['trial']}" in (out / "sweep.md").read_text()
    # the trials of one model share its cleanup step: exactly one of each pair computed it
    for pair in (doc["trials"][:2], doc["trials"][2:]):
        hits = [json.loads((out / r["dir"] / "report.json").read_text())["steps"][0]["details"]["cache"]["hit"]
                for r in pair]
        assert sorted(hits) == [False, True]
    assert doc["cache"]["hits"] == 2 and doc["cache"]["misses"] == 6
    assert {p.name: p.read_bytes() for p in (workspace / "a.onnx", workspace / "b.onnx", sweep)} == before

    # gates nobody meets: exit 1, no best/, sweep.md names the closest trial
    failing = _write_sweep(workspace, "strict.yaml", models=["a.onnx"],
                           space={"gates.max_size_mb": [0.0001, 0.001], "benchmark.enabled": [False]}, workers=2)
    out2 = tmp_path / "strict"
    assert main(["sweep", str(failing), "-o", str(out2)]) == 1
    assert "deployopt: failed: no trial meets the gates; closest: trial 001" in capsys.readouterr().err
    doc2 = json.loads((out2 / "sweep.json").read_text())
    assert doc2["best"] == {"local": None} and doc2["closest"] == {"local": "001"} and doc2["exit_code"] == 1
    assert [r["status"] for r in doc2["trials"]] == ["missed", "missed"]
    assert doc2["trials"][1]["gate_miss"] < doc2["trials"][0]["gate_miss"]
    assert not (out2 / "best").exists()
    assert "no trial meets the gates; closest: trial 001" in (out2 / "sweep.md").read_text()


def test_trials_or_best_folders_are_replaced_only_when_a_sweep_wrote_them(workspace, tmp_path, capsys):
    sweep = _write_sweep(workspace, "one.yaml", models=["a.onnx"], space={"benchmark.enabled": [False]}, workers=1)
    mine = tmp_path / "mine"
    (mine / "best").mkdir(parents=True)
    (mine / "best" / "notes.txt").write_text("the user's")
    assert main(["sweep", str(sweep), "-o", str(mine)]) == 2
    assert capsys.readouterr().err == (f"deployopt: error: {mine / 'best'}: exists and no earlier sweep wrote it; "
                                       "choose a new or empty output folder\n")
    assert (mine / "best" / "notes.txt").read_text() == "the user's"
    # an interrupted sweep's folder (its mark, trials/, no sweep.json yet): a rerun replaces its trials
    interrupted = tmp_path / "interrupted"
    (interrupted / "trials" / "009").mkdir(parents=True)
    (interrupted / ".deployopt-sweep").touch()
    assert main(["sweep", str(sweep), "-o", str(interrupted)]) == 0
    assert sorted(p.name for p in (interrupted / "trials").iterdir()) == ["000"]


def _run(workspace, out, passes, *, cache):
    from deployopt import pipeline
    from deployopt.recipe import from_mapping

    raw = yaml.safe_load((workspace / "recipe.yaml").read_text())
    raw.update(passes=passes, benchmark={"enabled": False})
    recipe = from_mapping(raw, workspace / "recipe.yaml")
    return pipeline.run(recipe, out, cache=cache)


def _steps_without_timing(report_path: pathlib.Path) -> list[dict]:
    steps = json.loads(report_path.read_text())["steps"]
    for step in steps:
        step.pop("seconds")
        step["details"].pop("cache", None)
        step["notes"] = [n for n in step["notes"] if "step cache" not in n]
    return steps


def test_step_cache_reuses_prefix_and_recomputes_corrupt_entries(workspace, tmp_path):
    from deployopt.cache import StepCache

    folder = tmp_path / "cache"
    plain = _run(workspace, tmp_path / "plain", [{"cleanup": {}}, {"prune": {"sparsity": 0.3}}], cache=None)
    _run(workspace, tmp_path / "first", [{"cleanup": {}}, {"prune": {"sparsity": 0.6}}], cache=StepCache(folder))
    cache = StepCache(folder)
    second = _run(workspace, tmp_path / "second", [{"cleanup": {}}, {"prune": {"sparsity": 0.3}}], cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)  # cleanup restored, the other prune computed
    steps = json.loads((tmp_path / "second" / "report.json").read_text())["steps"]
    assert steps[0]["details"]["cache"]["hit"] is True
    assert any(n.startswith("restored from the step cache") for n in steps[0]["notes"])
    assert steps[1]["details"]["cache"]["hit"] is False
    # the same model and the same report as the run without a cache, apart from timings
    assert (tmp_path / "second" / "model.onnx").read_bytes() == (tmp_path / "plain" / "model.onnx").read_bytes()
    assert _steps_without_timing(tmp_path / "second" / "report.json") == _steps_without_timing(
        tmp_path / "plain" / "report.json")
    assert second.exit_code == plain.exit_code == 0

    # a corrupt entry is not trusted: recomputed, said in the step's notes and the report's warnings
    key = steps[0]["details"]["cache"]["key"]
    entry = folder / "steps" / key[:2] / key / "model.onnx"
    entry.write_bytes(entry.read_bytes()[:100])
    cache = StepCache(folder)
    _run(workspace, tmp_path / "third", [{"cleanup": {}}, {"prune": {"sparsity": 0.3}}], cache=cache)
    report = json.loads((tmp_path / "third" / "report.json").read_text())
    assert report["steps"][0]["details"]["cache"]["hit"] is False
    message = (f"passes[0].cleanup: step cache entry {key[:12]} not used (model.onnx does not match the hash "
               "stored in entry.json); recomputed")
    assert message in report["warnings"] and message in report["steps"][0]["notes"]
    assert (tmp_path / "third" / "model.onnx").read_bytes() == (tmp_path / "plain" / "model.onnx").read_bytes()
    assert StepCache(folder)._load_step(entry.parent).step is not None  # the entry was rewritten whole


@pytest.mark.parametrize("key, message", [
    ("passes[3].prune.sparsity", "space.passes[3].prune.sparsity: no such recipe path (index [3] does not exist)"),
    ("passes[0].prune.sparsity", "space.passes[0].prune.sparsity: no such recipe path (that step is not a "
                                 "'prune' pass)"),
    ("passes[1].prune.sparsty", "space.passes[1].prune.sparsty: unknown key (allowed: min_step_speedup, sparsity,"),
    ("gates.min_sped", "space.gates.min_sped: unknown key"),
])
def test_bad_space_key_exits_2_naming_it(workspace, tmp_path, capsys, key, message):
    sweep = _write_sweep(workspace, "bad.yaml", space={key: [0.5]})
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deployopt: error: {sweep}: {message}") and err.count("\n") == 1
    assert not (out / "trials").exists() and not (out / "sweep.json").exists()


def test_bad_values_and_missing_extras_are_one_line_errors(workspace, tmp_path, capsys, monkeypatch):
    sweep = _write_sweep(workspace, "value.yaml", space={"passes[1].prune.sparsity": [0.5, 1.5]})
    assert main(["sweep", str(sweep), "-o", str(tmp_path / "v")]) == 2
    assert capsys.readouterr().err == f"deployopt: error: {sweep}: space.passes[1].prune.sparsity: 1.5 is outside [0, 1)\n"
    assert main(["sweep", str(sweep), "-o", str(tmp_path / "w"), "--workers", "0"]) == 2
    assert capsys.readouterr().err == "deployopt: error: --workers: 0 is not an integer >= 1\n"
    random = _write_sweep(workspace, "random.yaml", space={"passes[1].prune.sparsity": [0.3, 0.5]},
                          search={"strategy": "tpe", "trials": 2})
    monkeypatch.setitem(sys.modules, "optuna", None)
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["sweep", str(random), "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == ("deployopt: error: search.strategy random/tpe needs optuna, which is not "
                                       "installed: pip install 'deployopt[sweep]'\n")
    grid = _write_sweep(workspace, "grid1.yaml", space={"passes[1].prune.sparsity": [0.3]})
    assert main(["sweep", str(grid), "-o", str(tmp_path / "y"), "--engine", "ray"]) == 2
    assert capsys.readouterr().err == ("deployopt: error: engine ray needs Ray, which is not installed: "
                                       "pip install 'deployopt[ray]'\n")


def test_unreachable_ray_address_is_one_line_exit_2_without_hanging(workspace, tmp_path, capsys):
    import socket
    import time

    with socket.socket() as s:  # a loopback port nothing listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    grid = _write_sweep(workspace, "grid2.yaml", space={"passes[1].prune.sparsity": [0.3]})
    start = time.monotonic()
    assert main(["sweep", str(grid), "-o", str(tmp_path / "z"), "--address", f"127.0.0.1:{port}"]) == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err
    assert err.startswith(f"deployopt: error: --address 127.0.0.1:{port}: cannot connect to a Ray cluster there")
    assert err.count("\n") == 1


def test_random_search_draws_distinct_trials_within_the_budget(workspace, tmp_path):
    from deployopt.sweeps.search import Proposer
    from deployopt.sweeps.spec import load_sweep

    space = {"passes[1].prune.sparsity": [0.2, 0.3, 0.4], "passes[1].prune.scope": ["layer", "global"]}
    path = _write_sweep(workspace, "random.yaml", models=["a.onnx"], space=space,
                        search={"strategy": "random", "trials": 4, "seed": 3})

    def draw(spec):
        proposer, drawn = Proposer(spec), []
        while (trial := proposer.ask()) is not None:
            drawn.append((trial.settings["passes[1].prune.sparsity"], trial.settings["passes[1].prune.scope"]))
            proposer.tell(trial, -1.0)
        return drawn

    drawn = draw(load_sweep(path))
    assert len(drawn) == 4 == len(set(drawn))
    assert all(s in space["passes[1].prune.sparsity"] and c in space["passes[1].prune.scope"] for s, c in drawn)
    assert draw(load_sweep(path)) == drawn  # the seed fixes the draw
    # a budget larger than the space ends when the space is exhausted
    spec = load_sweep(path)
    spec.search.trials = 20
    assert sorted(draw(spec)) == sorted((s, c) for s in space["passes[1].prune.sparsity"] for c in space["passes[1].prune.scope"])

    # end to end through the API: the sampled trials run, within the budget (no benchmark: fast)
    import deployopt

    quick = _write_sweep(workspace, "random2.yaml", models=["a.onnx"],
                         space={**space, "benchmark.enabled": [False]}, search={"strategy": "random", "trials": 2})
    drawn = draw(load_sweep(quick))
    result = deployopt.sweep(quick, tmp_path / "out", workers=2)
    assert result.exit_code == 0 and len(result.trials) == 2
    assert [(r["settings"]["passes[1].prune.sparsity"], r["settings"]["passes[1].prune.scope"])
            for r in result.trials] == drawn
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["search"] == {
        "strategy": "random", "trials": 2, "seed": 0}


RAY_DRIVER = """
import json, sys
import ray
from ray.cluster_utils import Cluster
import deployopt

sweep, out = json.loads(sys.argv[1]), sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"bench_slot": 1, "node_a": 1}})
second = cluster.add_node(num_cpus=1, resources={"bench_slot": 1, "node_b": 1})
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
nodes = {"a": cluster.head_node.node_id, "b": second.node_id}
result = deployopt.sweep(sweep, out, engine="ray")
ray.shutdown()
cluster.shutdown()
print(json.dumps({"exit_code": result.exit_code, "nodes": nodes}))
"""


def test_ray_engine_on_a_two_node_cluster_with_targets(workspace, tmp_path):
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip(f"needs a private network namespace for Ray (unshare -n not permitted: {probe.stderr.strip()})")
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(RAY_DRIVER))
    sweep = {"base": str(workspace / "recipe.yaml"), "models": [str(workspace / "a.onnx")],
             "space": {"passes[1].prune.sparsity": [0.3, 0.6]}, "workers": 2,
             "targets": [{"name": "a", "resources": {"node_a": 1}}, {"name": "b", "resources": {"node_b": 1}}]}
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    command = f"ip link set lo up && {sys.executable} {driver} '{json.dumps(sweep)}' {out}"
    proc = subprocess.run(["unshare", "-n", "sh", "-c", command], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["exit_code"] == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["engine"] == "ray" and doc["targets"] == ["a", "b"]
    assert [r["status"] for r in doc["trials"]] == ["met", "met"]
    for row in doc["trials"]:
        for name in ("a", "b"):
            entry = row["targets"][name]
            assert entry["error"] is None and entry["speedup"] > 0 and entry["met"] is True
            assert entry["node_id"] == outcome["nodes"][name]  # pinned by the target's resource
    assert sum(r["cache"]["hits"] for r in doc["trials"]) == 1  # one trial restored the other's cleanup
    for name in ("a", "b"):
        best = doc["best"][name]
        folder = out / "best" / name
        assert (folder / "model.onnx").read_bytes() == (out / "trials" / best / "model.onnx").read_bytes()
        fastest = min(doc["trials"], key=lambda r: (r["targets"][name]["p50_ms"], r["trial"]))
        assert best == fastest["trial"]
    md = (out / "sweep.md").read_text()
    assert "a speedup | b speedup" in md
