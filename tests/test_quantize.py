"""QuantizePass: structure (Q/DQ counts, dtypes, per-channel axes), numbers (a digits-trained CNN
vs its float model, ORT optimizations off), third-party graphs, fallback, range tuning, and refusals."""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from deployopt.passes.context import PassContext
from deployopt.core.data import ArrayDataset, Dataset
from deployopt.core.errors import UserError
from deployopt.core.session import open_session
from deployopt.passes.quantize.calibration import calibrate, chunked
from deployopt.passes.quantize.data import feeds, model_inputs
from deployopt.passes.quantize import QuantizePass, fallback
from tests._fixtures import mean_kl, train_classifier

N_TRAIN = 1400


def _train(x, y, seed=0) -> nn.Module:
    """Conv-ReLU-Conv-ReLU-Linear, 15 epochs of Adam on 1,400 digits."""
    torch.set_num_threads(1)  # tiny batches: more threads only contend with onnxruntime's pool
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 16, 10))
    train_classifier(net, x[:N_TRAIN], y[:N_TRAIN], epochs=15)
    return net.eval()


def _export(net: nn.Module, *, dynamic: bool = True, opset: int = 17) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(net, torch.zeros(1, 1, 8, 8), buf, dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}} if dynamic else None)
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module")
def trained(digits):
    x, y = digits
    return _train(x, y)


@pytest.fixture(scope="module")
def float_proto(trained):
    return _export(trained)


@pytest.fixture(scope="module")
def outlier_proto(trained, digits):
    """The same function with one outlier channel: conv1's most active channel scaled by 300 and
    conv2's matching input weights by 1/300 (ReLU is positively homogeneous, so the float model
    computes the same logits), which makes the per-tensor uint8 scale of that activation 300x too
    coarse for the other 15 channels."""
    x, _ = digits
    net = copy.deepcopy(trained)  # training is deterministic: a second run would give these weights
    with torch.no_grad():
        c = int(net[1](net[0](torch.from_numpy(x[:256]))).mean((0, 2, 3)).argmax())
        net[0].weight[c] *= 300.0
        net[0].bias[c] *= 300.0
        net[2].weight[:, c] /= 300.0
    return _export(net)


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Logits with ORT graph optimizations off (the QDQ graph exactly as written)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    if sess.get_inputs()[0].shape[0] == 1:
        return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    return sess.run(None, {name: x})[0]


def _quantize(proto, cal, ev=None, **settings):
    """The quantized model and the StepResult (notes, details, failure) of one QuantizePass run.
    No latency search unless a test asks for it: on a loaded machine it may rightly keep a tiny
    net in float, and these tests check the int8 graph (test_quantize_latency.py checks the search)."""
    p = QuantizePass(**{"latency_aware": False, **settings})
    p.context = PassContext(calibration=cal, evaluation=ev)
    result = p(ir.from_proto(proto))
    return ir.to_proto(result.model), result


