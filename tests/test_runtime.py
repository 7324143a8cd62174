"""Runtimes and execution providers as targets: OpenVINO runs what onnxruntime runs with the same
numbers, bench/eval/optimize stamp the target they measured on, and a target that is not
available is refused in one line (exit 2), never replaced by another."""

from __future__ import annotations

import builtins
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

import deployopt
from deployopt.cli import main
from deployopt.core.data import ArrayDataset
from deployopt.core.errors import UserError
from deployopt.measure import runtime as rt
from deployopt.passes.quantize.latency_probe import LatencyProbe, measure_latency
from tests._fixtures import train_classifier
from tests.test_pipeline import DigitsNet

N_TRAIN = 1400


@pytest.fixture(scope="module")
def work(tmp_path_factory, digits_shuffled):
    """A small digits classifier (dynamic batch), its held-out data as .npz, and a recipe folder."""
    root = tmp_path_factory.mktemp("runtime")
    x, y = digits_shuffled
    torch.manual_seed(0)
    net = DigitsNet()
    train_classifier(net, x[:N_TRAIN], y[:N_TRAIN], epochs=4, lr=0.01, threads=1)
    net.eval()
    model = root / "digits.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(model), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    np.savez(root / "test.npz", x=x[N_TRAIN:], y=y[N_TRAIN:])
    return {"root": root, "model": str(model), "x": x[N_TRAIN:], "y": y[N_TRAIN:]}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- numbers ------------------------------------------------------------------------------------

def test_openvino_runs_the_model_with_onnxruntime_numbers(work):
    ours = rt.open_runtime(work["model"], "openvino", threads=1)
    ref = rt.open_runtime(work["model"], threads=1)
    assert isinstance(ours, rt.OpenVinoModel) and isinstance(ref, rt.OrtModel)
    assert ours.inputs == ref.inputs == ["input"] and ours.outputs == ref.outputs == ["logits"]
    x = work["x"][:32]
    (a,) = ours.run(None, {"input": x})
    (b,) = ref.run(["logits"], {"input": x})
    assert a.shape == b.shape == (32, 10)
    assert np.abs(a - b).max() < 1e-4
    again = ours.run(["logits"], {"input": work["x"][32:64]})[0]  # outputs are copies, not the request's buffers
    assert not np.shares_memory(a, again) and np.abs(a - b).max() < 1e-4


