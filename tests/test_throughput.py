"""Throughput mode of bench (server-style deployment): N concurrent worker processes per model,
aggregate inferences/s over the window where all N run, latency percentiles under that load."""

from __future__ import annotations

import numpy as np
import pytest

import deployopt
from deployopt.cli import main
from deployopt.core.errors import UserError
from deployopt.measure.latency import _concurrent_window
from tests.test_latency import _mlp


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # Large enough (about 0.3 ms a run here) that two instances' timed runs overlap on a busy host.
    return _mlp(tmp_path_factory.mktemp("throughput") / "mlp.onnx", hidden=1024, features=1024)


def test_two_instances_give_aggregate_throughput_and_latency_under_load(model):
    # 400 runs of about 0.3 ms: each timed segment lasts about 120 ms, far longer than the start
    # skew of two processes on a busy 2-core host (50 runs, 15 ms, once failed to overlap in CI).
    runs, rounds = 400, 2
    result = deployopt.bench([model], instances=2, runs=runs, rounds=rounds, warmup=2)
    (row,) = result.rows
    assert row["error"] is None and row["instances"] == 2 and row["threads"] == 1
    assert len(row["samples_ms"]) == 2 * runs * rounds  # every run of both instances
    assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert result.settings["instances"] == 2
    segments = [t for t in result.timeline if t["model"] == "mlp"]
    assert len(segments) == rounds
    for t in segments:
        assert t["instances"] == 2 and 0 < t["window_ms"] <= t["wall_ms"] * 1.5
        assert 0 < t["window_runs"] <= 2 * runs
    # the aggregate is its definition: inferences that ended in the common windows / their length
    done = sum(t["window_runs"] for t in segments)
    window_s = sum(t["window_ms"] for t in segments) / 1000
    assert row["throughput_ips"] == pytest.approx(done / window_s, rel=1e-6)
    assert "2 concurrent instances per model" in result.to_text()


def test_one_instance_is_the_latency_path(model):
    result = deployopt.bench([model], runs=10, rounds=1, warmup=1)
    (row,) = result.rows
    assert row["instances"] == 1 and len(row["samples_ms"]) == 10
    assert row["throughput_ips"] == pytest.approx(1000 / row["mean_ms"], rel=1e-12)
    assert "window_ms" not in result.timeline[0]


def test_concurrent_window_counts_runs_inside_the_overlap():
    ms = 1_000_000
    # instance A: starts at 0, 4 runs of 1 ms; instance B: starts at 1.5 ms, 4 runs of 1 ms.
    a = ("ok", np.full(4, ms), 4 * ms, 0.0, 0.0, 0)
    b = ("ok", np.full(4, ms), 4 * ms, 0.0, 0.0, int(1.5 * ms))
    done, window = _concurrent_window([a, b])
    # window [1.5 ms, 4 ms]: A's runs ending at 2, 3, 4 ms and B's ending at 2.5, 3.5 ms
    assert window == int(2.5 * ms) and done == 5
    apart = ("ok", np.full(2, ms), 2 * ms, 0.0, 0.0, 10 * ms)
    assert _concurrent_window([a, apart]) == (0, 0)


def test_instances_below_one_are_refused(model, capsys):
    assert main(["bench", model, "--instances", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deployopt: error: --instances: 0 is not an integer >= 1"]
    assert main(["bench", model, "--instances", "two"]) == 2
    assert capsys.readouterr().err.strip() == "deployopt: error: --instances: 'two' is not an integer"
    with pytest.raises(UserError, match=r"^instances: 0 is not an integer >= 1$"):
        deployopt.bench([model], instances=0)
