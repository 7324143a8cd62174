"""CI check: the base install (no extras, no torch) quantizes an ONNX model end to end.

Run with the interpreter of a virtual environment where only `pip install .` was done. Builds a
small CNN with onnx.helper (no torch), calibration data with numpy, and runs
`deployopt optimize` with cleanup + quantize through the CLI and through the Python API.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def small_cnn(path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32)
    fc = rng.normal(0, 0.2, (10, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (fc, "fc"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def main() -> int:
    assert importlib.util.find_spec("torch") is None, "the base install must not bring torch"
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        small_cnn(work / "model.onnx")
        np.save(work / "calib.npy", np.random.default_rng(1).uniform(0, 1, (64, 3, 32, 32)).astype(np.float32))
        (work / "recipe.yaml").write_text(
            "model: model.onnx\n"
            "data:\n  calibration: {dataset: 'npy:calib.npy', preprocess: none}\n"
            "passes:\n  - cleanup: {}\n  - quantize: {min_step_speedup: null, latency_aware: false}\n"
            "benchmark: {threads: [1], runs: 20, rounds: 2, warmup: 3}\n")
        proc = subprocess.run([str(pathlib.Path(sys.executable).parent / "deployopt"), "optimize",
                               str(work / "recipe.yaml"), "-o", str(work / "out")], capture_output=True, text=True)
        print(proc.stdout[-1500:], proc.stderr[-1500:])
        assert proc.returncode == 0, f"deployopt optimize exited {proc.returncode}"
        ops = {n.op_type for n in onnx.load(str(work / "out" / "model.onnx")).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops

        import deployopt

        report = deployopt.optimize(work / "recipe.yaml", work / "api-out")
        assert report.passed and report.steps[-1]["pass"] == "quantize", report.reason
        try:
            deployopt.export("seed_cnn", work / "x.onnx")
        except deployopt.UserError as e:
            assert "pip install 'deployopt[torch]'" in str(e), e
        else:
            raise AssertionError("export worked without torch")
    print("base install: cleanup + quantize ran without torch; export refused with the extra's name")
    return 0


if __name__ == "__main__":
    sys.exit(main())