def _initializers(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


# -- structure ------------------------------------------------------------------------------------
def test_qdq_counts_dtypes_and_per_channel_axes(float_proto, digits):
    x, _ = digits
    q, step = _quantize(float_proto, ArrayDataset(x[:128]))
    ops = [n.op_type for n in q.graph.node]
    # Activations: input, relu1, relu2, flatten -> 4 Q/DQ pairs (the Gemm writes the float logits
    # itself). Weights and biases of 2 Conv + 1 Gemm -> 6 more DequantizeLinear fed by initializers.
    # Relu folded into the ranges.
    assert ops.count("QuantizeLinear") == 4
    assert ops.count("DequantizeLinear") == 10
    assert ops.count("Relu") == 0 and step.details["folded_into_quantization"] == {"Relu": 2}
    inits = _initializers(q)
    for node in q.graph.node:
        if node.op_type == "QuantizeLinear":
            assert inits[node.input[2]].dtype == np.uint8  # uint8 activations
    weight_dq = {}
    for node in q.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            weight_dq[node.output[0]] = node
    for node in q.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert all(i in weight_dq or i.endswith("DequantizeLinear_Output") for i in node.input)
            w = weight_dq[node.input[1]]
            data, scale = inits[w.input[0]], inits[w.input[1]]
            axis = {a.name: a.i for a in w.attribute}.get("axis", 1)
            assert data.dtype == np.int8 and np.all(inits[w.input[2]] == 0)  # symmetric int8
            assert scale.shape == (data.shape[axis],) and scale.size > 1  # one scale per channel
            assert axis == 0  # Conv: output channels; Gemm (transB=1): rows of B
            assert inits[weight_dq[node.input[2]].input[0]].dtype == np.int32  # int32 bias
    assert step.details["int8_ops"] == {"Conv": 2, "Flatten": 1, "Gemm": 1}
    assert step.details["float_ops"] == {}
    assert step.details["ort_optimized"]["fused_int8"] == {"QGemm": 1, "QLinearConv": 2}
    # Only the graph input's Q survives onnxruntime's fusion: QGemm writes the float logits.
    assert step.details["ort_optimized"]["unfused_quantize_linear"] == 1
    assert step.details["ort_optimized"]["unfused_dequantize_linear"] == 0
    assert step.details["calibration"]["samples"] == 128
    # ranked: the 4 quantized activations and the 3 int8 weights (int32 biases are not ranked)
    ranked = step.details["worst_sqnr"]
    assert len(ranked) == 7 and [r["kind"] for r in ranked].count("weight") == 3
    assert all(r["sqnr_db"] > 25 for r in ranked)  # a well-behaved model: no tensor loses much


def test_gemm_and_matmul_outputs_are_not_rounded(float_proto, digits, tmp_path):
    """A graph output written by a Gemm or MatMul loses its Q/DQ pair (their int8 kernels write
    float); an output another node also reads, or that a Conv writes, keeps it."""
    from deployopt.passes.quantize.quantizer import float_outputs

    x, _ = digits
    q, _ = _quantize(float_proto, ArrayDataset(x[:128]))
    producer = {o: n for n in q.graph.node for o in n.output}
    assert producer["logits"].op_type == "Gemm"
    # what the pair did: the same model with the logits rounded to the output's uint8 grid
    rounded = copy.deepcopy(q)
    gemm = next(n for n in rounded.graph.node if n.op_type == "Gemm")
    gemm.output[0] = "logits_float"
    ref, out = _run(float_proto, x[N_TRAIN:]), _run(q, x[N_TRAIN:])
    low, high = min(float(out.min()), 0.0), float(out.max())
    scale = (high - low) / 251  # two steps of margin each side: nothing is clamped
    zero = round(-low / scale) + 2
    rounded.graph.initializer.extend([numpy_helper.from_array(np.float32(scale), "s"),
                                      numpy_helper.from_array(np.uint8(zero), "z")])
    rounded.graph.node.extend([helper.make_node("QuantizeLinear", ["logits_float", "s", "z"], ["logits_q"]),
                               helper.make_node("DequantizeLinear", ["logits_q", "s", "z"], ["logits"])])
    out_rounded = _run(rounded, x[N_TRAIN:])
    assert np.abs(out - out_rounded).max() <= scale / 2 + 1e-6  # the pair only rounded
    assert np.abs(out - ref).mean() < np.abs(out_rounded - ref).mean()
    # onnxruntime fuses the Gemm into QGemm with a float output: no DequantizeLinear left
    path = tmp_path / "q.onnx"
    onnx.save(q, str(path))
    opt = tmp_path / "q.ort.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(opt)).graph.node]
    assert "QGemm" in fused and "DequantizeLinear" not in fused
    # the pair added above goes again: the Gemm writes the output
    onnx.save(rounded, str(path))
    assert float_outputs(path) == ["logits"]
    assert np.array_equal(_run(onnx.load(str(path)), x[N_TRAIN:N_TRAIN + 16]), out[:16])
    # it stays when another node also reads the float logits, or when a Conv writes the output
    shared = copy.deepcopy(rounded)
    shared.graph.node.append(helper.make_node("Relu", ["logits_float"], ["extra"]))
    shared.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    onnx.save(shared, str(path))
    assert float_outputs(path) == []
    conv = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y_float"]),
         helper.make_node("QuantizeLinear", ["y_float", "s", "z"], ["y_q"]),
         helper.make_node("DequantizeLinear", ["y_q", "s", "z"], ["y"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w"),
         numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(0), "z")]))
    onnx.save(conv, str(path))
    assert float_outputs(path) == []
    # a Conv then a layout op keeps every pair (nothing to gain); a Sigmoid between them frees the
    # chain after the Conv's pair: the scores are not rounded
    def chain(*ops):
        nodes, inits, tensor = [helper.make_node("Conv", ["x", "w"], ["t0"])], [], "t0"
        for i, op in enumerate(ops, 1):
            nodes += [helper.make_node("QuantizeLinear", [tensor, "s", "z"], [f"q{i}"]),
                      helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"d{i}"])]
            if op == "Reshape":
                inits.append(numpy_helper.from_array(np.array([1, 16], np.int64), f"shape{i}"))
            nodes.append(helper.make_node(op, [f"d{i}"] + ([f"shape{i}"] if op == "Reshape" else []), [f"t{i}"]))
            tensor = f"t{i}"
        nodes += [helper.make_node("QuantizeLinear", [tensor, "s", "z"], ["qy"]),
                  helper.make_node("DequantizeLinear", ["qy", "s", "z"], ["y"])]
        model = copy.deepcopy(conv)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(inits)
        return model
    onnx.save(chain("Reshape"), str(path))
    assert float_outputs(path) == []
    onnx.save(chain("Sigmoid", "Reshape"), str(path))
    assert float_outputs(path) == ["y"]
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == [
        "Conv", "QuantizeLinear", "DequantizeLinear", "Sigmoid", "Reshape"]
    matmul = copy.deepcopy(conv)  # the same chain with a MatMul writing the output: the pair goes
    matmul.graph.node[0].CopyFrom(helper.make_node("MatMul", ["x", "m"], ["y_float"]))
    matmul.graph.initializer.append(numpy_helper.from_array(np.ones((4, 4), np.float32), "m"))
    onnx.save(matmul, str(path))
    assert float_outputs(path) == ["y"]
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["MatMul"]


def test_softmax_output_is_not_rounded(trained, float_proto, digits):
    """Gemm -> Softmax at the output: no Q/DQ pair on the chain (a uint8 grid of 1/255 would zero
    the small probabilities); the probabilities are the float softmax of the int8 model's logits,
    and the report says why the Softmax is float."""
    x, _ = digits
    cal = ArrayDataset(x[:128])
    with_softmax = _export(nn.Sequential(trained, nn.Softmax(dim=1)).eval())
    q, step = _quantize(with_softmax, cal)
    producer = {o: n for n in q.graph.node for o in n.output}
    softmax = producer["logits"]
    assert softmax.op_type == "Softmax" and producer[softmax.input[0]].op_type == "Gemm"
    read = {i for n in q.graph.node for i in n.input}
    assert all(t.name in read for t in q.graph.initializer)  # the pairs' scales went with them
    logits = _run(_quantize(float_proto, cal)[0], x[N_TRAIN:])
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(_run(q, x[N_TRAIN:]), expected, rtol=1e-4, atol=1e-7)
    assert step.details["int8_ops"] == {"Conv": 2, "Flatten": 1, "Gemm": 1}
    assert step.details["float_nodes"] == [{"node": softmax.name, "op_type": "Softmax", "reason": (
        "writes a graph output: runs in float, so the output is not rounded to uint8")}]


