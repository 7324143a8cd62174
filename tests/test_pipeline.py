"""End to end through the CLI: optimize a small trained model, report keys, gates, exit codes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import yaml

from deployopt.cli import main
from tests._fixtures import train_classifier

REPORT_KEYS = {"version", "machine", "recipe", "input", "output", "steps", "benchmark", "accuracy", "gates"}
STATS_KEYS = {"path", "bytes", "bytes_zip", "params", "nonzero_params", "macs", "ops", "opset"}
STEP_KEYS = {"pass", "params", "seconds", "modified", "before", "after", "notes"}
BENCH_KEYS = {"model", "threads", "batch", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms",
              "throughput_ips", "speedup"}


class DigitsNet(torch.nn.Module):
    """Conv-BN-ReLU x2 + GAP + Linear on 1x8x8 digits: BatchNorm left for cleanup to fold."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.features(x))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, digits):
    """A digits model trained briefly, exported with BatchNorm, plus its data files."""
    root = tmp_path_factory.mktemp("pipeline")
    x, y = digits
    torch.manual_seed(0)
    net = DigitsNet()
    train_classifier(net, x[:1400], y[:1400], epochs=8, lr=0.01, shuffle=False)
    net.eval()
    model = root / "digits.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(model), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    np.savez(root / "eval.npz", x=x[1400:], y=y[1400:])
    np.savez(root / "calib.npz", x=x[:200])
    return root


def _write_recipe(root, name="recipe.yaml", **changes):
    recipe = {
        "model": "digits.onnx",
        "data": {"calibration": {"dataset": f"npz:{root / 'calib.npz'}"},
                 "evaluation": {"dataset": f"npz:{root / 'eval.npz'}"}},
        "passes": [{"cleanup": {}}],
        "benchmark": {"threads": [1], "batch": [1], "warmup": 2, "runs": 20, "rounds": 2},
        # min_speedup far below 1: cleanup's speedup is about 1, and a loaded machine measured 0.4986
        # (timing is noise here; the gate's arithmetic is what these tests check)
        "gates": {"max_accuracy_drop": 0.0, "min_speedup": 0.05},
    }
    recipe.update(changes)
    path = root / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_optimize_writes_model_and_report(workspace, capsys):
    recipe = _write_recipe(workspace)
    before = _digest(workspace / "digits.onnx")
    out = workspace / "out"
    assert main(["optimize", str(recipe), "-o", str(out), "--in-process"]) == 0
    assert _digest(workspace / "digits.onnx") == before  # the input is never touched

    doc = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(doc)
    assert STATS_KEYS <= set(doc["input"]) and STATS_KEYS <= set(doc["output"])
    assert {"cpu", "isa", "cores", "onnxruntime", "os"} <= set(doc["machine"])
    step = doc["steps"][0]
    assert STEP_KEYS <= set(step) and step["pass"] == "cleanup" and step["modified"] is True
    assert step["accuracy"]["agreement"] == 1.0 and step["accuracy"]["n"] == 397  # cleanup costs nothing
    assert step["before"]["ops"].get("BatchNormalization") == 2
    assert "BatchNormalization" not in step["after"]["ops"]
    assert {row["model"] for row in doc["benchmark"]} == {"input", "output"}
    assert all(BENCH_KEYS <= set(row) for row in doc["benchmark"])
    # cleanup is exact: same predictions on every held-out digit
    assert doc["accuracy"]["output"]["agreement"] == 1.0
    assert doc["accuracy"]["input"]["top1"] > 0.85
    assert doc["accuracy"]["drop"] == pytest.approx(0.0, abs=1e-12)
    assert [g["name"] for g in doc["gates"]] == ["max_accuracy_drop", "min_speedup"]
    assert all(g["passed"] for g in doc["gates"])
    onnx.checker.check_model(onnx.load(out / "model.onnx"), full_check=True)
    md = (out / "report.md").read_text()
    assert "## Steps" in md and "cleanup" in md and "## Gates" in md
    assert "## Where the time goes" in md
    assert {"input", "output"} <= set(doc["profile"]) and doc["profile"]["output"]["rows"]
    table = capsys.readouterr().out
    assert "input" in table and "output" in table and "speedup" in table


