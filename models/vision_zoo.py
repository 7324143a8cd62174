"""Small vision CNNs of the kinds where plain int8 on onnxruntime CPU comes out slower than float.

onnxruntime's QDQ quantizer has int8 kernels for Conv/Gemm/Add/Mul/pooling/Sigmoid, but none for
HardSwish, HardSigmoid or PRelu: those stay float between a DequantizeLinear and a
QuantizeLinear, so every such activation costs two extra passes over its tensor
(``x' = s (q - z)`` and back ``q = round(x / s) + z``), which the int8 convolutions around it
must win back. These architectures reproduce the third-party graphs users report as "int8
slower than fp32":

* ``mobilenet_v3_small``: MobileNetV3-Small (Howard et al. 2019, torchvision's layout):
  ``hswish(x) = x * relu6(x + 3) / 6`` activations and squeeze-excitation gates
  ``y = x * hsigmoid(W2 relu(W1 mean_hw(x)))`` with ``hsigmoid(x) = relu6(x + 3) / 6``.
* ``prelu_facenet``: a face-crop network in the style of MobileFaceNet / MTCNN's O-Net:
  depthwise-separable stages with a per-channel PReLU ``y = max(x, 0) + a_c min(x, 0)`` after
  every convolution and in the classifier.
* ``gated_cnn``: an EfficientNet-B0-like mobile CNN whose units are all sigmoid-gated: SiLU
  activations ``x * sigmoid(x)`` and squeeze-excitation channel gates
  ``y = x * sigmoid(W2 relu(W1 mean_hw(x)))`` (timm's SqueezeExcite).
* ``ocr_crnn``: a PP-OCR-style text-line recognizer: HardSwish depthwise-separable stages that
  pool the height and keep the columns, a 1x1 convolution to per-column class scores, the
  columns averaged into ``positions`` character slots, output ``[batch, positions, num_classes]``.
  Exporters of OCR toolkits (paddle2onnx, tf2onnx) store such weights as ``Constant`` nodes; the
  benchmark converts them.

The squeeze-excitation means are ``x.mean((2, 3), keepdim=True)`` (timm's spelling), so the only
``AdaptiveAvgPool2d`` is the classifier's global pool; ``ocr_crnn`` has none. Conv/Linear MACs
and parameters at the default sizes: mobilenet_v3_small 56.5 M / 2.54 M at 3x224x224,
prelu_facenet 2.7 M / 35 K at 3x96x96, gated_cnn 13.0 M / 179 K at 1x64x64, ocr_crnn
13.5 M / 55 K at 1x32x128.
"""

from __future__ import annotations

import torch
from torch import nn