def test_float_reason_of_layout_after_a_float_conv():
    """A layout op at the output is float for the reason that holds: after an int8 MatMul (its
    input dequantized) the output is left unrounded on purpose; after a Conv or MatMul the
    fallback left float, its input is not quantized."""
    from deployopt.passes.quantize.report import node_accounting

    def reshape_reason(op, int8):
        head = ([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"])] if int8 else [])
        proto = helper.make_model(helper.make_graph(
            head + [helper.make_node(op, ["xd" if int8 else "x", "w"], ["t"], name="layer"),
                    helper.make_node("Reshape", ["t", "shape"], ["y"], name="reshape")], op,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.ones((4, 4), np.float32), "w"),
             numpy_helper.from_array(np.array([2, 2], np.int64), "shape"),
             numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(0), "z")]))
        accounting = node_accounting(proto, proto, op_types={"Conv", "Gemm", "MatMul", "Reshape"},
                                     excluded={} if int8 else {"layer": "fallback"})
        return {n["node"]: n["reason"] for n in accounting["float_nodes"]}["reshape"]

    freed = "writes a graph output: runs in float, so the output is not rounded to uint8"
    float_input = "onnxruntime's quantizer left it float (its inputs are not quantized)"
    assert reshape_reason("MatMul", int8=True) == freed
    assert reshape_reason("MatMul", int8=False) == float_input
    assert reshape_reason("Conv", int8=False) == float_input


def test_input_model_untouched(float_proto, digits):
    x, _ = digits
    model = ir.from_proto(float_proto)
    before = ir.to_proto(model).SerializeToString()
    p = QuantizePass()
    p.context = PassContext(calibration=ArrayDataset(x[:32]))
    result = p(model)
    assert result.model is not model and result.modified
    assert ir.to_proto(model).SerializeToString() == before


# -- numbers --------------------------------------------------------------------------------------
def test_digits_top1_within_half_a_point(float_proto, digits):
    x, y = digits
    test_x, test_y = x[N_TRAIN:], y[N_TRAIN:]
    q, _ = _quantize(float_proto, ArrayDataset(x[:256]))
    ref, out = _run(float_proto, test_x), _run(q, test_x)
    float_top1 = np.mean(ref.argmax(1) == test_y)
    int8_top1 = np.mean(out.argmax(1) == test_y)
    assert float_top1 > 0.9  # a real classifier, not a random network
    assert float_top1 - int8_top1 <= 0.005
    assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.99
    # logits: relative L2 error under 5% (SQNR > 26 dB): 8-bit steps, not a different function
    assert np.linalg.norm(out - ref) <= 0.05 * np.linalg.norm(ref)


@pytest.mark.parametrize("method", ["percentile", "entropy", "distribution"])
def test_every_calibration_method(float_proto, digits, method):
    x, y = digits
    q, step = _quantize(float_proto, ArrayDataset(x[:128]), calibration=method)
    ref, out = _run(float_proto, x[N_TRAIN:]), _run(q, x[N_TRAIN:])
    assert step.details["calibration"]["method"] == method
    assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.97


def test_streamed_minmax_equals_whole_set_range(float_proto, digits, tmp_path):
    """Chunked collection must merge ranges, not drop chunks (as onnxruntime's
    CalibMaxIntermediateOutputs does): the input tensor's range is the range over all samples."""
    x, _ = digits
    x = x[:100].copy()
    x[77, 0, 3, 3] = 1.75  # the extreme sits in a late chunk
    x[13, 0, 0, 0] = -0.5
    path = tmp_path / "m.onnx"
    onnx.save(float_proto, str(path))
    inputs = model_inputs(float_proto)
    chunks = chunked(feeds(ArrayDataset(x), inputs, None, 8), 8)
    ranges = calibrate(path, tmp_path, methods=["minmax"], percentile=99.9, op_types=["Conv"],
                       chunks=chunks, threads=1)["minmax"]
    lo, hi = ranges["input"].range_value
    assert (np.asarray(lo).item(), np.asarray(hi).item()) == (-0.5, 1.75)


# -- third-party graphs ---------------------------------------------------------------------------
def _weights_as_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    consts = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}")
              for t in proto.graph.initializer]
    del proto.graph.initializer[:]
    nodes = consts + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def test_constant_node_weights_are_quantized(trained, digits):
    x, y = digits
    proto = _weights_as_constants(_export(trained, dynamic=False))  # fixed batch 1 as well
    assert not proto.graph.initializer
    q, step = _quantize(proto, ArrayDataset(x[:64]))
    assert step.details["constants_lifted"] == 6
    assert step.details["ort_optimized"]["fused_int8"] == {"QGemm": 1, "QLinearConv": 2}
    int8_weights = [t for t in q.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) > 1]
    assert len(int8_weights) == 3  # conv1, conv2, fc
    ref, out = _run(proto, x[N_TRAIN:]), _run(q, x[N_TRAIN:])
    assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.99


def test_opset_9_is_upgraded_and_said(trained, digits):
    x, _ = digits
    proto = _export(trained, opset=9)
    q, step = _quantize(proto, ArrayDataset(x[:64]))
    assert step.details["opset"] == {"input": 9, "quantized": 13}
    assert any("opset upgraded from 9 to 13" in n for n in step.notes)
    assert next(o.version for o in q.opset_import if o.domain == "") == 13
    assert step.details["ort_optimized"]["fused_int8"]["QLinearConv"] == 2


class _PairDataset(Dataset):
    """Two inputs per batch, as a tuple in graph-input order."""

    def __init__(self, a, b):
        self.a, self.b, self.name, self.labeled = a, b, "pairs", False
        self.sample_shape = a.shape[1:]

    def __len__(self):
        return len(self.a)

    def batches(self, batch_size=32):
        for i in range(0, len(self.a), batch_size):
            yield (self.a[i:i + batch_size], self.b[i:i + batch_size]), None


