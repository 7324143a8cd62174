"""The Python API: the README's example runs as written, results are typed with the JSON's keys,
and errors are the CLI's (UserError for bad input)."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest

import deployopt
from deployopt.core.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def api_run(tmp_path_factory) -> pathlib.Path:
    """The README's example, run in a fresh folder as a user would run it."""
    work = tmp_path_factory.mktemp("readme-api")
    proc = subprocess.run([sys.executable, "-c", _readme_example()], cwd=work, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def test_readme_example_runs_and_prints_what_it_says(api_run):
    out = api_run / "runs" / "api"
    assert {"digits.onnx", "model.onnx", "report.json", "report.md"} <= {p.name for p in out.iterdir()}
    report = deployopt.Report.read(out / "report.json")
    assert report.passed and report.exit_code == 0 and report.reason is None
    assert [s["pass"] for s in report.steps] == ["cleanup", "quantize"]
    assert report.steps[-1]["after"]["ops"].get("QuantizeLinear", 0) > 0


def test_report_object_has_the_json_keys(api_run):
    path = api_run / "runs" / "api" / "report.json"
    doc = json.loads(path.read_text())
    report = deployopt.Report.read(path)
    assert report.to_dict() == doc
    assert report.out_dir == path.parent


def test_evaluate_returns_the_eval_json_keys(api_run):
    out = api_run / "runs" / "api"
    result = deployopt.evaluate(out / "model.onnx", {"dataset": "digits", "split": "test", "limit": 64},
                                reference=out / "digits.onnx")
    keys = set(result.to_dict())
    assert {"top1", "top1_ci", "agreement", "agreement_ci", "cosine", "kl", "n"} <= keys
    assert result.n == 64 and 0.0 <= result.agreement <= 1.0 and result.kl >= 0.0
    assert result.to_text().startswith(f"{out / 'model.onnx'} on digits")


def test_bench_returns_rows_per_model(api_run):
    out = api_run / "runs" / "api"
    result = deployopt.bench([out / "digits.onnx", out / "model.onnx"], labels=["fp32", "int8"], runs=5,
                             rounds=1, warmup=1)
    assert [r["model"] for r in result.rows] == ["fp32", "int8"]
    assert result.rows[0]["speedup"] == pytest.approx(1.0)
    assert all(r["error"] is None and r["p50_ms"] > 0 for r in result.rows)


def test_bad_recipe_mapping_is_a_user_error_naming_the_key(tmp_path):
    with pytest.raises(UserError, match=r"^passes\[0\]\.quantize\.calibration: 'minmx' is not one of"):
        deployopt.optimize({"model": str(tmp_path / "m.onnx"), "passes": [{"quantize": {"calibration": "minmx"}}]},
                           tmp_path / "out")


def test_unlabelled_data_without_reference_is_refused(api_run):
    with pytest.raises(UserError, match="no labels and no reference"):
        deployopt.evaluate(api_run / "runs" / "api" / "model.onnx",
                           {"dataset": "npy:" + str(_unlabelled(api_run)), "preprocess": "none"})


def _unlabelled(folder: pathlib.Path) -> pathlib.Path:
    import numpy as np

    path = folder / "x.npy"
    np.save(path, np.zeros((4, 1, 8, 8), np.float32))
    return path


def test_isolated_run_raises_the_childs_error_in_the_caller(tmp_path, capfd):
    """isolate=True: bad input is the same UserError as in-process, with no child traceback, and an
    earlier run's report.json in the output folder is not returned as this run's."""
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not a model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match=r"m\.onnx: not an ONNX model or truncated/corrupt protobuf"):
        deployopt.optimize({"model": str(model), "passes": [{"cleanup": {}}]}, out, isolate=True)
    assert "Traceback" not in capfd.readouterr().err


def test_timeout_needs_isolation(tmp_path):
    with pytest.raises(UserError, match="^timeout: only with isolate=True"):
        deployopt.optimize({"model": str(tmp_path / "m.onnx")}, tmp_path / "out", timeout=5)
