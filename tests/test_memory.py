"""Bounded memory of the quantize pass: the estimate made before any work (structure, refusal
through ``deployopt optimize``), the estimate against a measured peak, and calibration in chunks
giving the statistics of one pass over all samples."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import yaml

from benchmarks.detectors import detector_images, text_detector, write_text_detector
from deployopt.cli import main
from deployopt.core.data import ArrayDataset
from deployopt.passes.context import PassContext
from deployopt.passes.quantize import QuantizePass
from deployopt.passes.quantize import memory
from deployopt.passes.quantize.calibration import calibrate, chunked
from deployopt.passes.quantize.data import feeds, model_inputs

SIZE = (64, 64)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    path = write_text_detector(root / "det.onnx", SIZE)
    return path, detector_images(6, SIZE)


def test_detector_shape_and_activation_bytes():
    """The benchmark detector: 1x3xHxW -> 1x1xHxW, about 5 MB of weights; the estimate's
    per-sample activation bytes are the sum of its tensors (checked at two resolutions: 4x pixels,
    4x bytes)."""
    proto = text_detector(SIZE)
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [1, 1, *SIZE]
    assert 4.5e6 < memory.weight_bytes(proto) < 5.5e6
    small, unknown = memory.activation_bytes(proto, {"image": (1, 3, *SIZE)})
    large, _ = memory.activation_bytes(proto, {"image": (1, 3, 128, 128)})
    assert unknown == 0 and large == pytest.approx(4 * small, rel=0.01)
    # stage 1 alone: two 16-channel convs + relus at half resolution
    assert small > 4 * 16 * 32 * 32 * 4


def _work(method: str, batch: int = 8) -> memory.Workload:
    return memory.Workload(method=method, run_samples=1, batch_size=batch, sqnr_samples=1, fixed_batch=False,
                           refine=True, max_columns=2048)


def test_histogram_chunk_shrinks_to_fit_the_budget():
    """Histogram calibration keeps a chunk's outputs: under a tight budget the chunk gets
    smaller (never below one run); minmax does not depend on the chunk."""
    proto = text_detector((256, 256))
    shapes = {"image": (1, 3, 256, 256)}
    roomy = memory.estimate(proto, shapes, _work("percentile"), budget_mb=1e6)
    assert roomy.chunk_samples == 8
    per_sample = (memory.RUN_FACTOR + memory.HISTOGRAM_COPIES) * roomy.activation_mb_per_sample
    tight_budget = roomy.base_mb + max(roomy.stages_mb["sqnr"], roomy.stages_mb["refine"]) + 3.5 * per_sample
    tight = memory.estimate(proto, shapes, _work("percentile"), budget_mb=tight_budget)
    assert tight.chunk_samples == 3
    assert tight.total_mb <= tight_budget
    floor = memory.estimate(proto, shapes, _work("percentile"), budget_mb=1.0)
    assert floor.chunk_samples == 1
    minmax = memory.estimate(proto, shapes, _work("minmax"), budget_mb=1.0)
    assert minmax.stages_mb["calibration"] == pytest.approx(memory.RUN_FACTOR * minmax.activation_mb_per_sample)


def test_refused_run_exits_2_with_the_estimate(detector, tmp_path, capsys):
    path, x = detector
    np.save(tmp_path / "cal.npy", x)
    recipe = {"model": str(path), "data": {"calibration": {"dataset": f"npy:{tmp_path / 'cal.npy'}"}},
              "passes": [{"cleanup": {}}, {"quantize": {"max_memory_mb": 50}}],
              "benchmark": {"enabled": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["optimize", str(tmp_path / "r.yaml"), "-o", str(out), "--in-process"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the error
    assert [line for line in err if line.startswith("deployopt:")] == err[-1:]
    assert re.fullmatch(r"deployopt: (error: )?passes\[1\]\.quantize\.max_memory_mb: the run needs about "
                        r"[1-9][\d,]* MB, more than the 50 MB allowed; raise it or lower batch_size", err[-1]), err[-1]
    assert not (out / "model.onnx").exists()


def test_estimate_within_a_factor_of_the_measured_peak(tmp_path):
    """On a 128x128 detector the estimate recorded in the step details is within 1.5x of the peak
    RSS measured while the pass ran (both include the process, so also the growth above the RSS
    at the start is checked: the estimate's largest stage is at least half of it)."""
    size = (128, 128)
    p = QuantizePass(samples=2, batch_size=2, rounding="nearest", bias_correction=False, latency_aware=False,
                     min_step_speedup=None)
    p.context = PassContext(calibration=ArrayDataset(detector_images(2, size)), work_dir=tmp_path, threads=1)
    result = p(ir.from_proto(text_detector(size)))
    mem = result.details["memory"]
    assert {"budget_mb", "estimate_mb", "stages_mb", "measured_peak_mb", "calibration_chunk_samples"} <= set(mem)
    assert set(mem["stages_mb"]) == {"calibration", "sqnr"}  # no refinement: no Hessian stage
    ratio = mem["estimate_mb"] / mem["measured_peak_mb"]
    assert 1 / 1.5 <= ratio <= 1.5, mem
    start = mem["process_at_start_mb"]
    assert mem["estimate_mb"] - start >= 0.5 * (mem["measured_peak_mb"] - start), mem


def _ranges(path, x, tmp_path, method, per_chunk):
    inputs = model_inputs(onnx.load(str(path)))
    stream = feeds(ArrayDataset(x), inputs, None, 1)
    folder = tmp_path / f"{method}{per_chunk}"
    folder.mkdir()
    ranges = calibrate(path, folder, methods=[method], percentile=99.9, op_types=["Conv", "Relu", "Add", "Resize"],
                       chunks=chunked(stream, per_chunk), threads=1)[method]
    return {k: tuple(np.asarray(v, dtype=np.float64) for v in d.range_value) for k, d in ranges.data.items()}


@pytest.mark.parametrize("method, tol", [("minmax", 0.0), ("percentile", 0.02)])
def test_chunked_calibration_matches_one_pass(detector, tmp_path, method, tol):
    """Ranges from one-sample chunks equal those of a single chunk holding every sample: exactly
    for min/max (an associative reduction); for histograms within ``tol`` of the tensor's range
    (bins widen when a chunk exceeds the current range, so the edges differ slightly)."""
    path, x = detector
    whole = _ranges(path, x, tmp_path, method, len(x))
    chunks = _ranges(path, x, tmp_path, method, 1)
    assert whole.keys() == chunks.keys() and len(whole) > 20
    for name, (lo, hi) in whole.items():
        span = float(np.max(hi - lo)) or 1.0
        assert np.allclose(chunks[name][0], lo, rtol=0, atol=tol * span), name
        assert np.allclose(chunks[name][1], hi, rtol=0, atol=tol * span), name


def test_one_pass_gives_every_method_its_own_ranges(detector, tmp_path):
    """Several methods calibrated in one pass over the data (calibration: auto) get exactly the
    ranges each gets alone: minmax equal to onnxruntime's MinMax calibrator (its own augmented
    model), every histogram method to its collector fed alone."""
    path, x = detector
    methods = ["minmax", "mse", "entropy", "percentile", "distribution"]
    inputs = model_inputs(onnx.load(str(path)))
    folder = tmp_path / "together"
    folder.mkdir()
    together = calibrate(path, folder, methods=methods, percentile=99.9, op_types=["Conv", "Relu", "Add", "Resize"],
                         chunks=chunked(feeds(ArrayDataset(x), inputs, None, 1), 2), threads=1)
    assert list(together) == methods
    for method in methods:
        alone = _ranges(path, x, tmp_path, method, 2)
        got = {k: tuple(np.asarray(v, dtype=np.float64) for v in d.range_value)
               for k, d in together[method].data.items()}
        assert got.keys() == alone.keys() and len(got) > 20, method
        for name, (lo, hi) in alone.items():
            assert np.array_equal(got[name][0], lo) and np.array_equal(got[name][1], hi), (method, name)
    assert any(together["mse"].data[n].range_value[1] != together["minmax"].data[n].range_value[1]
               for n in together["mse"].data)  # the methods differ: the comparison can fail


def test_grouped_sqnr_equals_one_group(detector, tmp_path, monkeypatch):
    """The SQNR step run in groups of tensors (a cap small enough for several groups) gives the
    figures of one run exposing every tensor; every tensor is in exactly one group, each group
    holds at most the cap unless it is a single Q/DQ pair."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from deployopt.passes.quantize import sqnr

    path, x = detector

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(x[i:i + 1] for i in range(len(x)))

        def get_next(self):
            return next(({"image": s} for s in self.samples), None)

    qdq = tmp_path / "qdq.onnx"
    quantize_static(str(path), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    samples = lambda: ({"image": x[i:i + 1]} for i in range(3))  # noqa: E731
    opened = []
    real_session = sqnr._session
    monkeypatch.setattr(sqnr, "_session", lambda *a, **k: opened.append(a[1]) or real_session(*a, **k))
    whole = sqnr.tensor_sqnr(path, qdq, tmp_path, samples, threads=1)
    assert len(opened) == 2 and len(whole) > 20  # one group: the quantized and the float model
    opened.clear()
    cap = 64 * 64 * 16 * 4 * 3  # a few 16-channel 64x64 tensors
    grouped = sqnr.tensor_sqnr(path, qdq, tmp_path, samples, threads=1, group_bytes=cap)
    groups = opened[::2]  # the quantized model's outputs of each group
    assert len(groups) >= 4
    names = [v.name for g in groups for v in g]
    assert len(names) == len(set(names))  # no tensor exposed twice
    assert grouped.keys() == whole.keys()
    for name, figures in whole.items():
        assert grouped[name] == pytest.approx(figures, rel=1e-9, abs=0), name
    # the packing itself: every component once, under the cap unless alone
    components = sqnr.pair_components(names)
    sizes = {n: 1.0 + i % 3 for i, n in enumerate(names)}
    packed = sqnr.pack(components, sizes, 4.0)
    assert sorted(n for g in packed for n in g) == sorted(n for c in components for n in c)
    for g in packed:
        assert sum(sizes[n] for n in g) <= 4.0 or any(sorted(g) == sorted(c) for c in components)


# -- the memory benchmark's measurement ------------------------------------------------------------
_BIG_PARENT = """
import json, os, subprocess, sys
import numpy as np
from benchmarks.run_memory import LAUNCHER
big = np.ones(300 * 2**20 // 4, np.float32)  # 300 MiB resident, then freed: this process's peak
del big
child = [sys.executable, "-c", "pass"]
p = subprocess.Popen(child)
_, _, usage = os.wait4(p.pid, 0)
launched = subprocess.run([sys.executable, "-c", LAUNCHER, *child], capture_output=True, text=True, check=True)
print(json.dumps({"direct_mb": usage.ru_maxrss / 1024,
                  "launched_mb": json.loads(launched.stdout)["maxrss_kib"] / 1024}))
"""


def test_benchmark_peak_is_the_child_own_not_its_parent():
    """A child started straight from a process that once held 300 MiB reports that peak as its own
    ru_maxrss (Linux carries it over the vfork and exec); started through the benchmark's launcher
    it reports its own size (an idle interpreter, well under 100 MiB)."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _BIG_PARENT], capture_output=True, text=True, check=True, cwd=root)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks["direct_mb"] >= 300
    assert peaks["launched_mb"] < 100


def test_benchmark_table_round_trips_and_only_keeps_the_other_rows(tmp_path, monkeypatch):
    """``--only`` rewrites one model's rows and keeps the other model's rows of the published table."""
    from benchmarks import run_memory

    def row(n, peak, command):
        return {"samples": n, "exit": 0, "peak_mb": peak, "seconds": 10.0 * n, "command": command,
                "memory": {"estimate_mb": "1064", "measured_peak_mb": str(round(peak))}}

    layout = "python -m benchmarks.run_memory"
    published = {"detector": [row(8, 850.0, "old"), row(64, 1282.0, "old")],
                 "layout": [row(8, 2246.0, layout), row(64, 2655.0, layout)]}
    text = run_memory._markdown(published)
    assert run_memory.published_rows(text) == published
    assert "- detector, 64 over 8 samples: 1.51x, target <= 1.3x: NOT met" in text
    results = tmp_path / "memory.md"
    results.write_text(text)
    monkeypatch.setattr(run_memory, "RESULTS", results)
    monkeypatch.setattr(run_memory.tempfile, "tempdir", str(tmp_path))  # its scratch folder goes here
    monkeypatch.setattr(run_memory, "write_text_detector", lambda path: path)
    fresh = {8: 840.0, 64: 900.0}
    monkeypatch.setattr(run_memory, "run_one", lambda path, n, images, root, tag: row(n, fresh[n], ""))
    assert run_memory.main(["--only", "detector"]) == 0
    rows = run_memory.published_rows(results.read_text())
    assert [r["peak_mb"] for r in rows["detector"]] == [840.0, 900.0]
    assert {r["command"] for r in rows["detector"]} == {"python -m benchmarks.run_memory --only detector"}
    assert rows["layout"] == published["layout"]
    assert "- detector, 64 over 8 samples: 1.07x, target <= 1.3x: met" in results.read_text()