def _two_input_graph(rng) -> onnx.ModelProto:
    """y1 = Relu(a W1 * b W2), y2 = Softplus(y1 W3): two inputs, two outputs, an op ORT can't quantize."""
    w1, w2, w3 = (rng.standard_normal(s).astype(np.float32) * 0.5 for s in ((6, 8), (4, 8), (8, 3)))
    nodes = [helper.make_node("MatMul", ["a", "w1"], ["h1"], name="mm1"),
             helper.make_node("MatMul", ["b", "w2"], ["h2"], name="mm2"),
             helper.make_node("Mul", ["h1", "h2"], ["h"], name="mul"),
             helper.make_node("Relu", ["h"], ["y1"], name="relu"),
             helper.make_node("MatMul", ["y1", "w3"], ["z"], name="mm3"),
             helper.make_node("Softplus", ["z"], ["y2"], name="softplus")]
    graph = helper.make_graph(
        nodes, "two_in_two_out",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 6]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["n", 8]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_two_inputs_two_outputs_and_unsupported_op_listed():
    rng = np.random.default_rng(0)
    proto = _two_input_graph(rng)
    a, b = rng.random((64, 6), dtype=np.float32), rng.random((64, 4), dtype=np.float32)
    q, step = _quantize(proto, _PairDataset(a, b))
    assert {"node": "softplus", "op_type": "Softplus",
            "reason": "onnxruntime has no int8 rule for Softplus"} in step.details["float_nodes"]
    assert step.details["int8_ops"] == {"MatMul": 3, "Mul": 1}
    assert step.details["ort_optimized"]["fused_int8"] == {"QLinearMatMul": 3, "QLinearMul": 1}
    sess_f = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    sess_q = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    for ref, out in zip(sess_f.run(None, {"a": a, "b": b}), sess_q.run(None, {"a": a, "b": b})):
        assert np.abs(out - ref).max() <= 0.03 * np.abs(ref).max()


def test_exclude_nodes_by_name_and_regex(float_proto, digits):
    x, _ = digits
    q, step = _quantize(float_proto, ArrayDataset(x[:64]), exclude_nodes=["/5/Gemm", "/2/C.*", "nope"])
    floats = {e["node"]: e["reason"] for e in step.details["float_nodes"]}
    # /3/Relu and /4/Flatten only move data: with /2/Conv float their input is float, so they stay float
    left = "onnxruntime's quantizer left it float (its inputs are not quantized)"
    assert floats == {"/5/Gemm": "excluded by exclude_nodes", "/2/Conv": "excluded by exclude_nodes",
                      "/3/Relu": left, "/4/Flatten": left}
    assert "exclude_nodes: 'nope' matched no node of the pre-processed model" in step.notes
    gemm = next(n for n in q.graph.node if n.op_type == "Gemm")
    assert _initializers(q)[gemm.input[1]].dtype == np.float32


def test_no_vnni_uses_reduce_range_and_warns(float_proto, digits, monkeypatch):
    import deployopt.measure.machine

    x, _ = digits
    fake = dict(deployopt.measure.machine.stamp(), isa=["avx2"])
    monkeypatch.setattr(deployopt.measure.machine, "stamp", lambda: fake)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    q, step = _quantize(float_proto, ArrayDataset(x[:64]))
    assert step.details["reduce_range"]["value"] is True
    assert any(n.startswith("warning: CPU has no VNNI") for n in step.notes)
    int8 = [numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == TensorProto.INT8]
    assert max(int(np.abs(w).max()) for w in int8) <= 64  # 7-bit weights


# -- fallback -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank, reason", [("sensitivity", "output sensitivity"), ("sqnr", "SQNR")])
def test_fallback_returns_outlier_nodes_to_float_and_meets_tolerance(outlier_proto, digits, rank, reason):
    x, y = digits
    evaluation = ArrayDataset(x[N_TRAIN:], y[N_TRAIN:], name="digits-test")
    q, step = _quantize(outlier_proto, ArrayDataset(x[:256]), evaluation, max_accuracy_drop=0.01,
                       fallback_rank=rank)
    fb = step.details["fallback"]
    assert fb["trials"][0]["drop"] > 0.05  # plain quantization misses 1 pt by far
    assert fb["met"] and step.failure is None
    assert fb["trials"][fb["chosen_trial"]]["drop"] <= 0.01
    # the outlier activation sits between /0/Conv (+ its folded Relu) and /2/Conv
    assert set(fb["nodes_to_float"]) == {"/0/Conv", "/1/Relu", "/2/Conv"}
    assert step.details["worst_sqnr"][0]["tensor"] == "/1/Relu_output_0"
    floats = {e["node"]: e["reason"] for e in step.details["float_nodes"]}
    assert floats["/2/Conv"].startswith(f"fallback: tensor '/1/Relu_output_0' {reason}")
    if rank == "sensitivity":  # the outlier tensor carries most of the int8 output error
        top = step.details["sensitivity"]["top"][0]
        assert top["tensor"] == "/1/Relu_output_0" and top["share"] > 0.5
    conv2 = next(n for n in q.graph.node if n.name == "/2/Conv")
    assert _initializers(q)[conv2.input[1]].dtype == np.float32  # weights stayed float
    assert step.details["int8_ops"] == {"Gemm": 1}
    ref, out = _run(outlier_proto, x[N_TRAIN:]), _run(q, x[N_TRAIN:])
    assert np.mean(ref.argmax(1) == y[N_TRAIN:]) - np.mean(out.argmax(1) == y[N_TRAIN:]) <= 0.01


def test_fallback_rank_depth_returns_a_float_prefix(outlier_proto, digits):
    """``fallback_rank: depth`` returns whole blocks from the input on. The outlier activation is
    written by block 1 (/0/Conv + /1/Relu) and read by block 2's /2/Conv, which keeps its Q/DQ
    pair while /2/Conv runs int8: one block misses, two meet the tolerance."""
    x, y = digits
    evaluation = ArrayDataset(x[N_TRAIN:], y[N_TRAIN:], name="digits-test")
    q, step = _quantize(outlier_proto, ArrayDataset(x[:256]), evaluation, max_accuracy_drop=0.01,
                       fallback_rank="depth")
    fb = step.details["fallback"]
    assert [t["units"] for t in fb["trials"]] == [0, 1, 2]
    assert not fb["trials"][1]["met"] and fb["trials"][1]["drop"] > 0.01
    assert fb["met"] and step.failure is None and fb["chosen_trial"] == 2
    blocks = fallback.depth_units(outlier_proto, [])
    assert [u.entry["node"] for u in blocks[:2]] == ["/0/Conv", "/2/Conv"]
    assert fb["nodes_to_float"] == blocks[0].nodes + blocks[1].nodes
    assert {"/0/Conv", "/1/Relu", "/2/Conv"} <= set(fb["nodes_to_float"])
    floats = {e["node"]: e["reason"] for e in step.details["float_nodes"]}
    assert floats["/1/Relu"] == "fallback: block 1 in graph order (from node '/0/Conv')"
    assert floats["/2/Conv"] == "fallback: block 2 in graph order (from node '/2/Conv')"
    assert any(n.startswith("fallback: ") and "in the first 2 blocks in graph order" in n for n in step.notes)
    # every node after the prefix still runs int8
    rest = [n.name for n in outlier_proto.graph.node if n.op_type in ("Conv", "Gemm")][2:]
    assert rest and not set(rest) & set(fb["nodes_to_float"])


