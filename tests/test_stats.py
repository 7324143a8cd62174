"""deployopt.core.stats: MACs against a hand count, params, sizes, quantized-op counting, inspect."""

from __future__ import annotations

import collections
import json
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployopt import cli
from deployopt.core.stats import format_stats, model_stats

RNG = np.random.default_rng(0)
STATS_KEYS = {"path", "bytes", "bytes_zip", "params", "nonzero_params", "macs", "ops", "opset"}

# Hand count for _small_model (batch 1), MACs = N·C_out·H_out·W_out·(C_in/group)·kH·kW etc.:
HAND_MACS = {
    "conv1": 4 * 8 * 8 * 3 * 3 * 3,  # 3->4 channels, 3x3, pad 1: 8x8 out      = 6912
    "conv2": 4 * 3 * 3 * 2 * 3 * 3,  # group 2 (2 in-channels each), stride 2: 3x3 = 648
    "deconv": 4 * 3 * 3 * 2 * 2 * 2,  # ConvTranspose: every input element × C_out·kH·kW = 288
    "fc": 1 * 72 * 10,  # Gemm M·K·N, 2·6·6 = 72 inputs                              = 720
    "mm": 1 * 10 * 5,  # MatMul M·K·N                                                = 50
}
HAND_PARAMS = {"conv1": 108 + 4, "conv2": 72, "deconv": 32, "fc": 720 + 10, "mm": 50}
SHIFT = [1.0, 0.0, 2.0, 0.0, 3.0]  # a Constant node: 5 params, 2 of them zero


def _f32(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _small_model(input_shape=(1, 3, 8, 8), zero_half_fc: bool = False) -> onnx.ModelProto:
    fc = RNG.normal(size=(10, 72))
    if zero_half_fc:
        fc.reshape(-1)[:360] = 0.0
    inits = [_f32("W1", RNG.normal(size=(4, 3, 3, 3))), _f32("B1", RNG.normal(size=4)),
             _f32("W2", RNG.normal(size=(4, 2, 3, 3))), _f32("W3", RNG.normal(size=(4, 2, 2, 2))),
             _f32("W4", fc), _f32("C4", RNG.normal(size=10)), _f32("W5", RNG.normal(size=(10, 5)))]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", group=2, strides=[2, 2]),
        helper.make_node("ConvTranspose", ["c2", "W3"], ["c3"], name="deconv", strides=[2, 2]),
        helper.make_node("Flatten", ["c3"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "W4", "C4"], ["g"], name="fc", transB=1),
        helper.make_node("MatMul", ["g", "W5"], ["mm"], name="mm"),
        helper.make_node("Constant", [], ["shift"], name="shift",
                         value=numpy_helper.from_array(np.array(SHIFT, np.float32))),
        helper.make_node("Add", ["mm", "shift"], ["y"], name="add"),
    ]
    batch = input_shape[0]
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_macs_and_params_equal_the_hand_count():
    stats = model_stats(_small_model())
    assert {layer["name"]: layer["macs"] for layer in stats["layers"]} == HAND_MACS
    assert {layer["name"]: layer["params"] for layer in stats["layers"]} == HAND_PARAMS
    assert stats["macs"] == sum(HAND_MACS.values()) == 8618
    assert stats["params"] == sum(HAND_PARAMS.values()) + len(SHIFT) == 1001
    assert stats["nonzero_params"] == 1001 - 2
    assert stats["ops"] == {"Add": 1, "Constant": 1, "Conv": 2, "ConvTranspose": 1, "Flatten": 1,
                            "Gemm": 1, "MatMul": 1, "Relu": 1}
    assert stats["opset"] == 17 and stats["ir_version"] == onnx.IR_VERSION
    assert stats["inputs"] == [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}]
    assert stats["outputs"] == [{"name": "y", "shape": [1, 5], "dtype": "float32"}]
    assert stats["notes"] == []


