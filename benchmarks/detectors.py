"""A DBNet-sized text detector built with onnx.helper (no torch): the model of the memory
benchmark and of the memory tests.

Shape of DBNet's segmentation net: a backbone of strided 3x3 convolutions (five stages, stride 2
each, 16 -> 256 channels), an FPN whose 1x1 laterals are upsampled (nearest, x2) and added top
down, and a head that upsamples the stride-4 map back to the input resolution and ends in a
1-channel sigmoid probability map. At 640x640 it has about 1.3 M weights (5 MB of float32) and
its activations are dominated by the full- and half-resolution head tensors, which is what makes
memory grow with input size. Weights are random (He-scaled, seeded): memory does not depend on
them.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Output channels of the five backbone stages (each: a stride-2 conv and a stride-1 conv).
STAGES = (16, 32, 64, 128, 256)
FPN_CHANNELS = 64


class _Builder:
    """Appends Conv/Relu/Resize/Add nodes with seeded He-initialised weights."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32),
                                                                      "up2_scales")]

    def conv(self, x: str, c_in: int, c_out: int, k: int, stride: int, name: str, relu: bool = True) -> str:
        w = self.rng.normal(0, np.sqrt(2.0 / (c_in * k * k)), (c_out, c_in, k, k)).astype(np.float32)
        b = self.rng.normal(0, 0.01, c_out).astype(np.float32)
        self.inits += [numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")]
        self.nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}_out"],
                                           name=name, kernel_shape=[k, k], strides=[stride, stride],
                                           pads=[k // 2] * 4))
        if not relu:
            return f"{name}_out"
        self.nodes.append(helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"{name}_relu"))
        return f"{name}_relu"

    def up2(self, x: str, name: str) -> str:
        self.nodes.append(helper.make_node("Resize", [x, "", "up2_scales"], [name], name=name, mode="nearest"))
        return name

    def add(self, a: str, b: str, name: str) -> str:
        self.nodes.append(helper.make_node("Add", [a, b], [name], name=name))
        return name


def text_detector(size: tuple[int, int] = (640, 640), seed: int = 0) -> onnx.ModelProto:
    """The detector (module doc) for a fixed 1x3xHxW input; H and W multiples of 32. Output
    ``prob``: 1x1xHxW in (0, 1)."""
    h, w = size
    if h % 32 or w % 32:
        raise ValueError(f"size {size}: height and width must be multiples of 32")
    b = _Builder(seed)
    x, c_in, features = "image", 3, []
    for i, c in enumerate(STAGES):
        x = b.conv(x, c_in, c, 3, 2, f"stage{i + 1}.down")
        x = b.conv(x, c, c, 3, 1, f"stage{i + 1}.conv")
        c_in = c
        features.append((x, c))
    # FPN on strides 4..32: laterals, then top-down upsample + add
    laterals = [b.conv(f, c, FPN_CHANNELS, 1, 1, f"fpn.lateral{i + 2}", relu=False)
                for i, (f, c) in enumerate(features[1:])]
    top = laterals[-1]
    for i in range(len(laterals) - 2, -1, -1):
        top = b.add(laterals[i], b.up2(top, f"fpn.up{i + 2}"), f"fpn.sum{i + 2}")
    y = b.conv(top, FPN_CHANNELS, FPN_CHANNELS, 3, 1, "fpn.smooth")
    # DB head: stride 4 -> 2 -> 1, then the probability map
    y = b.conv(y, FPN_CHANNELS, 32, 3, 1, "head.conv1")
    y = b.conv(b.up2(y, "head.up1"), 32, 16, 3, 1, "head.conv2")
    y = b.conv(b.up2(y, "head.up2"), 16, 16, 3, 1, "head.conv3")
    y = b.conv(y, 16, 1, 1, 1, "head.prob", relu=False)
    b.nodes.append(helper.make_node("Sigmoid", [y], ["prob"], name="head.sigmoid"))
    graph = helper.make_graph(
        b.nodes, "text_detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1, h, w])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="deployopt-benchmarks")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_text_detector(path: pathlib.Path, size: tuple[int, int] = (640, 640), seed: int = 0) -> pathlib.Path:
    """Save ``text_detector(size, seed)`` to ``path``."""
    onnx.save(text_detector(size, seed), str(path))
    return path


def detector_images(n: int, size: tuple[int, int] = (640, 640), seed: int = 0) -> np.ndarray:
    """``n`` calibration inputs (n x 3 x H x W float32): smooth random fields plus pixel noise,
    normalised like an ImageNet-preprocessed photo (about zero mean, unit spread)."""
    rng = np.random.default_rng(seed)
    h, w = size
    coarse = rng.normal(0, 1, (n, 3, h // 32, w // 32)).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, 32, axis=2), 32, axis=3)
    return (smooth + 0.3 * rng.normal(0, 1, (n, 3, h, w))).astype(np.float32)