def test_depth_units_cut_the_graph_at_each_weighted_layer():
    """Blocks start at each Conv/Gemm/MatMul, the nodes before the first join it, non-quantizable
    nodes are not listed, and nodes already in float leave their block (an empty block goes)."""
    node = helper.make_node
    graph = helper.make_graph(
        [node("Mul", ["x", "k"], ["a"], name="scale"), node("Conv", ["a", "w"], ["b"], name="c1"),
         node("Relu", ["b"], ["c"], name="r1"), node("Shape", ["c"], ["s"], name="shape"),
         node("Conv", ["c", "w2"], ["d"], name="c2"), node("Gemm", ["d", "w3"], ["e"], name="g"),
         node("Add", ["e", "k2"], ["y"], name="add")], "g", [], [])
    proto = helper.make_model(graph)
    blocks = fallback.depth_units(proto, [])
    assert [(u.entry["block"], u.entry["node"], u.nodes) for u in blocks] == [
        (1, "c1", ["scale", "c1", "r1"]), (2, "c2", ["c2"]), (3, "g", ["g", "add"])]
    assert [u.entry["node"] for u in fallback.depth_units(proto, ["c2", "scale"])] == ["c1", "g"]


def test_fallback_judged_on_kl_holds_the_mean_kl(outlier_proto, digits):
    x, y = digits
    tolerance = 0.01
    # labelled, but classification:score=kl reads no labels: every drop is against the float model
    evaluation = ArrayDataset(x[N_TRAIN:], y[N_TRAIN:], name="digits-test")
    p = QuantizePass(latency_aware=False, max_accuracy_drop=tolerance)
    p.context = PassContext(calibration=ArrayDataset(x[:256]), evaluation=evaluation,
                            metrics="classification:score=kl")
    result = p(ir.from_proto(outlier_proto))
    fb = result.details["fallback"]
    assert fb["metric"] == "exp_neg_kl" and fb["float_exp_neg_kl"] == 1.0
    assert fb["trials"][0]["drop"] > 3 * tolerance  # plain quantization misses by far
    assert fb["met"] and result.failure is None and "/2/Conv" in fb["nodes_to_float"]
    ref, out = _run(outlier_proto, x[N_TRAIN:]), _run(ir.to_proto(result.model), x[N_TRAIN:])
    kl = mean_kl(ref, out)
    chosen = fb["trials"][fb["chosen_trial"]]
    # the same mean KL as the judge's, up to onnxruntime's fused kernels (the judge's) vs unfused (here)
    assert 1 - np.exp(-kl) == pytest.approx(chosen["drop"], abs=1e-3) and 1 - np.exp(-kl) <= tolerance + 1e-3


def test_fallback_out_of_trials_returns_best_and_sets_failure(outlier_proto, digits):
    x, y = digits
    evaluation = ArrayDataset(x[N_TRAIN:], y[N_TRAIN:], name="digits-test")
    q, step = _quantize(outlier_proto, ArrayDataset(x[:256]), evaluation, max_accuracy_drop=0.01,
                       max_trials=1)
    assert re.fullmatch(r"quantize: max_accuracy_drop not met after 1 trials: best drop 0\.\d{4} > 0\.01 "
                        r"\(0 nodes in float\)", step.failure)
    # labelled data: a top-1 drop under input noise is no floor for a tolerance, so none is claimed
    assert step.details["fallback"]["noise_floor"] == {"levels": 1, "skipped": "every metric scores against labels"}
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)  # the best model is returned


def test_fallback_without_labels_uses_agreement(outlier_proto, digits):
    x, _ = digits
    q, step = _quantize(outlier_proto, ArrayDataset(x[:256]), ArrayDataset(x[N_TRAIN:]),
                       max_accuracy_drop=0.02)
    fb = step.details["fallback"]
    assert fb["metric"] == "agreement" and fb["float_agreement"] == 1.0 and fb["met"]


# -- refusals -------------------------------------------------------------------------------------
def test_already_quantized_is_refused(float_proto, digits):
    x, _ = digits
    q, _ = _quantize(float_proto, ArrayDataset(x[:32]))
    with pytest.raises(UserError, match=r"^model: already quantized \(DequantizeLinear x10, "
                                        r"QuantizeLinear x4\); quantize the float model instead$"):
        _quantize(q, ArrayDataset(x[:32]))


class _Float64Dataset(ArrayDataset):
    def batches(self, batch_size=32):
        for xb, yb in super().batches(batch_size):
            yield xb.astype(np.float64), yb