def test_macs_scale_with_a_static_batch_and_count_a_dynamic_one_as_1():
    assert model_stats(_small_model((2, 3, 8, 8)))["macs"] == 2 * 8618
    stats = model_stats(_small_model(("N", 3, 8, 8)))
    assert stats["macs"] == 8618
    assert stats["inputs"][0]["shape"] == ["N", 3, 8, 8]
    assert stats["notes"] == ["input 'x': dynamic batch dim 'N' counted as 1 (MACs per sample)"]


def test_dynamic_spatial_dims_give_none_with_notes_not_a_crash():
    stats = model_stats(_small_model((1, 3, "H", "W")))
    assert stats["macs"] is None
    # the MatMul after the Gemm sees [1, 10] again: only it is known
    assert {layer["name"]: layer["macs"] for layer in stats["layers"]} == {
        "conv1": None, "conv2": None, "deconv": None, "fc": None, "mm": 50}
    unknown = [n for n in stats["notes"] if "MACs unknown" in n]
    assert len(unknown) == 4 and unknown[0].startswith("Conv 'conv1': MACs unknown")
    assert stats["params"] == 1001  # everything that does not need shapes is still there


def test_nonzero_params_and_zip_size_see_zeros():
    dense, half = _small_model(), _small_model(zero_half_fc=True)
    s_dense, s_half = model_stats(dense), model_stats(half)
    assert s_half["nonzero_params"] == s_dense["nonzero_params"] - 360
    assert s_half["bytes"] == s_dense["bytes"] == dense.ByteSize()  # same raw size
    assert s_half["bytes_zip"] < s_dense["bytes_zip"] - 360 * 4 * 0.8  # the zeros compress away
    # raw deflate at level 6 = zlib's stream without its 2-byte header and 4-byte checksum
    assert s_dense["bytes_zip"] == len(zlib.compress(dense.SerializeToString(), 6)) - 6


def test_bytes_on_disk_include_external_data(tmp_path):
    model = _small_model()
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    files = (path, tmp_path / "ext.onnx.data")
    stats = model_stats(onnx.load(path), path=str(path))
    assert stats["path"] == str(path)
    assert stats["bytes"] == sum(f.stat().st_size for f in files)
    deflated = zlib.compressobj(6, zlib.DEFLATED, -15)
    expected = sum(len(deflated.compress(f.read_bytes())) for f in files) + len(deflated.flush())
    assert stats["bytes_zip"] == expected
    assert stats["params"] == 1001 and stats["macs"] == 8618