from deployopt.models.mobilenet import make_divisible
from deployopt.models.resnet import init_weights


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
             act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2,
                                         groups=groups, bias=False), nn.BatchNorm2d(out_ch)]
    if act is not None:
        layers.append(act(out_ch) if act is nn.PReLU else act())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """``y = x * gate(W2 relu(W1 mean_hw(x) + b1) + b2)``, W1/W2 as 1x1 convolutions."""

    def __init__(self, channels: int, squeeze: int, gate: type[nn.Module] = nn.Sigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class _Classifier(nn.Module):
    """``features`` -> GlobalAveragePool -> flatten -> ``head``."""

    def __init__(self, features: nn.Module, head: nn.Module, num_classes: int,
                 input_shape: tuple[int, ...]):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head
        self.num_classes = num_classes
        self.default_input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


# -- MobileNetV3-Small ---------------------------------------------------------------------------

# (kernel, expanded channels, out channels, squeeze-excite, activation, stride): Table 2 of the paper.
_MNV3_SMALL = ((3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
               (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
               (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
               (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1))


class InvertedResidualV3(nn.Module):
    def __init__(self, in_ch: int, kernel: int, mid: int, out_ch: int, se: bool, act: str, stride: int):
        super().__init__()
        act_cls = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if mid != in_ch:
            layers.append(_conv_bn(in_ch, mid, 1, act=act_cls))
        layers.append(_conv_bn(mid, mid, kernel, stride, groups=mid, act=act_cls))
        if se:
            layers.append(SqueezeExcite(mid, make_divisible(mid // 4, 8), gate=nn.Hardsigmoid))
        layers.append(_conv_bn(mid, out_ch, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res_connect else self.block(x)


def mobilenet_v3_small(num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                       image_size: int = 224) -> _Classifier:
    """MobileNetV3-Small: HardSwish, SE gates with HardSigmoid, last 1x1 conv 576, FC 1024."""
    first = make_divisible(16 * width_mult)
    layers: list[nn.Module] = [_conv_bn(in_channels, first, 3, 2, act=nn.Hardswish)]
    in_ch = first
    for kernel, mid, out, se, act, stride in _MNV3_SMALL:
        mid, out = make_divisible(mid * width_mult), make_divisible(out * width_mult)
        layers.append(InvertedResidualV3(in_ch, kernel, mid, out, se, act, stride))
        in_ch = out
    last = 6 * in_ch
    layers.append(_conv_bn(in_ch, last, 1, act=nn.Hardswish))
    head = nn.Sequential(nn.Linear(last, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, num_classes))
    model = _Classifier(nn.Sequential(*layers), head, num_classes, (1, in_channels, image_size, image_size))
    init_weights(model)
    for m in model.modules():  # torchvision's init for the classifier: N(0, 0.01), zero bias
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


# -- face-detection-style PReLU net --------------------------------------------------------------

def prelu_facenet(num_classes: int = 2, in_channels: int = 3, width: int = 16,
                  image_size: int = 96) -> _Classifier:
    """Conv3x3/2 + PReLU stem, then depthwise-separable stages (dw3x3 + PReLU, pw1x1 + PReLU) at
    w, 2w (/2), 4w (/2), 4w, 8w (/2), global pool, FC 8w -> 8w + PReLU, FC -> classes."""
    w = width
    stages = ((w, 2 * w, 2), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1), (4 * w, 8 * w, 2))
    layers: list[nn.Module] = [_conv_bn(in_channels, w, 3, 2, act=nn.PReLU)]
    for in_ch, out_ch, stride in stages:
        layers += [_conv_bn(in_ch, in_ch, 3, stride, groups=in_ch, act=nn.PReLU),
                   _conv_bn(in_ch, out_ch, 1, act=nn.PReLU)]
    head = nn.Sequential(nn.Linear(8 * w, 8 * w), nn.PReLU(8 * w), nn.Linear(8 * w, num_classes))
    model = _Classifier(nn.Sequential(*layers), head, num_classes, (1, in_channels, image_size, image_size))
    init_weights(model)
    return model


# -- CNN with sigmoid-gated channels -------------------------------------------------------------

class GatedBlock(nn.Module):
    """Mobile block with sigmoid gates: 1x1 expand + SiLU (``x * sigmoid(x)``), depthwise 3x3 +
    SiLU, channel gate ``sigmoid(W2 relu(W1 mean_hw(x)))``, 1x1 project (+ identity when it fits)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int = 4):
        super().__init__()
        mid = in_ch * expand
        self.block = nn.Sequential(
            _conv_bn(in_ch, mid, 1, act=nn.SiLU), _conv_bn(mid, mid, 3, stride, groups=mid, act=nn.SiLU),
            SqueezeExcite(mid, max(8, in_ch // 4), gate=nn.Sigmoid), _conv_bn(mid, out_ch, 1, act=None))
        self.use_res_connect = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res_connect else self.block(x)


def gated_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16, image_size: int = 64) -> _Classifier:
    """Conv3x3/2 + SiLU stem at w, gated blocks at w, 2w (/2), 2w, 4w (/2), 4w, 8w (/2), 1x1 conv
    to 16w + SiLU, global pool, FC (an EfficientNet-B0-like layout, scaled down)."""
    w = width
    plan = ((w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1), (4 * w, 8 * w, 2))
    layers: list[nn.Module] = [_conv_bn(in_channels, w, 3, 2, act=nn.SiLU)]
    layers += [GatedBlock(i, o, s) for i, o, s in plan]
    layers.append(_conv_bn(8 * w, 16 * w, 1, act=nn.SiLU))
    model = _Classifier(nn.Sequential(*layers), nn.Linear(16 * w, num_classes), num_classes,
                        (1, in_channels, image_size, image_size))
    init_weights(model)
    return model


# -- OCR text-line recognizer --------------------------------------------------------------------

class OcrCRNN(nn.Module):
    """PP-OCR-style recognizer front end for 32 x (32 * positions) text lines.

    Conv3x3/2 + HardSwish stem at w, then depthwise-separable blocks (dw3x3 + HardSwish, pw1x1 +
    HardSwish) at 2w, 4w (stride (2, 1)), 4w, 8w (stride (2, 1)), 8w, 8w (stride (2, 1)) that
    pool the height while keeping the columns; a max-pool over the remaining height leaves one
    feature vector per column (W/2 columns), a 1x1 conv gives per-column class scores, and the
    columns are averaged in ``positions`` equal groups (one per character slot):
    output ``[batch, positions, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, positions: int = 4):
        super().__init__()
        w = width
        plan = ((w, 2 * w, 1), (2 * w, 4 * w, (2, 1)), (4 * w, 4 * w, 1), (4 * w, 8 * w, (2, 1)),
                (8 * w, 8 * w, 1), (8 * w, 8 * w, (2, 1)))
        layers: list[nn.Module] = [_conv_bn(in_channels, w, 3, 2, act=nn.Hardswish)]
        for in_ch, out_ch, stride in plan:
            layers += [nn.Sequential(nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False),
                                     nn.BatchNorm2d(in_ch), nn.Hardswish()),
                       _conv_bn(in_ch, out_ch, 1, act=nn.Hardswish)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(8 * w, num_classes, 1)
        self.positions = positions
        self.num_classes = num_classes
        self.default_input_shape = (1, in_channels, 32, 32 * positions)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)  # [b, 8w, 2, W/2]
        columns = features.amax(dim=2, keepdim=True)  # [b, 8w, 1, W/2]
        scores = self.classifier(columns).flatten(2)  # [b, classes, W/2]
        b, c, n = scores.shape
        slots = scores.reshape(b, c, self.positions, n // self.positions).mean(-1)
        return slots.permute(0, 2, 1)  # [b, positions, classes]


def ocr_crnn(num_classes: int = 10, in_channels: int = 1, width: int = 16, positions: int = 4) -> OcrCRNN:
    return OcrCRNN(num_classes, in_channels, width, positions)