@pytest.mark.parametrize("calibration, message", [
    (None, "data.calibration: the quantize pass needs this dataset and none was given"),
    (ArrayDataset(np.zeros((0, 1, 8, 8))), "data.calibration: dataset 'arrays' is empty"),
    (ArrayDataset(np.zeros((4, 1, 28, 28))), "data.calibration: samples of shape [1, 28, 28] do not fit "
     "model input 'input' [batch, 1, 8, 8] (check the dataset's preprocessing and input size)"),
    (ArrayDataset(np.zeros((4, 8, 8))), "data.calibration: samples of shape [8, 8] do not fit "
     "model input 'input' [batch, 1, 8, 8] (check the dataset's preprocessing and input size)"),
    (_Float64Dataset(np.zeros((4, 1, 8, 8))), "data.calibration: samples are float64, model input "
     "'input' expects float32"),
    (ArrayDataset(np.where(np.arange(40)[:, None, None, None] == 37, np.nan, np.zeros((40, 1, 8, 8)))),
     "data.calibration: sample 37 of input 'input' contains NaN or Inf"),
    (ArrayDataset(np.full((4, 1, 8, 8), np.inf)), "data.calibration: sample 0 of input 'input' contains NaN or Inf"),
])
def test_bad_calibration_data(float_proto, calibration, message, tmp_path):
    p = QuantizePass()
    p.context = PassContext(calibration=calibration, work_dir=tmp_path / "work")
    with pytest.raises(UserError) as e:
        p(ir.from_proto(float_proto))
    assert str(e.value) == message
    assert not (tmp_path / "work").exists()  # nothing written


def test_fallback_needs_evaluation_data(float_proto, digits):
    x, _ = digits
    p = QuantizePass(max_accuracy_drop=0.01)
    p.context = PassContext(calibration=ArrayDataset(x[:16]))
    with pytest.raises(UserError, match="^data.evaluation: max_accuracy_drop needs an evaluation dataset$"):
        p(ir.from_proto(float_proto))


@pytest.mark.parametrize("settings, message", [
    ({"calibration": "minmx"}, "calibration: 'minmx' is not one of minmax, percentile, entropy, distribution"),
    ({"max_accuracy_drop": -0.01}, "max_accuracy_drop: -0.01 is outside [0, 1]"),
    ({"percentile": 0}, "percentile: 0 is outside (0, 100]"),
    ({"samples": 0}, "samples: 0 is outside [1, inf)"),
    ({"tune_ranges_budget_s": 0}, "tune_ranges_budget_s: 0 is outside (0, inf)"),
    ({"activation_type": "int8", "weight_type": "uint8"},
     "weight_type: 'uint8' with activation_type 'int8' is not supported by onnxruntime (use int8 weights)"),
    ({"op_types": ["Softplus"]}, "op_types: 'Softplus' is not one of "),
    ({"op_types": []}, "op_types: needs at least 1 values, got []"),
    ({"exclude_nodes": ["conv["]}, "exclude_nodes: 'conv[' is not a node name or regex"),
])
def test_bad_settings(settings, message):
    with pytest.raises(UserError) as e:
        QuantizePass(**settings)
    assert str(e.value).startswith(message)


