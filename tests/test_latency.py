"""Latency harness: statistics on synthetic timings, worker isolation, interleaving, outputs,
and refusal of bad input. Models are tiny onnx.helper graphs, runs=20, rounds=2."""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployopt.measure import inputs, latency, latency_report, machine, memory, timing
from deployopt.measure.output import plot_latency
from deployopt.cli import main as cli_main
from deployopt.core.data import ArrayDataset
from deployopt.core.errors import UserError
from tests._fake_workers import fault_worker


def _mlp(path, hidden=32, batch="N", features=64, seed=0):
    """x [batch, features] -> MatMul -> Relu -> MatMul -> y [batch, 10]."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((features, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 10)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _image_relu(path):
    """x [N, 3, H, W] -> Relu: dynamic spatial dims that need --shape."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    corrupt = d / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage, not a protobuf model")
    return {"a": _mlp(d / "a.onnx", hidden=32), "b": _mlp(d / "b.onnx", hidden=256, seed=1),
            "fixed": _mlp(d / "fixed.onnx", batch=1), "corrupt": str(corrupt),
            "image": _image_relu(d / "image.onnx"), "dir": d}


@pytest.fixture(scope="module")
def isolated(models):
    """One benchmark shared by several tests: a, a corrupt file, b; batch 1 and 2."""
    return latency.compare([models["a"], models["corrupt"], models["b"]], batch=(1, 2),
                           runs=20, rounds=2, warmup=3, progress=False)


# -- statistics on synthetic timings ------------------------------------------------------------

def test_summarize_percentiles_and_throughput():
    s = timing.summarize(np.arange(1, 101, dtype=float), batch=4)
    # numpy's linear interpolation: p = 1 + (n - 1) q
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p90_ms"] == pytest.approx(90.1)
    assert s["p95_ms"] == pytest.approx(95.05)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["mean_ms"] == pytest.approx(50.5)
    assert s["std_ms"] == pytest.approx(np.sqrt(100 * 101 / 12), rel=1e-12)  # sample std of 1..100
    assert s["min_ms"] == 1.0
    assert s["cv"] == pytest.approx(s["std_ms"] / 50.5)
    assert s["throughput_ips"] == pytest.approx(4 * 1000 / 50.5)


def test_speedup_interval_resamples_rounds():
    # Per-round ratios 2, 3, 2 with no spread inside a round: every bootstrap statistic is a
    # geometric mean of three draws from {2, 3}; P(all three 2) = 8/27 and P(all three 3) = 1/27
    # both exceed 2.5%, so the 95% interval is exactly [2, 3].
    base = [np.full(20, 10.0), np.full(20, 12.0), np.full(20, 11.0)]
    other = [np.full(20, 5.0), np.full(20, 4.0), np.full(20, 5.5)]
    assert timing.speedup_interval(base, other) == pytest.approx((2.0, 3.0))
    # A/A: the same samples give a point interval at 1.
    assert timing.speedup_interval(base, base) == pytest.approx((1.0, 1.0))


def test_speedup_interval_covers_truth_and_is_seeded():
    rng = np.random.default_rng(1)
    base = [rng.lognormal(np.log(10.0), 0.1, 50) * drift for drift in (1.0, 1.2, 0.9)]
    other = [rng.lognormal(np.log(5.0), 0.1, 50) * drift for drift in (1.0, 1.2, 0.9)]
    low, high = timing.speedup_interval(base, other, seed=3)
    assert low < 2.0 < high and high - low < 0.3
    assert timing.speedup_interval(base, other, seed=3) == (low, high)
    # One round: the interval comes from resampling runs and is not a point.
    one_low, one_high = timing.speedup_interval(base[:1], other[:1])
    assert one_low < one_high


