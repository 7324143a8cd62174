"""Per-node profile: trace parsing, the mapping of onnxruntime's fused nodes back to the saved
model's nodes, rows that add up, `deployopt bench --profile`, refusal of bad input.

Models are small onnx.helper graphs (random weights: only timing and structure are asserted).
On models this small the per-run overhead outside kernels is a sizeable part of a run, so
coverage is only asserted within [0.5, 1.5] here; the tight [0.85, 1.15] bound is asserted on
ResNet-18 / MobileNetV2 by benchmarks/run_profile.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployopt.measure import profile
from deployopt.measure.profile import GraphNode, map_nodes, parse_trace, profile_model
from deployopt.cli import main as cli_main
from deployopt.core.errors import UserError, WorkFailed


def _save(nodes, inits, x_shape, y_shape, path, *, opsets=(("", 17),)):
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _conv_net(path, size=96):
    """x [N,3,s,s] -> conv1 (16) -> relu1 -> conv2 (16) -> relu2 -> gap -> flatten -> fc -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", rng.standard_normal((16, 3, 3, 3)) * 0.3), ("b1", rng.standard_normal(16) * 0.1),
        ("w2", rng.standard_normal((16, 16, 3, 3)) * 0.1), ("b2", rng.standard_normal(16) * 0.1),
        ("wf", rng.standard_normal((16, 10)) * 0.3))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "wf"], ["y"], name="fc")]
    return _save(nodes, inits, ["N", 3, size, size], ["N", 10], path)