class _RaggedDataset(ArrayDataset):
    """Batches of 3 and 6 samples in turn, whatever the batch size asked (like a filtered stream)."""

    def batches(self, batch_size=32):
        start, sizes = 0, (3, 6)
        while start < len(self.x):
            size = sizes[(start // 9 * 2 + (start % 9 > 0)) % 2]
            yield self.x[start:start + size], None
            start += size


def test_histogram_calibration_with_ragged_batches(float_proto, digits):
    """The histogram calibrators stack a chunk's outputs: a chunk must never mix batch sizes,
    so batches of 3 and 6 with batch_size 8 still calibrate."""
    x, _ = digits
    q, step = _quantize(float_proto, _RaggedDataset(x[:27]), calibration="percentile", batch_size=8)
    assert step.details["calibration"]["samples"] == 27
    ref, out = _run(float_proto, x[N_TRAIN:]), _run(q, x[N_TRAIN:])
    assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.97


def test_dynamic_spatial_dims_stay_dynamic(digits):
    """Input [n, 1, h, w]: calibration runs at the data's 8x8, the quantized model keeps the
    symbolic dims and runs at any size."""
    x, _ = digits
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
         helper.make_node("Flatten", ["g"], ["y"], name="flatten")],
        "dynamic_hw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q, step = _quantize(proto, ArrayDataset(x[:64]))
    dims = [d.dim_param or d.dim_value for d in q.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["n", 1, "h", "w"]
    assert step.details["ort_optimized"]["fused_int8"] == {"QLinearConv": 1, "QLinearGlobalAveragePool": 1}
    big = np.kron(x[N_TRAIN:N_TRAIN + 32], np.ones((1, 1, 2, 2), np.float32))[:, :, :12, :12]  # 12x12
    for data in (x[N_TRAIN:], big):
        ref, out = _run(proto, data), _run(q, data)
        # 10% relative L2: four random channels share one uint8 activation scale, the weak ones
        # get few steps (the trained fixtures above are held to 5%)
        assert out.shape == ref.shape and np.linalg.norm(out - ref) <= 0.10 * np.linalg.norm(ref)


def test_sensitivity_probe_keeps_the_folded_relu(float_proto, digits, tmp_path):
    """Removing the Q/DQ pair of a tensor whose Relu the quantizer folded into its range must put the
    clamp back (else the probe measures a different function); the probe's output is then closer
    to fp32 than the quantized model's."""
    from deployopt.passes.quantize import sensitivity as qsens
    from deployopt.passes.quantize.report import activation_bounds

    x, _ = digits
    q, _ = _quantize(float_proto, ArrayDataset(x[:128]), latency_aware=False)
    folded = activation_bounds(float_proto, skip={n.name for n in q.graph.node})
    assert "/1/Relu_output_0" in folded  # the Relu after conv1 was folded
    quant, dqs = qsens.pairs(q)["/1/Relu_output_0"]
    probe = qsens.without(q, "/1/Relu_output_0", quant, dqs, folded["/1/Relu_output_0"])
    clip = next(n for n in probe.graph.node if n.op_type == "Clip")
    probe.graph.output.append(helper.make_empty_tensor_value_info(clip.output[0]))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    logits, clipped = sess.run(None, {"input": x[N_TRAIN:]})
    assert clipped.min() >= 0
    ref = _run(float_proto, x[N_TRAIN:])
    assert np.mean((logits - ref) ** 2) < np.mean((_run(q, x[N_TRAIN:]) - ref) ** 2)
    onnx.save(float_proto, tmp_path / "float.onnx")
    onnx.save(q, tmp_path / "q.onnx")
    feeds = [{"input": x[i:i + 8]} for i in range(N_TRAIN, N_TRAIN + 32, 8)]
    sensitivity = qsens.tensor_sensitivity(tmp_path / "float.onnx", tmp_path / "q.onnx", feeds, 1)
    # Sensitivity is the relative squared output error (over the float output's energy) that
    # removing the pair takes away, measured with full onnxruntime optimization (the kernels that
    # ship). Its sign depends on the CPU's int8 arithmetic (7-bit weights without VNNI), so check
    # the definition against an independent computation.
    onnx.save(probe, tmp_path / "probe.onnx")
    x_eval = x[N_TRAIN:N_TRAIN + 32]
    reference = open_session(tmp_path / "float.onnx", threads=1).run(None, {"input": x_eval})[0].astype(np.float64)

    def error(path):
        out = open_session(path, threads=1).run(None, {"input": x_eval})[0].astype(np.float64)
        return float(np.sum((out - reference) ** 2) / np.sum(reference ** 2))

    probe_sensitivity = error(tmp_path / "q.onnx") - error(tmp_path / "probe.onnx")
    assert sensitivity["/1/Relu_output_0"] == pytest.approx(probe_sensitivity, rel=1e-6, abs=1e-12)


# -- tune_ranges ----------------------------------------------------------------------------------
def _scales(proto: onnx.ModelProto) -> dict[str, float]:
    """Activation tensor -> the scale of its QuantizeLinear."""
    inits = _initializers(proto)
    return {n.input[0]: float(inits[n.input[1]]) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_tune_ranges_lowers_output_error_and_requantizes_to_the_searched_model(float_proto, digits):
    """The search keeps a range only when it lowers the output error on the calibration samples;
    the model returned, re-quantized by onnxruntime from the scaled ranges, is the model searched
    (same output SQNR to 0.25 dB), and its scales are the calibrated ones times the reported factors.
    64 calibration samples, all searched: nothing is left to confirm on, so the tuned ranges stand.
    8-bit weights on every CPU (reduce_range false): with the 7-bit weights chosen where the CPU
    has no VNNI, no range of this net moved (measured on an AVX2 CPU)."""
    x, _ = digits
    cal = ArrayDataset(x[:64])
    base, _ = _quantize(float_proto, cal, reduce_range=False)
    q, step = _quantize(float_proto, cal, tune_ranges=True, reduce_range=False)
    rt = step.details["range_tuning"]
    scales = _scales(base)
    # the Flatten output shares its input's scale; the Gemm writes the float logits (no pair)
    assert scales["/4/Flatten_output_0"] == scales["/3/Relu_output_0"] and len(scales) == 4
    searchable = {n.input[1] for n in base.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in scales}
    assert rt["units"] == rt["units_searched"] == len(searchable) == 3 and not rt["out_of_time"]
    assert rt["ranges_moved"] >= 1 and rt["kept"] == "tuned"
    assert rt["held_out"] == "no calibration samples beyond the searched ones"
    assert rt["output_sqnr_db_after"] > rt["output_sqnr_db_before"]
    # 0.25 dB: the re-quantized int32 biases are rounded once from the float bias, the edit's twice
    assert abs(rt["output_sqnr_db_requantized"] - rt["output_sqnr_db_after"]) < 0.25
    tuned, calibrated = _scales(q), _scales(base)
    for tensor, scale in calibrated.items():
        assert tuned[tensor] == pytest.approx(scale * rt["factors"].get(tensor, 1.0), rel=1e-5)
    assert any(n.startswith("tune_ranges: ") and " moved; output SQNR on 64 calibration samples" in n
               for n in step.notes)


def test_tune_ranges_keeps_the_tuned_ranges_only_if_they_win_on_samples_not_searched(float_proto, digits):
    """256 calibration samples: the search fits the first 64, and the tuned ranges are kept only when
    the other 192 also score better; otherwise the model is the calibrated one, unchanged. Either
    way the model returned is not worse than the calibrated one on digits it never saw (5%)."""
    x, _ = digits
    cal = ArrayDataset(x[:256])
    base, _ = _quantize(float_proto, cal)
    q, step = _quantize(float_proto, cal, tune_ranges=True)
    rt = step.details["range_tuning"]
    held_out = rt["held_out"]
    assert rt["samples"] == 64 and held_out["samples"] == 192
    won = held_out["output_sqnr_db_tuned"] > held_out["output_sqnr_db_calibrated"]
    assert rt["kept"] == ("tuned" if won else "calibrated")
    if not won:
        assert _scales(q) == _scales(base)
        assert any("on 192 calibration samples it did not search" in n and n.endswith("ranges are kept")
                   for n in step.notes)
    ref, before, after = (_run(p, x[N_TRAIN:]) for p in (float_proto, base, q))
    assert np.linalg.norm(after - ref) <= 1.05 * np.linalg.norm(before - ref)


def test_tune_ranges_keeps_the_calibrated_model_when_the_requantized_one_is_not_closer(float_proto, digits,
                                                                                          monkeypatch):
    """The gain is confirmed on the model the quantizer makes from the tuned ranges; here those
    ranges are spoiled (a tenth of the searched ones), so the calibrated model is returned."""
    from deployopt.passes.quantize import range_tuning

    spoil = range_tuning.scaled_ranges
    monkeypatch.setattr(range_tuning, "scaled_ranges",
                        lambda ranges, factors: spoil(ranges, {t: 0.1 * f for t, f in factors.items()}))
    x, _ = digits
    cal = ArrayDataset(x[:256])
    base, _ = _quantize(float_proto, cal)
    q, step = _quantize(float_proto, cal, tune_ranges=True)
    rt = step.details["range_tuning"]
    assert rt["kept"] == "calibrated" and rt["output_sqnr_db_requantized"] < rt["output_sqnr_db_before"]
    assert _scales(q) == _scales(base)
    assert any(n.endswith("the calibrated ranges are kept") for n in step.notes)


def test_tune_ranges_out_of_budget_keeps_what_it_searched(float_proto, digits):
    x, _ = digits
    q, step = _quantize(float_proto, ArrayDataset(x[:64]), tune_ranges=True, tune_ranges_budget_s=1e-9)
    rt = step.details["range_tuning"]
    assert rt["out_of_time"] and rt["units_searched"] == 0 and rt["ranges_moved"] == 0
    assert any(n.startswith("tune_ranges: 0 of ") and "tune_ranges_budget_s 1e-09 s ran out" in n for n in step.notes)
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)


def test_range_edit_is_the_model_onnxruntime_makes_from_the_scaled_range(digits, tmp_path):
    """The search scores edits of a QDQ model's scales; each must be the model onnxruntime's
    quantizer makes from the scaled range: same scales, int32 biases and integer weights (to one
    rounding step), including a channel whose bias no longer fits int32 at the smaller scale
    (onnxruntime then coarsens that channel's weight scale). A folded Clip's range cannot be
    widened past its bound."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data
    from deployopt.passes.quantize import range_tuning
    from deployopt.passes.quantize.report import activation_bounds

    rng = np.random.default_rng(0)
    w2 = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    w2[0] *= 1e-6  # tiny weights under a bias of 1: its int32 bias sits at onnxruntime's limit
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
         helper.make_node("Clip", ["c1", "lo", "hi"], ["clipped"], name="clip"),
         helper.make_node("Conv", ["clipped", "w2", "b2"], ["c2"], name="conv2"),
         helper.make_node("Flatten", ["c2"], ["y"], name="flatten")],
        "clip_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 256])],
        [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b1"),
         numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(0.5), "hi"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.array([1.0, 0.2, -0.3, 0.1], np.float32), "b2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "float.onnx")

    def ranges(clipped_high):
        return TensorsData(CalibrationMethod.MinMax, {
            "x": TensorData(lowest=np.float32(0.0), highest=np.float32(16.0)),
            "c1": TensorData(lowest=np.float32(0.0), highest=np.float32(clipped_high)),
            "clipped": TensorData(lowest=np.float32(0.0), highest=np.float32(clipped_high)),
            "c2": TensorData(lowest=np.float32(-4.0), highest=np.float32(4.0)),
            "y": TensorData(lowest=np.float32(-4.0), highest=np.float32(4.0))})

    def quantized(name, clipped_high):
        save_tensors_data(ranges(clipped_high), tmp_path / f"{name}.json")
        quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / f"{name}.onnx"), None,
                        calibration_cache_path=str(tmp_path / f"{name}.json"), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=True)
        return onnx.load(str(tmp_path / f"{name}.onnx"))

    base, scaled = quantized("base", 0.4), quantized("scaled", 0.4 * 0.75)
    float_proto = onnx.load(str(tmp_path / "float.onnx"))
    units = {u.tensors[0]: u for u in range_tuning.units_of(base, ranges(0.4), activation_bounds(float_proto))}
    assert units["clipped"].max_factor == pytest.approx(0.5 / 0.4) and units["x"].max_factor == np.inf
    (layer,) = units["clipped"].layers
    conv2 = next(n for n in base.graph.node if n.name == "conv2")
    assert layer.bias == next(n for n in base.graph.node if n.output[0] == conv2.input[2]).input[0]
    before = _initializers(base)  # the editor edits the model in place
    assert abs(int(before[layer.bias][0])) > 0.999 * range_tuning.INT32_BIAS_LIMIT  # channel 0 sits at the limit

    editor = range_tuning._Editor(base, list(units.values()))
    edited = _initializers(onnx.load_from_string(editor.serialized({units["clipped"].scale: 0.75})))
    expected = _initializers(scaled)
    for name in (units["clipped"].scale, layer.bias_scale, layer.weight_scale):
        np.testing.assert_allclose(edited[name], expected[name], rtol=1e-5, err_msg=name)
    for name in (layer.bias, layer.weight):
        assert np.abs(edited[name].astype(np.int64) - expected[name].astype(np.int64)).max() <= 1, name
    assert edited[layer.weight_scale][0] == pytest.approx(before[layer.weight_scale][0] / 0.75)  # coarsened
    assert edited[layer.weight_scale][1] == before[layer.weight_scale][1]
    x, _ = digits
    unedited = onnx.load_from_string(editor.serialized({}))
    for name, value in _initializers(unedited).items():
        np.testing.assert_array_equal(value, before[name])
    np.testing.assert_array_equal(_run(unedited, x[N_TRAIN:]), _run(quantized("again", 0.4), x[N_TRAIN:]))


def test_output_error_weighs_each_output_by_its_own_energy(tmp_path):
    """Two outputs 1000x apart in scale: the same relative error on either counts the same, and
    E is the mean of the outputs' relative errors (output_error.py)."""
    from deployopt.passes.quantize.output_error import OutputError

    def model(path, small_offset: float, large_offset: float):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("small", "large")]
        inits = [numpy_helper.from_array(np.float32(v), n) for n, v in
                 (("k", 1000.0), ("ds", small_offset), ("dl", large_offset))]
        nodes = [helper.make_node("Add", ["x", "ds"], ["small"]), helper.make_node("Mul", ["x", "k"], ["scaled"]),
                 helper.make_node("Add", ["scaled", "dl"], ["large"])]
        graph = helper.make_graph(nodes, "g", [x], outs, inits)
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    feed = {"x": np.arange(1, 7, dtype=np.float32).reshape(2, 3)}
    energy = float(np.sum(feed["x"].astype(np.float64) ** 2))
    error = OutputError(model(tmp_path / "f.onnx", 0.0, 0.0), [feed], threads=1)
    small = error.error(model(tmp_path / "s.onnx", 0.1, 0.0))
    large = error.error(model(tmp_path / "l.onnx", 0.0, 100.0))
    assert small == pytest.approx(6 * 0.1 ** 2 / energy / 2, rel=1e-5)
    assert large == pytest.approx(small, rel=1e-5)  # 100 on a 1000x output is 0.1 on the 1x one
    assert error.error(model(tmp_path / "b.onnx", 0.1, 100.0)) == pytest.approx(2 * small, rel=1e-5)