def test_unmet_gate_exits_1_with_reason(workspace, capsys):
    recipe = _write_recipe(workspace, "gate.yaml", gates={"max_size_mb": 0.000001})
    out = workspace / "gate_out"
    assert main(["optimize", str(recipe), "-o", str(out), "--in-process"]) == 1
    err = capsys.readouterr().err
    assert "gate max_size_mb not met" in err
    doc = json.loads((out / "report.json").read_text())
    assert doc["exit_code"] == 1 and doc["gates"][0]["passed"] is False
    assert (out / "model.onnx").exists()  # the result is still saved


def test_set_override_and_invalid_recipe_exit_2(workspace, capsys):
    recipe = _write_recipe(workspace, "bad.yaml", passes=[{"cleanup": {"fold_batchnorm": "yes"}}])
    out = workspace / "bad_out"
    assert main(["optimize", str(recipe), "-o", str(out), "--in-process"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "passes[0].cleanup.fold_batchnorm: expected bool" in err[0]
    assert not out.exists() or not any(out.iterdir())
    assert main(["optimize", str(recipe), "-o", str(out), "--in-process", "--set", "passes[0].cleanup.fold_batchnorm=false",
                 "--set", "benchmark.enabled=false", "--set", "gates.min_speedup=null"]) == 0


def test_cli_process_errors_are_one_line(workspace, tmp_path):
    bad = tmp_path / "random.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    proc = subprocess.run([sys.executable, "-m", "deployopt.cli", "inspect", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deployopt: error:") and str(bad) in lines[0]
    assert "Traceback" not in proc.stderr


def _make_slowdown_pass():
    """A pass injected for the step-guard test: it adds ~20 M MACs whose result is multiplied by
    zero, so the outputs are unchanged but the model is much slower (onnxruntime keeps x*0)."""
    import dataclasses

    import onnx_ir as ir

    from deployopt.passes.base import DeployInPlacePass

    @dataclasses.dataclass
    class _Slowdown(DeployInPlacePass):
        name = "slowdown"
        matmuls: int = 20

        def call(self, model):
            graph = model.graph
            x, out = graph.inputs[0], graph.outputs[0]
            def const(name, array):
                value = ir.Value(name=name, const_value=ir.tensor(array))
                graph.register_initializer(value)
                return value
            shape = const("slow_shape", np.array([-1, 64], np.int64))
            reps = const("slow_reps", np.array([1, 16], np.int64))
            weight = const("slow_w", np.full((1024, 1024), 1e-4, np.float32))
            zero = const("slow_zero", np.zeros((1,), np.float32))
            nodes = [ir.node("Reshape", [x, shape]), ]
            nodes.append(ir.node("Tile", [nodes[-1].outputs[0], reps]))
            for _ in range(self.matmuls):
                nodes.append(ir.node("MatMul", [nodes[-1].outputs[0], weight]))
            nodes.append(ir.node("ReduceSum", [nodes[-1].outputs[0]], attributes={"keepdims": 1}))
            nodes.append(ir.node("Mul", [nodes[-1].outputs[0], zero]))
            add = ir.node("Add", [out, nodes[-1].outputs[0]], name="slow_add")
            nodes.append(add)
            graph.extend(nodes)
            new_out = add.outputs[0]
            new_out.name, out.name = out.name, out.name + "_before_slowdown"
            new_out.shape, new_out.type = out.shape, out.type
            graph.outputs[0] = new_out
            return ir.passes.PassResult(model, True)

    return _Slowdown


def test_step_guard_reverts_a_slower_step(workspace, monkeypatch, capsys):
    from deployopt import passes

    monkeypatch.setitem(passes.REGISTRY, "slowdown", _make_slowdown_pass())
    recipe = _write_recipe(workspace, "guard.yaml",
                           passes=[{"cleanup": {}}, {"slowdown": {"min_step_speedup": 1.0}}],
                           gates={"max_accuracy_drop": 0.0})
    out = workspace / "guard_out"
    assert main(["optimize", str(recipe), "-o", str(out), "--in-process"]) == 0
    doc = json.loads((out / "report.json").read_text())
    step = doc["steps"][1]
    assert step["pass"] == "slowdown" and step["status"] == "reverted" and step["modified"] is False
    assert step["details"]["step_guard"]["reverted"] is True
    assert any(n.startswith("slowdown reverted: ") and "slower than its input (p50" in n for n in step["notes"])
    ops = doc["output"]["ops"]
    assert "MatMul" not in ops and "Tile" not in ops  # the output is the step's input
    assert "slowdown reverted" in (out / "report.md").read_text()


def test_fidelity_report_states_the_noise_floor(workspace, capsys):
    """data.fidelity on image data: the report says what the input scores against itself one grey
    level away (the agreement the output can be held to); on arrays it says why it cannot."""
    recipe = _write_recipe(workspace, name="floor.yaml", benchmark={"enabled": False}, gates={},
                           data={"calibration": {"dataset": f"npz:{workspace / 'calib.npz'}"},
                                 "fidelity": {"dataset": "digits", "split": "test"}})
    out = workspace / "out-floor"
    assert main(["optimize", str(recipe), "-o", str(out), "--in-process"]) == 0
    fidelity = json.loads((out / "report.json").read_text())["accuracy"]["fidelity"]
    floor = fidelity["noise_floor"]
    assert floor["levels"] == 1 and floor["of"] == "reference" and floor["n"] == fidelity["n"] == 360
    assert 0.5 < floor["agreement"] < 1 and fidelity["agreement"] == 1.0  # cleanup is exact; noise is not
    assert floor["agreement_on_stable"] == 1.0 and 0 < floor["stable"] < 360
    assert (f"Noise floor (inputs moved by up to 1 grey level): the reference agrees with itself on "
            f"{floor['agreement']:.2%}") in (out / "report.md").read_text()
    assert f"agreement noise floor: the input agrees with itself on {floor['agreement']:.3f}" in capsys.readouterr().out

    arrays = _write_recipe(workspace, name="floor-npz.yaml", benchmark={"enabled": False}, gates={},
                           data={"calibration": {"dataset": f"npz:{workspace / 'calib.npz'}"},
                                 "fidelity": {"dataset": f"npz:{workspace / 'eval.npz'}"}})
    assert main(["optimize", str(arrays), "-o", str(workspace / "out-floor-npz"), "--in-process"]) == 0
    floor = json.loads((workspace / "out-floor-npz" / "report.json").read_text())["accuracy"]["fidelity"]["noise_floor"]
    assert floor["levels"] == 1 and "has no image preprocessing" in floor["skipped"]
    assert "Noise floor (inputs moved by up to 1 grey level): not measured: dataset" in (
        workspace / "out-floor-npz" / "report.md").read_text()


def test_unmet_agreement_gate_names_the_noise_floor(workspace, digits, capsys):
    """A max_accuracy_drop on unlabelled images that the pruned model misses: the reason also says
    the tolerance is below what the input scores against itself one grey level away."""
    from PIL import Image

    x, _ = digits
    pages = workspace / "digit-images"
    pages.mkdir(exist_ok=True)
    for i, image in enumerate(x[1400:1600]):  # sklearn's 0..16 grey levels, as an 8-bit PNG
        Image.fromarray(np.round(image[0] * 16).astype(np.uint8)).save(pages / f"d{i:03d}.png")
    recipe = _write_recipe(workspace, name="floor-gate.yaml", benchmark={"enabled": False},
                           passes=[{"prune": {"sparsity": 0.9, "skip_first_last": False}}],
                           gates={"max_accuracy_drop": 0.01},
                           data={"evaluation": {"dataset": f"folder:{pages}", "preprocess": "digits"}})
    out = workspace / "out-floor-gate"
    assert main(["optimize", str(recipe), "-o", str(out), "--in-process"]) == 1
    doc = json.loads((out / "report.json").read_text())
    floor = doc["accuracy"]["noise_floor"]
    assert floor["levels"] == 1 and floor["metric"] == "agreement" and 0.01 < floor["drop"] < 0.5
    assert doc["accuracy"]["drop"] > 0.01 and doc["accuracy"]["metric"] == "agreement"
    reason = (f"gate max_accuracy_drop not met: {doc['accuracy']['drop']:.4g} > 0.01 (drop of agreement); the "
              f"tolerance is below the noise floor: the reference against itself with its inputs moved by 1 grey "
              f"level scores agreement {floor['score']:.4f} (drop {floor['drop']:.4f})")
    assert doc["reason"] == reason and reason in capsys.readouterr().err