def _qdq_conv(tmp_path):
    """A float Conv net quantized by onnxruntime (QDQ, uint8 activations, int8 per-channel)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.batches = iter([{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}
                                 for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    fp32 = _conv_net(tmp_path / "qdq-fp32.onnx", size=32)
    out = tmp_path / "qdq.onnx"
    quantize_static(fp32, str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return str(out)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return _conv_net(tmp_path_factory.mktemp("profile") / "net.onnx")


@pytest.fixture(scope="module")
def isolated_profile(net):
    """One profile in a worker process, shared by the tests that read its numbers."""
    return profile_model(net, runs=30, warmup=3, shapes={"x": (1, 3, 96, 96)})


# -- trace parsing ------------------------------------------------------------------------------

def _run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _node(name, ts, dur, op="Conv"):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
            "args": {"op_name": op, "provider": "CPUExecutionProvider"}}


def test_parse_trace_drops_warmup_runs():
    events = [_run(0, 100), _node("a", 10, 50), _node("b", 70, 20, "Relu"),  # warm-up
              _run(200, 40), _node("a", 205, 30), _node("b", 236, 3, "Relu"),
              _run(300, 40), _node("a", 305, 32), _node("b", 338, 1, "Relu"),
              {"cat": "Session", "name": "SequentialExecutor::Execute", "ts": 301, "dur": 38}]
    trace = parse_trace(events, skip_runs=1)
    assert trace["runs"] == 2
    assert trace["nodes"]["a"] == {"op_type": "Conv", "provider": "CPUExecutionProvider",
                                   "total_us": 62.0}
    assert trace["nodes"]["b"]["total_us"] == 4.0
    assert trace["run_us"] == [40, 40]
    with pytest.raises(ValueError, match="holds 3 runs, 3 of them warm-up"):
        parse_trace(events, skip_runs=3)


# -- mapping (pure) -----------------------------------------------------------------------------

def _g(name, op, inputs, outputs):
    return GraphNode(name, op, tuple(inputs), tuple(outputs))


def test_map_nodes_nchwc_names_and_fused_add_goes_to_the_kernel_that_runs_last():
    # ResNet downsample: two convs feed an Add (+Relu) only they use; onnxruntime fuses the Add
    # and Relu into the second NCHWc conv, named after its output tensor.
    original = [_g("conv_a", "Conv", ["x", "wa"], ["ta"]),
                _g("conv_b", "Conv", ["x", "wb"], ["tb"]),
                _g("add", "Add", ["ta", "tb"], ["s"]), _g("relu", "Relu", ["s"], ["r"]),
                _g("dead", "Relu", ["x"], ["unused"]), _g("head", "Flatten", ["r"], ["y"])]
    executed = [_g("ReorderInput", "ReorderInput", ["x"], ["t0"]),
                _g("ta_nchwc", "Conv", ["t0", "wa'"], ["t1"]),
                _g("tb_nchwc", "Conv", ["t0", "wb'", "", "t1"], ["t2"]),
                _g("ReorderOutput", "ReorderOutput", ["t2"], ["r"]),
                _g("head", "Flatten", ["r"], ["y"])]
    mapping, unmapped = map_nodes(original, executed, ("y",))
    assert mapping["ta_nchwc"] == ["conv_a"]
    assert mapping["tb_nchwc"] == ["conv_b", "add", "relu"]
    assert mapping["ReorderInput"] == []  # inserted by onnxruntime
    assert mapping["ReorderOutput"] == ["relu"]  # the layout conversion of relu's output
    assert mapping["head"] == ["head"]
    assert unmapped == ["dead"]


def test_map_nodes_qdq_splits_like_node_units():
    # DQ -> Conv -> Q -> DQ -> Conv -> Q: DequantizeLinear joins its consumer's kernel,
    # QuantizeLinear its producer's; the kernels are named <Conv name>_token_<k>.
    original = [_g("x_q", "QuantizeLinear", ["x", "s", "z"], ["xq"]),
                _g("x_dq", "DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                _g("w1_dq", "DequantizeLinear", ["w1q", "ws", "wz"], ["w1"]),
                _g("conv1", "Conv", ["xd", "w1"], ["c1"]),
                _g("c1_q", "QuantizeLinear", ["c1", "s", "z"], ["c1q"]),
                _g("c1_dq", "DequantizeLinear", ["c1q", "s", "z"], ["c1d"]),
                _g("w2_dq", "DequantizeLinear", ["w2q", "ws", "wz"], ["w2"]),
                _g("conv2", "Conv", ["c1d", "w2"], ["c2"]),
                _g("c2_q", "QuantizeLinear", ["c2", "s", "z"], ["y"])]
    executed = [_g("x_q", "QuantizeLinear", ["x", "s", "z"], ["xq"]),
                _g("conv1_token_3", "QLinearConv", ["xq", "s", "z", "w1q"], ["conv1"]),
                _g("conv2_quant", "QLinearConv", ["conv1", "s", "z", "w2q"], ["y"])]
    mapping, unmapped = map_nodes(original, executed, ("y",))
    assert mapping["x_q"] == ["x_q"]
    assert mapping["conv1_token_3"] == ["conv1", "x_dq", "w1_dq", "c1_q"]
    assert mapping["conv2_quant"] == ["conv2", "c1_dq", "w2_dq", "c2_q"]
    assert unmapped == []


# -- profiles of real sessions ------------------------------------------------------------------

def test_rows_add_up_and_coverage(isolated_profile, net):
    p = isolated_profile
    assert p.model == net and p.title == "net.onnx"
    row_sum = sum(r.mean_ms for r in p.rows)
    assert p.total_node_ms == pytest.approx(row_sum, rel=1e-12)
    assert sum(p.by_op_type.values()) == pytest.approx(row_sum, rel=1e-12)
    for op, ms in p.by_op_type.items():
        assert ms == pytest.approx(sum(r.mean_ms for r in p.rows if r.op_type == op), rel=1e-12)
    assert sum(r.share for r in p.rows) == pytest.approx(1.0, abs=1e-9)
    assert [r.mean_ms for r in p.rows] == sorted((r.mean_ms for r in p.rows), reverse=True)
    assert list(p.by_op_type.values()) == sorted(p.by_op_type.values(), reverse=True)
    assert p.coverage == pytest.approx(p.total_node_ms / p.end_to_end_ms, rel=1e-12)
    assert 0.5 <= p.coverage <= 1.5  # tiny model: per-run overhead is a visible part (module doc)
    assert p.profiled_run_ms >= p.total_node_ms  # kernels run inside model_run
    assert p.settings["inputs"] == {"x": [1, 3, 96, 96]}
    assert p.settings["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert p.machine["onnxruntime"] and p.machine["cores"] >= 1
    # Every node of the saved model is accounted for by some executed node.
    covered = {n for r in p.rows for n in r.original_nodes}
    assert covered == {"conv1", "relu1", "conv2", "relu2", "gap", "flatten", "fc"}
    assert p.unmapped_original == []
    assert p.top(2) == p.rows[:2]
    data = json.loads(p.to_json())
    assert data["coverage"] == p.coverage and len(data["rows"]) == len(p.rows)
    assert set(data["rows"][0]) == {"node", "op_type", "original_nodes", "mean_ms", "share",
                                    "provider"}


def test_conv_relu_fusion_maps_back_to_both_nodes(net):
    p = profile_model(net, runs=5, warmup=1, isolated=False)
    assert "Relu" not in p.by_op_type  # both Relus were fused into their convs
    owners = {name: [r for r in p.rows if name in r.original_nodes] for name in ("conv1", "relu1")}
    kernel = next(r for r in owners["conv1"] if r.op_type in ("Conv", "FusedConv"))
    assert {"conv1", "relu1"} <= set(kernel.original_nodes)
    assert "conv2" not in kernel.original_nodes
    # Without graph optimizations the executed nodes are the saved ones, one to one.
    plain = profile_model(net, runs=3, warmup=1, isolated=False, optimization_level="disable")
    assert {r.node: r.original_nodes for r in plain.rows} == {
        n: [n] for n in ("conv1", "relu1", "conv2", "relu2", "gap", "flatten", "fc")}
    assert {r.node: r.op_type for r in plain.rows}["relu1"] == "Relu"


def test_qdq_conv_maps_back_to_the_original_conv(tmp_path):
    path = _qdq_conv(tmp_path)
    p = profile_model(path, runs=5, warmup=1, isolated=False)
    qconvs = [r for r in p.rows if r.op_type == "QLinearConv"]
    assert len(qconvs) == 2
    by_conv = {r.original_nodes[0]: r for r in qconvs}
    assert set(by_conv) == {"conv1", "conv2"}  # the float Conv first, its Q/DQ after it
    assert all(n.endswith(("QuantizeLinear", "DequantizeLinear"))
               for r in qconvs for n in r.original_nodes[1:])
    assert "relu1" not in p.by_op_type


def test_markdown_and_text_tables(isolated_profile):
    md = isolated_profile.to_markdown(n=3)
    lines = md.splitlines()
    assert lines[2] == "| node | op type | ms | share | original nodes |"
    assert len([ln for ln in lines[4:] if ln.startswith("| ") and ln.count("|") == 6]) == 3
    assert "coverage" in lines[0] and "machine:" in md
    text = isolated_profile.to_text(n=2)
    assert text.startswith("profile of net.onnx (threads 1, batch 1, ORT_ENABLE_ALL, 30 runs")
    assert isolated_profile.rows[0].node in text and isolated_profile.rows[2].node not in text


# -- refusal ------------------------------------------------------------------------------------

def test_bad_model_is_a_user_error(tmp_path, net):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a model")
    with pytest.raises(UserError, match="corrupt.onnx"):
        profile_model(corrupt)
    with pytest.raises(UserError, match="^runs: 0 is not an integer >= 1$"):
        profile_model(net, runs=0)
    with pytest.raises(UserError, match="^optimization_level: 'max' is not one of"):
        profile_model(net, optimization_level="max")
    with pytest.raises(UserError,
                       match=r"^shapes: .*net.onnx has no input named 'z' \(inputs: x\)$"):
        profile_model(net, shapes={"z": (1, 3, 8, 8)})


def test_onnxruntime_failure_in_the_worker_is_work_failed(tmp_path):
    # The checker cannot check a custom domain, so the file loads; onnxruntime has no kernel.
    path = _save([helper.make_node("Mystery", ["x"], ["y"], domain="com.example", name="m")],
                 [], [1, 4], [1, 4], tmp_path / "custom.onnx",
                 opsets=(("", 17), ("com.example", 1)))
    with pytest.raises(WorkFailed, match=r"custom.onnx: profiling failed: .*Mystery"):
        profile_model(path, runs=2, warmup=0)


# -- CLI ----------------------------------------------------------------------------------------

def test_bench_profile_prints_top_nodes_and_op_types(net, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    code = cli_main(["bench", net, "--runs", "5", "--rounds", "1", "--warmup", "1",
                     "--no-progress", "--profile", "--top", "2", "--json", str(out_json)])
    assert code == 0
    out = capsys.readouterr().out
    table, _, prof = out.partition("\nprofile of net (threads 1, batch 1, ORT_ENABLE_ALL, 5 runs")
    assert prof, out
    assert "p50 ms" in table
    lines = prof.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("node "))
    assert lines[header].split() == ["node", "op", "type", "ms", "share", "original", "nodes"]
    assert lines[header + 1].startswith("---")
    assert len(lines[header + 2:lines.index("", header)]) == 2  # --top 2
    ops = next(i for i, ln in enumerate(lines) if ln.startswith("op type "))
    assert lines[ops].split() == ["op", "type", "ms", "share", "nodes"]
    saved = json.loads(out_json.read_text())
    assert saved["rows"][0]["model"] == "net"
    assert saved["profiles"][0]["label"] == "net" and saved["profiles"][0]["rows"]


def test_bench_top_needs_profile(net, capsys):
    assert cli_main(["bench", net, "--top", "3", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == "deployopt: error: --top: only used with --profile"
    assert cli_main(["bench", net, "--profile", "--top", "0", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == "deployopt: error: --top: 0 is not an integer >= 1"


def test_blocks_split_runs_evenly():
    assert profile.run_blocks(12) == [3, 3, 2, 2, 2]
    assert profile.run_blocks(3) == [1, 1, 1]
    assert sum(profile.run_blocks(50)) == 50
