"""Same recipe, data and seed give a byte-identical model.onnx; parallel runs do not interfere."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from benchmarks.tiny_resnet import export_tiny_resnet
from deployopt.cli import main


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    export_tiny_resnet(root / "model.onnx")
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", x=rng.random((48, 1, 8, 8), dtype=np.float32))
    recipe = {"model": "model.onnx", "seed": 7,
              "data": {"calibration": {"dataset": "npz:calib.npz"}},
              "passes": [{"cleanup": {}},
                         {"prune": {"sparsity": 0.5, "reconstruct": True, "min_elements": 16,
                                    "skip_first_last": False}},
                         {"quantize": {"min_step_speedup": None, "latency_aware": False}}],
              "benchmark": {"enabled": False}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_gives_byte_identical_model(ws):
    digests = []
    for name in ("a", "b"):
        assert main(["optimize", str(ws / "recipe.yaml"), "-o", str(ws / name), "--in-process"]) == 0
        digests.append(_sha(ws / name / "model.onnx"))
    assert digests[0] == digests[1]


def test_parallel_runs_do_not_interfere(ws, tmp_path):
    # one temporary folder for both runs (as /tmp would be), and this test's own
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-m", "deployopt.cli", "optimize", str(ws / "recipe.yaml"),
                               "-o", str(ws / f"par{i}")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("deployopt-")] == []  # nothing left behind
    assert _sha(ws / "par0" / "model.onnx") == _sha(ws / "par1" / "model.onnx")
    for i in range(2):
        assert sorted(p.name for p in (ws / f"par{i}").iterdir()) == ["model.onnx", "report.json", "report.md"]