def test_float_models_compile_in_f32_and_int8_models_keep_the_default(work, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    assert rt.openvino_config(2, quantized=False) == {
        "INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    assert "INFERENCE_PRECISION_HINT" not in rt.openvino_config(1, quantized=True)
    q = tmp_path / "q.onnx"
    quantize_dynamic(work["model"], str(q), weight_type=QuantType.QInt8)
    assert rt.is_quantized(q) and not rt.is_quantized(work["model"])
    compiled = rt.open_runtime(q, "openvino").compiled
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_eval_on_openvino_gives_onnxruntime_top1(work, capsys, tmp_path):
    data = ArrayDataset(work["x"], work["y"], name="digits-test")
    ours = deployopt.evaluate(work["model"], data, runtime="openvino", reference=work["model"])
    ref = deployopt.evaluate(work["model"], data)
    assert ours.n == ref.n == len(work["y"])
    assert ours.top1 == ref.top1 and ref.top1 > 0.5
    assert ours.agreement == 1.0 and ours.max_abs_diff == 0.0  # both models on the same target
    out = tmp_path / "eval.json"
    code = main(["eval", work["model"], "--data", f"npz:{work['root'] / 'test.npz'}", "--runtime", "openvino",
                 "--json", str(out), "--no-progress", "--in-process"])
    assert code == 0
    assert json.loads(out.read_text())["top1"] == ref.top1


def test_bench_on_openvino_stamps_the_runtime(work, capsys, tmp_path):
    out = tmp_path / "bench.json"
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(open(work["model"], "rb").read())
    code = main(["bench", work["model"], str(copy), "--runtime", "openvino", "--runs", "10", "--rounds", "1",
                 "--warmup", "2", "--json", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert f"runtime: openvino {rt.runtime_version('openvino')} (CPU)" in text
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == 2
    for row in doc["rows"]:
        assert row["error"] is None and row["p50_ms"] > 0
        assert (row["runtime"], row["ep"], row["instances"]) == ("openvino", "CPU", 1)
        assert row["runtime_version"] == rt.runtime_version("openvino")
    assert doc["session_options"]["runtime"] == "openvino"
    assert doc["machine"]["runtimes"] == {"onnxruntime": ort.__version__, "openvino": rt.runtime_version("openvino")}


def test_one_interleaved_run_compares_runtimes(work):
    from deployopt.measure.latency import compare

    result = compare([work["model"], work["model"]], labels=["ort", "ov"], targets=[None, ("openvino", None)],
                     runs=10, rounds=2, warmup=2, progress=False)
    rows = {r["model"]: r for r in result.rows}
    assert rows["ort"]["runtime"] == "onnxruntime" and rows["ort"]["ep"] == "CPUExecutionProvider"
    assert rows["ov"]["runtime"] == "openvino"
    assert rows["ov"]["speedup"] == pytest.approx(rows["ort"]["p50_ms"] / rows["ov"]["p50_ms"], rel=1e-12)
    assert [t["model"] for t in result.timeline] == ["ort", "ov", "ort", "ov"]


def test_latency_probe_times_on_the_target(work):
    feeds = {"input": work["x"][:1]}
    timing = measure_latency(work["model"], work["model"], feeds, threads=1, runtime="openvino", warmup=1,
                             runs=5, rounds=2)
    assert timing.reference_ms > 0 and timing.model_ms > 0 and timing.ci[0] <= timing.ci[1]
    probe = LatencyProbe().on_target("openvino", None)
    assert (probe.runtime, probe.ep) == ("openvino", None)
    with pytest.raises(UserError, match="per-node profiles are onnxruntime's"):
        probe.profile(work["model"], None, feeds, 1)


def test_optimize_on_openvino_stamps_the_report(work, tmp_path):
    recipe = {"model": work["model"], "data": {"evaluation": {"dataset": f"npz:{work['root'] / 'test.npz'}"}},
              "passes": [{"cleanup": {}}],
              "benchmark": {"threads": [1], "batch": [1], "warmup": 2, "runs": 10, "rounds": 1,
                            "runtime": "openvino"}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["optimize", str(path), "-o", str(out), "--in-process"]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert {r["runtime"] for r in doc["benchmark"]} == {"openvino"}
    assert {r["runtime_version"] for r in doc["benchmark"]} == {rt.runtime_version("openvino")}
    md = (out / "report.md").read_text()
    assert f"## Latency (openvino {rt.runtime_version('openvino')} CPU, interleaved rounds)" in md


# -- discovery and refusal ----------------------------------------------------------------------

def test_available_eps_come_from_onnxruntime():
    eps = rt.available_eps()
    assert "CPUExecutionProvider" in eps
    assert set(ort.get_available_providers()) <= set(eps)
    assert {d.ep_name for d in ort.get_ep_devices()} <= set(eps)
    assert rt.check_target().stamp() == {"runtime": "onnxruntime", "runtime_version": ort.__version__,
                                         "ep": "CPUExecutionProvider"}


@pytest.mark.parametrize("verb", ["bench", "eval"])
def test_unknown_ep_is_refused_with_the_available_ones(work, capsys, verb):
    args = [verb, work["model"], "--ep", "NoSuchEP"]
    if verb == "eval":
        args += ["--data", f"npz:{work['root'] / 'test.npz'}", "--in-process"]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert line == (f"deployopt: error: --ep NoSuchEP: not an execution provider onnxruntime has here "
                    f"(available: {', '.join(rt.available_eps())}); a plugin EP library is given as NAME=PATH")


def test_plugin_ep_library_that_is_missing_or_not_a_library_is_refused(work, capsys, tmp_path):
    missing = tmp_path / "libnope.so"
    assert main(["bench", work["model"], "--ep", f"Nope={missing}"]) == 2
    assert _one_error_line(capsys) == f"deployopt: error: --ep Nope={missing}: no such EP library file"
    fake = tmp_path / "libfake.so"
    fake.write_text("not a shared library")
    assert main(["bench", work["model"], "--ep", f"Fake={fake}"]) == 2
    assert _one_error_line(capsys).startswith(
        f"deployopt: error: --ep Fake={fake}: onnxruntime cannot register the library:")


def test_openvino_takes_no_execution_provider(work, capsys):
    assert main(["bench", work["model"], "--runtime", "openvino", "--ep", "DnnlExecutionProvider"]) == 2
    assert _one_error_line(capsys) == ("deployopt: error: --ep DnnlExecutionProvider: execution providers are "
                                       "onnxruntime's; openvino runs on its CPU device")


def test_missing_runtime_names_the_extra(work, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    assert main(["bench", work["model"], "--runtime", "openvino"]) == 2
    assert _one_error_line(capsys) == ("deployopt: error: --runtime openvino: the openvino package is not installed "
                                       "(No module named 'openvino'); pip install 'deployopt[openvino]'")
    with pytest.raises(UserError, match=r"^runtime openvino: .*pip install 'deployopt\[openvino\]'$"):
        deployopt.bench([work["model"]], runtime="openvino")
    with pytest.raises(UserError, match=r"^benchmark\.runtime openvino: .*pip install 'deployopt\[openvino\]'$"):
        deployopt.optimize({"model": work["model"], "passes": [{"cleanup": {}}],
                            "benchmark": {"runtime": "openvino"}})


def test_unknown_runtime_is_refused(work, capsys, tmp_path):
    assert main(["bench", work["model"], "--runtime", "tensorrt"]) == 2
    assert _one_error_line(capsys) == "deployopt: error: --runtime: 'tensorrt' is not one of onnxruntime, openvino"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": work["model"], "passes": [{"cleanup": {}}],
                                      "benchmark": {"ep": "NoSuchEP"}}))
    assert main(["optimize", str(recipe), "-o", str(tmp_path / "out"), "--in-process"]) == 2
    assert _one_error_line(capsys).startswith(f"deployopt: error: {recipe}: benchmark.ep NoSuchEP: not an execution "
                                                "provider onnxruntime has here (available: ")
    assert not (tmp_path / "out").exists()