class _Reader:
    """onnxruntime CalibrationDataReader over a few random samples."""

    def __init__(self, n: int = 4):
        rng = np.random.default_rng(1)
        self._it = iter([{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self._it, None)


def _quantize(tmp_path, quant_format) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_static

    src, dst = tmp_path / "f.onnx", tmp_path / f"q_{quant_format.name}.onnx"
    onnx.save(_small_model(), src)
    quantize_static(str(src), str(dst), _Reader(), quant_format=quant_format, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(dst)


def test_quantized_qdq_counts(tmp_path):
    from onnxruntime.quantization import QuantFormat

    model = _quantize(tmp_path, QuantFormat.QDQ)
    stats = model_stats(model)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    producers = {o: n for n in model.graph.node for o in n.output}
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    through_dq = sum(producers[n.input[1]].op_type == "DequantizeLinear" for n in compute)
    q = stats["quantized_ops"]
    assert q["by_op"] == {"DequantizeLinear": counts["DequantizeLinear"],
                          "QuantizeLinear": counts["QuantizeLinear"]}
    assert q["nodes"] == counts["DequantizeLinear"] + counts["QuantizeLinear"] > 0
    assert q["qdq_layers"] == through_dq == 5 and q["float_layers"] == 0 == q["integer_layers"]
    assert all(layer["quantized"] == "qdq" for layer in stats["layers"])
    # int8 weights: the same layers, the same MACs as the float model
    assert {layer["name"]: layer["macs"] for layer in stats["layers"]} == HAND_MACS


def test_quantized_operator_format_counts(tmp_path):
    from onnxruntime.quantization import QuantFormat

    model = _quantize(tmp_path, QuantFormat.QOperator)
    stats = model_stats(model)
    q = stats["quantized_ops"]
    assert q["by_op"]["QLinearConv"] == 2
    assert q["by_op"]["com.microsoft.QGemm"] == 1 and q["by_op"]["QLinearMatMul"] == 1
    assert (q["integer_layers"], q["qdq_layers"], q["float_layers"]) == (4, 0, 1)  # deconv stays float
    macs = {layer["name"]: layer["macs"] for layer in stats["layers"]}
    assert macs["conv1_quant"] == HAND_MACS["conv1"] and macs["fc_quant"] == HAND_MACS["fc"]
    # QGemm (com.microsoft) has no shape inference in onnx or onnxruntime's symbolic
    # inference: the MatMul after it is unknown, said so, and the total is None
    assert macs["mm_quant"] is None and stats["macs"] is None
    assert any(n.startswith("QLinearMatMul 'mm_quant': MACs unknown") for n in stats["notes"])


def test_ir_model_and_proto_agree():
    import onnx_ir as ir

    model = _small_model()
    ir_model = ir.from_proto(model)
    a, b = model_stats(model), model_stats(ir_model)
    size_keys = {"bytes", "bytes_zip"}  # onnx_ir serializes a few extra fields
    assert {k: v for k, v in a.items() if k not in size_keys} == \
        {k: v for k, v in b.items() if k not in size_keys}
    assert b["bytes"] == len(ir.to_proto(ir_model).SerializeToString())


def test_inspect_json(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_small_model(("N", 3, 8, 8)), path)
    assert cli.main(["inspect", "--in-process", str(path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert STATS_KEYS <= set(stats)
    assert {"ir_version", "inputs", "outputs", "layers", "quantized_ops", "notes"} <= set(stats)
    assert stats["path"] == str(path) and stats["bytes"] == path.stat().st_size
    assert stats["macs"] == 8618 and stats["params"] == 1001


def test_inspect_text(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_small_model(), path)
    assert cli.main(["inspect", "--in-process", str(path)]) == 0
    text = capsys.readouterr().out
    assert text == format_stats(model_stats(onnx.load(path), path=str(path))) + "\n"
    assert "inputs       x: float32 [1, 3, 8, 8]" in text
    assert "MACs         8.62 k (8,618)" in text
    assert "params       1,001, nonzero 999 (0.2% zeros)" in text
    assert "  conv1   Conv           6,912     112\n" in text


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    (b"not a model", "not an ONNX model"),
])
def test_inspect_refuses_bad_files(tmp_path, capsys, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    assert cli.main(["inspect", "--in-process", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"deployopt: error: {path}: {message}") and "\n" not in err


def test_reference_model_macs_and_params():
    """ResNet-18 at 224x224: the published 1.82 GMACs (Conv layers + the fc layer)."""
    import io as bytes_io
    import warnings

    import torch

    from deployopt import models

    module = models.build("resnet18").eval()
    with torch.no_grad():  # distinct BN statistics: no two folded biases are equal (and deduped)
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.1, 0.1)
    buffer = bytes_io.BytesIO()
    with warnings.catch_warnings():  # TorchScript export (folds BN into Conv) is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 3, 224, 224),), buffer, dynamo=False,
                          input_names=["x"], output_names=["y"])
    stats = model_stats(onnx.load_from_string(buffer.getvalue()))
    assert stats["macs"] == 1_814_073_344
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    expected = sum(c.weight.numel() + c.out_channels for c in convs) + 512 * 1000 + 1000
    assert stats["params"] == expected == 11_684_712  # weights + folded biases + fc
    assert len(stats["layers"]) == 21