def test_cv_warning_threshold():
    rows = [{"model": "quiet", "threads": 1, "batch": 1, "cv": 0.05, "error": None},
            {"model": "noisy", "threads": 2, "batch": 8, "cv": 0.25, "error": None},
            {"model": "broken", "threads": 1, "batch": 1, "cv": None, "error": "worker crashed"}]
    warnings = timing.cv_warnings(rows)
    assert len(warnings) == 1
    assert warnings[0].startswith("noisy (threads=2, batch=8): CV 25% > 10%")


def test_cv_warning_reaches_result_and_stderr(models, monkeypatch, capsys):
    monkeypatch.setattr(latency, "CV_WARN", 0.0)  # any real timing has CV > 0: all rows warn
    result = latency.compare([models["a"], models["b"]], runs=5, rounds=1, warmup=1,
                             progress=False)
    cv = [w for w in result.warnings if "CV" in w]
    assert [w.split(" (")[0] for w in cv] == ["a", "b"]
    err = capsys.readouterr().err
    for w in cv:
        assert f"deployopt: warning: {w}" in err


# -- isolation, interleaving, structure ---------------------------------------------------------

def test_corrupt_model_gives_failure_row_others_complete(isolated):
    rows = {(r["model"], r["batch"]): r for r in isolated.rows}
    assert len(isolated.rows) == 6
    for batch in (1, 2):
        bad = rows[("corrupt", batch)]
        assert bad["error"].startswith("cannot load: ") and "corrupt.onnx" in bad["error"]
        assert bad["p50_ms"] is None and bad["speedup"] is None
        for name in ("a", "b"):
            row = rows[(name, batch)]
            assert row["error"] is None
            assert len(row["samples_ms"]) == 40  # rounds x runs
            assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
            assert row["peak_rss_mb"] > 10
        assert rows[("a", batch)]["speedup"] == 1.0
        assert rows[("a", batch)]["speedup_ci"] == (1.0, 1.0)
        b = rows[("b", batch)]
        assert b["speedup"] == pytest.approx(rows[("a", batch)]["p50_ms"] / b["p50_ms"])
        assert b["speedup_ci"][0] <= b["speedup_ci"][1]


def test_rounds_interleave_models(isolated):
    order = [(t["round"], t["model"], t["batch"]) for t in isolated.timeline]
    assert order == [(0, "a", 1), (0, "b", 1), (0, "a", 2), (0, "b", 2),
                     (1, "a", 1), (1, "b", 1), (1, "a", 2), (1, "b", 2)]
    for t in isolated.timeline:  # the loop adds next to nothing to what it times
        assert t["sum_ms"] <= t["wall_ms"]


def test_json_keys_match_report_rows(isolated):
    data = json.loads(isolated.to_json())
    assert set(data["machine"]) >= {"cpu", "isa", "cores", "onnxruntime", "os"}
    report_keys = {"model", "threads", "batch", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms",
                   "throughput_ips", "speedup"}
    assert set(latency_report.REPORT_KEYS) == report_keys
    for row in data["rows"]:
        assert set(row) == set(latency_report.ROW_KEYS) - {"samples_ms"}
    ok = [r for r in data["rows"] if r["error"] is None]
    assert all(isinstance(r["p50_ms"], float) and len(r["speedup_ci"]) == 2 for r in ok)
    assert data["session_options"] == {
        "intra_op_num_threads": [1], "inter_op_num_threads": 1, "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": "ORT_ENABLE_ALL", "providers": ["CPUExecutionProvider"]}
    assert data["settings"]["runs"] == 20 and data["settings"]["rounds"] == 2
    with_samples = json.loads(isolated.to_json(samples=True))
    assert len(with_samples["rows"][0]["samples_ms"]) == 40


def test_csv_and_markdown(isolated):
    lines = isolated.to_csv().splitlines()
    assert lines[0].split(",")[:4] == ["model", "threads", "batch", "p50_ms"]
    assert "speedup_ci_low" in lines[0] and "samples_ms" not in lines[0]
    assert len(lines) == 1 + len(isolated.rows)
    md = isolated.to_markdown()
    assert md.startswith("| model | threads | batch | p50 ms")
    assert "| corrupt | 1 | 1 | FAILED: cannot load:" in md
    assert "ORT_SEQUENTIAL" in md and "machine: " in md


