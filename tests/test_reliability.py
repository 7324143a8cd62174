"""Bad input over every verb: exit 2, one line on stderr naming the file and the cause, no traceback,
inputs byte-identical afterwards, no partial output left behind. onnxruntime crashing or hanging
inside the work: exit 1; SIGTERM: exit 130; neither leaves partial output or temporary files."""

from __future__ import annotations

import hashlib
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import yaml

from benchmarks.tiny_resnet import export_tiny_resnet
from deployopt.cli import main


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    export_tiny_resnet(root / "good.onnx")
    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 8, 8), dtype=np.float32)
    np.savez(root / "data.npz", x=x, y=rng.integers(0, 10, 64))
    np.savez(root / "empty.npz", x=np.zeros((0, 1, 8, 8), np.float32))
    np.savez(root / "wrong_shape.npz", x=rng.random((16, 3, 32, 32), dtype=np.float32))
    bad = x.copy()
    bad[5, 0, 3, 3] = np.nan
    np.savez(root / "nan.npz", x=bad)
    inf = x.copy()
    inf[2, 0, 0, 0] = np.inf
    np.savez(root / "inf.npz", x=inf)

    good = (root / "good.onnx").read_bytes()
    (root / "empty.onnx").write_bytes(b"")
    (root / "random.onnx").write_bytes(rng.bytes(5000))
    (root / "truncated.onnx").write_bytes(good[: len(good) * 2 // 3])
    (root / "pickle.onnx").write_bytes(pickle.dumps({"state_dict": {"w": np.zeros(8)}}))
    for name in ("ext", "noext"):  # onnx.save with external data mutates the proto: load it afresh
        onnx.save(onnx.load(root / "good.onnx"), root / f"{name}.onnx", save_as_external_data=True,
                  location=f"{name}.data", size_threshold=0)
    (root / "noext.data").unlink()
    escape = onnx.load(root / "ext.onnx", load_external_data=False)
    for tensor in escape.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save(escape, root / "escape.onnx")
    (root.parent / "outside.data").write_bytes((root / "ext.data").read_bytes())
    return root


BAD_MODELS = {
    "empty.onnx": "empty file",
    "random.onnx": "not an ONNX model",
    "truncated.onnx": "truncated/corrupt protobuf",
    "pickle.onnx": "not an ONNX model",
    "noext.onnx": "external data file 'noext.data'",
    "escape.onnx": "escapes the model's folder",
}


def _digests(root: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def _check_one_line(capsys, code, expected_code, *needles):
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert code == expected_code, captured.err
    errors = [line for line in lines if line.startswith("deployopt: error:")]
    assert len(errors) == 1, lines
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in errors[0], errors[0]


def _recipe(ws, name, **changes):
    recipe = {"model": "good.onnx", "data": {"calibration": {"dataset": f"npz:{ws / 'data.npz'}"},
                                             "evaluation": {"dataset": f"npz:{ws / 'data.npz'}"}},
              "passes": [{"cleanup": {}}], "benchmark": {"enabled": False}}
    recipe.update(changes)
    path = ws / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("name, cause", BAD_MODELS.items())
def test_inspect_eval_bench_refuse_bad_models(ws, capsys, name, cause):
    before = _digests(ws)
    path = str(ws / name)
    _check_one_line(capsys, main(["inspect", path, "--in-process"]), 2, name, cause)
    _check_one_line(capsys, main(["eval", path, "--data", f"npz:{ws / 'data.npz'}", "--in-process",
                                  "--no-progress"]), 2, name)
    _check_one_line(capsys, main(["bench", str(ws / "good.onnx"), path, "--runs", "2", "--rounds", "1",
                                  "--no-progress"]), 2, name)
    assert _digests(ws) == before


@pytest.mark.parametrize("name, cause", BAD_MODELS.items())
def test_optimize_refuses_bad_models(ws, capsys, name, cause):
    recipe = _recipe(ws, f"r_{name}.yaml", model=name)
    before = _digests(ws)
    out = ws / f"out_{name}"
    _check_one_line(capsys, main(["optimize", str(recipe), "-o", str(out), "--in-process"]), 2, name, cause)
    assert _digests(ws) == before
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("changes, needle", [
    ({"passes": [{"clenup": {}}]}, "passes[0].clenup: unknown pass"),
    ({"passes": [{"cleanup": {"fold_batchnorn": True}}]}, "passes[0].cleanup.fold_batchnorn: unknown key"),
    ({"passes": [{"cleanup": {"fold_batchnorm": 3}}]}, "passes[0].cleanup.fold_batchnorm: expected bool"),
    ({"benchmark": {"runs": 0}}, "benchmark.runs: 0 is outside [1, inf)"),
    ({"data": {"evaluation": {"dataset": "npz:missing.npz"}}}, "missing.npz"),
    ({"data": {"evaluation": {"dataset": "npz:empty.npz"}}}, "empty"),
    ({"data": {"evaluation": {"dataset": "npz:wrong_shape.npz"}}}, "3x32x32"),
    ({"data": {"evaluation": {"dataset": "npz:nan.npz"}}}, "NaN or Inf"),
    ({"data": {"evaluation": {"dataset": "npz:inf.npz"}}}, "NaN or Inf"),
])
def test_optimize_refuses_bad_recipes_and_data(ws, capsys, changes, needle):
    recipe = _recipe(ws, "bad_recipe.yaml", **changes)
    before = _digests(ws)
    out = ws / "out_bad_recipe"
    # NaN/Inf are found only while batches stream, after work has started, but they are bad input all
    # the same: exit 2
    _check_one_line(capsys, main(["optimize", str(recipe), "-o", str(out), "--in-process"]), 2, needle)
    assert _digests(ws) == before
    assert not out.exists(), "a refused run left its output folder"


def test_optimize_refuses_output_equal_to_input(ws, capsys):
    sub = ws / "same"
    sub.mkdir(exist_ok=True)
    (sub / "model.onnx").write_bytes((ws / "good.onnx").read_bytes())
    recipe = _recipe(ws, "same.yaml", model="same/model.onnx")
    before = _digests(sub)
    _check_one_line(capsys, main(["optimize", str(recipe), "-o", str(sub), "--in-process"]), 2,
                    "refusing to overwrite the input model")
    assert _digests(sub) == before


def test_outputs_never_overwrite_a_file_the_command_reads(ws, capsys):
    """--json / --csv / -o naming the model, the data or the weights: refused before any work."""
    good = ws / "good.onnx"
    data = ws / "inputs.npy"
    np.save(data, np.zeros((2, 1, 8, 8), np.float32))
    before = _digests(ws)
    _check_one_line(capsys, main(["bench", str(good), "--json", str(good), "--no-progress"]), 2,
                    f"--json: {good}: refusing to overwrite a file this command reads")
    _check_one_line(capsys, main(["bench", str(good), "--data", f"npy:{data}", "--csv", str(data), "--no-progress"]),
                    2, f"--csv: {data}: refusing to overwrite a file this command reads")
    _check_one_line(capsys, main(["eval", str(good), "--data", f"npy:{data}", "--reference", str(good), "--json",
                                  str(ws / "." / "good.onnx"), "--no-progress", "--in-process"]), 2,
                    "refusing to overwrite")
    _check_one_line(capsys, main(["export", "seed_cnn", "--weights", str(good), "-o", str(good)]), 2,
                    f"{good}: refusing to overwrite a file this command reads")
    assert _digests(ws) == before


def test_optimize_refuses_unwritable_output(ws, capsys):
    recipe = _recipe(ws, "unwritable.yaml")
    blocker = ws / "a_file"
    blocker.write_text("not a folder")
    _check_one_line(capsys, main(["optimize", str(recipe), "-o", str(blocker / "out"), "--in-process"]), 2,
                    "cannot create the output folder")
    _check_one_line(capsys, main(["optimize", str(recipe), "-o", str(blocker), "--in-process"]), 2,
                    "not a folder")


def test_export_refusals(ws, capsys):
    _check_one_line(capsys, main(["export", "no_such_model", "-o", str(ws / "x.onnx")]), 2, "no_such_model")
    _check_one_line(capsys, main(["export", "seed_cnn", "-o", str(ws / "missing_dir" / "x.onnx")]), 2,
                    "missing_dir")
    _check_one_line(capsys, main(["export", "not_a_module_xyz:build", "-o", str(ws / "x.onnx")]), 2,
                    "not_a_module_xyz")
    assert not (ws / "x.onnx").exists()


def test_bench_usage_errors(ws, capsys):
    good = str(ws / "good.onnx")
    _check_one_line(capsys, main(["bench", good, "--threads", "0", "--no-progress"]), 2, "threads")
    _check_one_line(capsys, main(["bench", good, "--runs", "-1", "--no-progress"]), 2, "runs")


def _cli_env(tmp_path: pathlib.Path, crash_body: str | None = None) -> tuple[dict[str, str], pathlib.Path]:
    """The environment for a CLI child process, and the temporary folder it gets as TMPDIR (its own,
    so that what it leaves there is told apart from other runs on the machine). With ``crash_body``,
    a sitecustomize makes onnxruntime's InferenceSession run that code inside the contained child."""
    env = dict(os.environ)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env["TMPDIR"] = str(temp)
    if crash_body is not None:
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(
            "import os\n"
            "if os.environ.get('DEPLOYOPT_STATUS_FILE'):\n"  # only inside the contained child
            "    import onnxruntime\n"
            "    class _Boom(onnxruntime.InferenceSession):\n"
            "        def __init__(self, *a, **k):\n"
            f"            {crash_body}\n"
            "    onnxruntime.InferenceSession = _Boom\n")
        env["PYTHONPATH"] = f"{hook}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env, temp


def _deployopt_temp(folder: pathlib.Path) -> list[str]:
    """deployopt's temporary files and folders in ``folder`` (other tools may put theirs there too)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("deployopt-"))


def test_debug_shows_traceback(ws, tmp_path):
    env, temp = _cli_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "deployopt.cli", "inspect", str(ws / "random.onnx"), "--debug"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert _deployopt_temp(temp) == []


@pytest.mark.parametrize("body, expected", [
    ("os.abort()", "crashed (SIGABRT)"),
    ("import time; time.sleep(600)", "timed out after 8 s"),
])
def test_crash_and_hang_are_contained(ws, tmp_path, body, expected):
    """onnxruntime aborting or hanging inside the work must not take the CLI down or hang it."""
    env, temp = _cli_env(tmp_path, body)
    recipe = _recipe(ws, "crash.yaml", benchmark={"enabled": False})
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "deployopt.cli", "optimize", str(recipe), "-o", str(out),
                           "--timeout", "8"], capture_output=True, text=True, timeout=300, env=env)
    assert time.monotonic() - start < 200
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("deployopt: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or list(out.iterdir()) == []  # no partial output, no staging folder
    assert _deployopt_temp(temp) == []  # the killed child's temporary files went with its folder


def test_sigterm_exits_130_without_partial_files(ws, tmp_path):
    env, temp = _cli_env(tmp_path, "import time; time.sleep(600)")
    recipe = _recipe(ws, "term.yaml", benchmark={"enabled": False})
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "deployopt.cli", "optimize", str(recipe), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (out.exists() and any(out.iterdir())):
        time.sleep(0.2)  # wait until the child has started staging
    time.sleep(1.0)
    assert proc.poll() is None, proc.stderr.read()
    scratch = _deployopt_temp(temp)  # the run's scratch folder, where the child keeps its temporary files
    assert len(scratch) == 1 and scratch[0].startswith("deployopt-run-"), scratch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not out.exists() or list(out.iterdir()) == []
    assert _deployopt_temp(temp) == []
