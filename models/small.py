"""Small CNNs for 8x8 / 28x28 / 32x32 inputs: the seed CNN, an MNIST teacher and students.

They are fixtures for fast tests and the models the distillation pass trains. All but
``seed_cnn`` end in ``AdaptiveAvgPool2d(1)`` + flatten + Linear, which exports as
GlobalAveragePool + Flatten + Gemm (int8-friendly, and channel pruning can shrink the last conv).
Each conv is followed by BatchNorm so distillation trains in a few epochs; the cleanup pass
folds it into the conv.

MACs per conv = ``H_out * W_out * C_out * C_in / groups * k * k`` (Linear: ``in * out``):

* ``resnet_mnist``  ~37 M MACs, ~0.3 M params (stem + 3 residual blocks at 32/64/128 ch)
* ``student_mnist`` ~2 M MACs, ~24 K params (3 convs 16/32/64 ch with max-pools)
* ``student_cifar`` ~20 M MACs, ~0.1 M params
* ``digits_cnn``    ~0.6 M MACs, ~24 K params, for 1x8x8 sklearn digits
* ``seed_cnn``      the classic 32x32 RGB CNN: conv5x5(6) -> pool -> conv5x5(16) -> pool ->
  400 -> 120 -> 10 (0.65 M MACs)
"""

from __future__ import annotations

import torch
from torch import nn

from deployopt.models.resnet import BasicBlock, init_weights


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class SeedCNN(nn.Module):
    """conv5x5 -> ReLU -> maxpool -> conv5x5 -> ReLU -> maxpool -> flatten -> fc -> ReLU -> fc.

    32x32 -> conv5 (valid) 28x28 -> pool 14x14 -> conv5 10x10 -> pool 5x5, so the first fully
    connected layer takes ``16 * 5 * 5 = 400`` features.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, hidden: int = 120):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(16 * 5 * 5, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.num_classes = num_classes
        self.default_input_shape = (1, in_channels, 32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))


class PooledCNN(nn.Module):
    """``features`` then global average pool, flatten and a linear classifier."""

    def __init__(self, features: nn.Sequential, width: int, num_classes: int,
                 input_shape: tuple[int, ...]):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        self.num_classes = num_classes
        self.default_input_shape = input_shape
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def seed_cnn(num_classes: int = 10, in_channels: int = 3) -> SeedCNN:
    return SeedCNN(num_classes, in_channels)


def resnet_mnist(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> PooledCNN:
    """ResNet-style teacher for 28x28: stem, then one BasicBlock per stage at w, 2w (/2), 4w (/2)."""
    features = nn.Sequential(
        conv_bn_relu(in_channels, width),
        BasicBlock(width, width),
        BasicBlock(width, 2 * width, stride=2),
        BasicBlock(2 * width, 4 * width, stride=2),
    )
    return PooledCNN(features, 4 * width, num_classes, (1, in_channels, 28, 28))


def student_mnist(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> PooledCNN:
    """Plain CNN for 28x28: conv w -> pool -> conv 2w -> pool -> conv 4w (28 -> 14 -> 7)."""
    features = nn.Sequential(
        conv_bn_relu(in_channels, width), nn.MaxPool2d(2),
        conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
        conv_bn_relu(2 * width, 4 * width),
    )
    return PooledCNN(features, 4 * width, num_classes, (1, in_channels, 28, 28))


def student_cifar(num_classes: int = 10, in_channels: int = 3, width: int = 32) -> PooledCNN:
    """Plain CNN for 32x32: conv w, conv w, pool, conv 2w, pool, conv 4w (32 -> 16 -> 8)."""
    features = nn.Sequential(
        conv_bn_relu(in_channels, width), conv_bn_relu(width, width), nn.MaxPool2d(2),
        conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
        conv_bn_relu(2 * width, 4 * width),
    )
    return PooledCNN(features, 4 * width, num_classes, (1, in_channels, 32, 32))


def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> PooledCNN:
    """Tiny CNN for 8x8 sklearn digits: conv w, conv 2w, pool (8 -> 4), conv 4w."""
    features = nn.Sequential(
        conv_bn_relu(in_channels, width), conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
        conv_bn_relu(2 * width, 4 * width),
    )
    return PooledCNN(features, 4 * width, num_classes, (1, in_channels, 8, 8))