def test_plot_writes_png(isolated, tmp_path):
    out = tmp_path / "lat.png"
    plot_latency(isolated.rows, out, accuracy={"a": 0.91, "b": 0.93})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "lat.png"]  # no temp file left


def test_crashing_and_hanging_workers_give_failure_rows(models, tmp_path):
    crash = _mlp(tmp_path / "crash.onnx")
    hang = _mlp(tmp_path / "hang.onnx")
    t0 = time.monotonic()
    result = latency.compare([models["a"], crash, hang, models["b"]], runs=20, rounds=2,
                             warmup=2, timeout=3, progress=False, worker_entry=fault_worker)
    rows = {r["model"]: r for r in result.rows}
    assert rows["crash"]["error"] == "worker crashed (signal SIGABRT)"
    assert rows["hang"]["error"] == "worker killed: exceeded --timeout 3 s"
    assert rows["a"]["error"] is None and rows["b"]["error"] is None
    # The failures cost the survivors nothing: every round x run sample, every segment, and b's
    # speedup computed against a exactly as without them (the two tiny MLPs take about the same
    # time, so the ratio's value is checked against its definition, not against a target).
    for name in ("a", "b"):
        assert len(rows[name]["samples_ms"]) == 40  # rounds x runs
        assert [t["round"] for t in result.timeline if t["model"] == name] == [0, 1]
    assert rows["crash"]["p50_ms"] is None and rows["hang"]["speedup"] is None
    assert rows["a"]["speedup"] == 1.0 and rows["a"]["speedup_ci"] == (1.0, 1.0)
    b = rows["b"]
    assert b["speedup"] == pytest.approx(rows["a"]["p50_ms"] / b["p50_ms"], rel=1e-12)
    assert b["p50_ms"] == pytest.approx(float(np.median(b["samples_ms"])), rel=1e-12)
    assert 0 < b["speedup_ci"][0] <= b["speedup_ci"][1]
    assert time.monotonic() - t0 < 60


def test_data_feeds_real_samples(models):
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    result = latency.compare([models["a"]], data=ArrayDataset(x, name="five"), batch=(1, 8),
                             runs=5, rounds=1, warmup=1, progress=False)
    assert [r["error"] for r in result.rows] == [None, None]
    assert result.settings["inputs"] == "dataset five"


def test_random_inputs_are_deterministic_per_name():
    a = inputs.random_input("x", (2, 3), np.dtype(np.float32), seed=0)
    assert np.array_equal(a, inputs.random_input("x", (2, 3), np.dtype(np.float32), seed=0))
    assert not np.array_equal(a, inputs.random_input("y", (2, 3), np.dtype(np.float32), seed=0))
    ids = inputs.random_input("ids", (100,), np.dtype(np.int64), seed=0)
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 8


def test_rss_peak_and_sampler():
    before = memory.peak_rss_mb()
    with memory.RssSampler(interval=0.005) as rss:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, every page touched
        time.sleep(0.05)
        now = memory.current_rss_mb()
        del block
    assert rss.peak_mb >= now >= 64
    # 0.5 MiB of slack: the kernel syncs the RSS counters behind statm and VmHWM lazily.
    assert memory.peak_rss_mb() >= max(before, now) - 0.5


def test_machine_stamp():
    s = machine.stamp()
    assert set(s) == {"cpu", "isa", "cores", "onnxruntime", "os", "python"}
    assert set(s["isa"]) <= set(machine.ISA_FLAGS) and s["cores"] >= 1
    import onnxruntime

    assert s["onnxruntime"] == onnxruntime.__version__


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"threads": (0,)}, "threads: 0 is not an integer >= 1"),
    ({"runs": -1}, "runs: -1 is not an integer >= 1"),
    ({"rounds": 0}, "rounds: 0 is not an integer >= 1"),
    ({"batch": (1, 0)}, "batch: 0 is not an integer >= 1"),
    ({"warmup": -2}, "warmup: -2 is not an integer >= 0"),
    ({"timeout": 0}, "timeout: 0 is not a number of seconds > 0"),
])
def test_bad_settings(models, kwargs, message):
    with pytest.raises(UserError) as e:
        latency.compare([models["a"]], progress=False, **kwargs)
    assert str(e.value) == message


