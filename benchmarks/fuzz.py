"""Fuzzing: mutate a valid ResNet-style model and feed each mutant through the CLI.

``run_campaign`` (used by tests/test_fuzz.py and benchmarks/run_reliability.py) starts this module
as a driver subprocess: ``python -m benchmarks.fuzz SEED_MODEL WORKDIR COUNT START RESULTS.jsonl``.
Each case calls ``deployopt.cli.main`` in this process (``--in-process``, fast), once for
``inspect`` and once for ``optimize`` with cleanup + quantize, and appends one JSON line with the
exit codes and stderr. A hard crash of this process (a C++ abort in onnx/onnxruntime) ends the
driver; ``run_campaign`` then replays that case through the contained CLI, which must survive it.
``uncaught_exception`` tells a clean refusal from a bug of ours in a case's stderr.

Mutations (seeded, reproducible): bit flips, truncations, and random field changes of the parsed
protobuf (op types, node inputs, attributes, initializer dims and dtypes, input shapes, opset,
names, removed nodes and initializers).
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np
import onnx
import yaml

CASE_SECONDS = 120  # a case running longer counts as a hang
CHECKOUT = pathlib.Path(__file__).resolve().parent.parent  # benchmarks/ is importable from here only

# The pipeline turns an unexpected exception inside a pass into "passes[i].NAME failed: TypeError: ...":
# a clean exit, but a bug of ours all the same.
PYTHON_BUG = re.compile(r"failed: (TypeError|AttributeError|KeyError|IndexError|ValueError|AssertionError|"
                        r"ZeroDivisionError|NameError|UnboundLocalError|RecursionError):")

_OPS = ["Relu", "Conv", "Gemm", "Add", "Mul", "MatMul", "Concat", "Reshape", "Flatten", "Softmax", "Sigmoid",
        "GlobalAveragePool", "MaxPool", "BatchNormalization", "Identity", "NoSuchOp", "Clip", "Transpose"]


def _field_mutation(proto: onnx.ModelProto, rng: np.random.Generator) -> str:
    graph = proto.graph
    kind = int(rng.integers(0, 11))
    node = graph.node[int(rng.integers(0, len(graph.node)))] if len(graph.node) else None
    if kind == 0 and node is not None:
        node.op_type = str(rng.choice(_OPS))
        return f"op_type of {node.name} -> {node.op_type}"
    if kind == 1 and node is not None and len(node.input):
        j = int(rng.integers(0, len(node.input)))
        names = [v.name for v in graph.value_info] + [i.name for i in graph.initializer] + ["", "ghost"]
        node.input[j] = str(rng.choice(names))
        return f"input {j} of {node.name} -> {node.input[j]!r}"
    if kind == 2 and node is not None and len(node.attribute):
        attr = node.attribute[int(rng.integers(0, len(node.attribute)))]
        if attr.ints:
            attr.ints[int(rng.integers(0, len(attr.ints)))] = int(rng.integers(-3, 9))
        elif attr.type == onnx.AttributeProto.INT:
            attr.i = int(rng.integers(-3, 9))
        elif attr.type == onnx.AttributeProto.FLOAT:
            attr.f = float(rng.choice([0.0, -1.0, 1e30, float("nan")]))
        return f"attribute {attr.name} of {node.name}"
    if kind == 3 and len(graph.initializer):
        init = graph.initializer[int(rng.integers(0, len(graph.initializer)))]
        if len(init.dims):
            init.dims[int(rng.integers(0, len(init.dims)))] = int(rng.integers(0, 20))
        return f"dims of {init.name}"
    if kind == 4 and len(graph.initializer):
        init = graph.initializer[int(rng.integers(0, len(graph.initializer)))]
        init.data_type = int(rng.choice([onnx.TensorProto.INT8, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64,
                                         onnx.TensorProto.FLOAT16, 0]))
        return f"dtype of {init.name}"
    if kind == 5:
        dims = graph.input[0].type.tensor_type.shape.dim
        if len(dims):
            d = dims[int(rng.integers(0, len(dims)))]
            choice = int(rng.integers(0, 3))
            if choice == 0:
                d.dim_value = int(rng.integers(0, 64))
            elif choice == 1:
                d.dim_param = "free"
            else:
                d.Clear()
        return "input shape"
    if kind == 6:
        proto.opset_import[0].version = int(rng.choice([1, 7, 9, 11, 13, 17, 25, 99]))
        return f"opset -> {proto.opset_import[0].version}"
    if kind == 7 and node is not None and len(node.output):
        node.output[0] = str(rng.choice(["logits", "input", "", "x"]))
        return f"output of {node.name} -> {node.output[0]!r}"
    if kind == 8 and node is not None:
        graph.node.remove(node)
        return f"removed node {node.name}"
    if kind == 9 and len(graph.initializer):
        init = graph.initializer[int(rng.integers(0, len(graph.initializer)))]
        graph.initializer.remove(init)
        return f"removed initializer {init.name}"
    proto.graph.input[0].type.tensor_type.elem_type = int(rng.choice([onnx.TensorProto.UINT8,
                                                                      onnx.TensorProto.DOUBLE, 0]))
    return "input dtype"


def uncaught_exception(stderr: str) -> bool:
    """Whether a CLI run's stderr shows an exception that escaped deployopt's error handling."""
    return "internal error" in stderr or "Traceback" in stderr or PYTHON_BUG.search(stderr) is not None


def make_mutant(seed_bytes: bytes, index: int) -> tuple[bytes, str]:
    rng = np.random.default_rng(1000 + index)
    family = index % 4
    if family == 0:  # bit flips
        data = bytearray(seed_bytes)
        flips = int(rng.integers(1, 9))
        for _ in range(flips):
            pos = int(rng.integers(0, len(data)))
            data[pos] ^= 1 << int(rng.integers(0, 8))
        return bytes(data), f"{flips} bit flip(s)"
    if family == 1:  # truncation
        cut = int(rng.integers(0, len(seed_bytes)))
        return seed_bytes[:cut], f"truncated to {cut} bytes"
    proto = onnx.ModelProto()
    proto.ParseFromString(seed_bytes)
    changes = [_field_mutation(proto, rng) for _ in range(int(rng.integers(1, 3)))]
    return proto.SerializeToString(), "; ".join(changes)


def _call(argv: list[str]) -> dict:
    from deployopt.cli import main

    err = io.StringIO()
    out = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    return {"code": code, "stderr": err.getvalue()[-2000:]}


def recipe_for(model: pathlib.Path, data: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    recipe = {"model": str(model),
              "data": {"calibration": {"dataset": f"npz:{data}"}},
              "passes": [{"cleanup": {}}, {"quantize": {"min_step_speedup": None}}],
              "benchmark": {"enabled": False}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def _timeout(signum, frame):
    raise TimeoutError(f"case ran longer than {CASE_SECONDS} s")


def main(argv: list[str]) -> int:
    seed_model, work, count, start, results = (pathlib.Path(argv[0]), pathlib.Path(argv[1]), int(argv[2]),
                                               int(argv[3]), pathlib.Path(argv[4]))
    seed_bytes = seed_model.read_bytes()
    data = work / "calib.npz"
    signal.signal(signal.SIGALRM, _timeout)
    for index in range(start, count):
        mutant_bytes, description = make_mutant(seed_bytes, index)
        case_dir = work / f"case{index:03d}"
        case_dir.mkdir(exist_ok=True)
        model = case_dir / "model_in.onnx"
        model.write_bytes(mutant_bytes)
        recipe = recipe_for(model, data, case_dir / "recipe.yaml")
        with results.open("a") as f:  # mark the case as started: a crash leaves this line last
            f.write(json.dumps({"index": index, "started": True, "mutation": description}) + "\n")
        record = {"index": index, "mutation": description}
        signal.alarm(CASE_SECONDS)
        try:
            record["inspect"] = _call(["inspect", str(model), "--in-process"])
            record["optimize"] = _call(["optimize", str(recipe), "-o", str(case_dir / "out"), "--in-process"])
        except TimeoutError as e:
            record["hang"] = str(e)
        finally:
            signal.alarm(0)
        record["input_unchanged"] = model.read_bytes() == mutant_bytes
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


def _contained_replay(model: pathlib.Path, recipe: pathlib.Path, out: pathlib.Path) -> dict:
    """Replay a case that crashed the in-process driver through the real (contained) CLI."""
    record = {}
    for verb, argv in (("inspect", ["inspect", str(model)]),
                       ("optimize", ["optimize", str(recipe), "-o", str(out), "--timeout", "300"])):
        proc = subprocess.run([sys.executable, "-m", "deployopt.cli", *argv], capture_output=True, text=True,
                              timeout=600)
        record[verb] = {"code": proc.returncode, "stderr": proc.stderr[-2000:]}
    return record


def run_campaign(seed_model: pathlib.Path, work: pathlib.Path, count: int, calibration: np.ndarray) -> list[dict]:
    """Run ``count`` mutants; returns one record per case (crashes replayed through the CLI)."""
    seed_model, work = seed_model.resolve(), work.resolve()  # the driver runs in the checkout
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "calib.npz", x=calibration)
    results = work / "results.jsonl"
    results.unlink(missing_ok=True)
    records: dict[int, dict] = {}
    start = 0
    while start < count:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.fuzz", str(seed_model), str(work), str(count),
                               str(start), str(results)], capture_output=True, text=True,
                              timeout=count * CASE_SECONDS, cwd=CHECKOUT)
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        for line in lines:
            if not line.get("started"):
                records[line["index"]] = line
        if proc.returncode == 0:
            break
        # the driver died: the last started case crashed it; replay it through the contained CLI
        crashed = [line for line in lines if line.get("started")][-1]
        index = crashed["index"]
        case = work / f"case{index:03d}"
        record = {"index": index, "mutation": crashed["mutation"], "driver_crash": proc.returncode,
                  **_contained_replay(case / "model_in.onnx", case / "recipe.yaml", case / "out")}
        records[index] = record
        start = index + 1
    return [records[i] for i in sorted(records)]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