def test_unresolved_dynamic_dims(models):
    with pytest.raises(UserError) as e:
        latency.compare([models["image"]], progress=False)
    assert str(e.value) == (f"{models['image']}: input 'x' has unresolved dynamic dims "
                            f"(2: H, 3: W) in Nx3xHxW; pass --shape x=1x3x224x224")


def test_batch_needs_dynamic_batch(models):
    with pytest.raises(UserError) as e:
        latency.compare([models["fixed"]], batch=(1, 8), progress=False)
    assert str(e.value) == (f"{models['fixed']}: input 'x' has a fixed batch dimension of 1, so "
                            f"batch 8 cannot run (use --batch 1 or export with a dynamic batch)")


def test_shape_errors(models):
    with pytest.raises(UserError) as e:
        latency.compare([models["a"]], shapes={"x": (1, 63)}, progress=False)
    assert str(e.value) == (f"{models['a']}: input 'x' has shape Nx64 but 1x63 was given "
                            f"(dim 1 must be 64)")
    with pytest.raises(UserError) as e:
        latency.compare([models["a"]], shapes={"inp": (1, 64)}, progress=False)
    assert str(e.value) == "--shape inp: no model has an input named 'inp' (inputs: x)"


def test_data_that_does_not_match_input(models):
    digits_like = ArrayDataset(np.zeros((4, 1, 8, 8), np.float32), name="digits")
    with pytest.raises(UserError) as e:
        latency.compare([models["a"]], data=digits_like, progress=False)
    assert str(e.value) == (f"--data digits: samples of shape 1x8x8 do not match "
                            f"{models['a']} input 'x' (Nx64)")


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "deployopt: error: --threads: 0 is not an integer >= 1"),
    (["--runs", "-1"], "deployopt: error: --runs: -1 is not an integer >= 1"),
    (["--threads", "one"], "deployopt: error: --threads: 'one' is not a comma-separated list of "
                           "integers"),
    (["--shape", "x"], "deployopt: error: --shape: 'x' is not NAME=1x3x224x224"),
    (["--data", "digits"], "deployopt: error: --data digits: samples are 1x8x8 but model input "
                           "'x' expects 64"),
])
def test_cli_bad_input_exit_2(models, capsys, argv, message):
    assert cli_main(["bench", models["a"], "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [message]


def test_cli_not_a_model_exit_2(models, capsys):
    assert cli_main(["bench", models["a"], models["corrupt"], "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"deployopt: error: {models['corrupt']}: not an ONNX model")


def test_cli_writes_outputs(models, tmp_path, capsys):
    out = {k: tmp_path / f"r.{k}" for k in ("json", "csv", "md", "png")}
    rc = cli_main(["bench", models["a"], models["b"], "--runs", "5", "--rounds", "1",
                   "--warmup", "1", "--batch", "1,2", "--no-progress", "--json", str(out["json"]),
                   "--csv", str(out["csv"]), "--markdown", str(out["md"]),
                   "--plot", str(out["png"])])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].split()[:4] == ["model", "threads", "batch", "p50"]
    data = json.loads(out["json"].read_text())
    assert [(r["model"], r["batch"]) for r in data["rows"]] == [("a", 1), ("b", 1), ("a", 2),
                                                                 ("b", 2)]
    assert out["csv"].read_text().count("\n") == 5
    assert out["md"].read_text().startswith("| model |")
    assert out["png"].read_bytes()[:4] == b"\x89PNG"
