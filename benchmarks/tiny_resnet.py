"""A ResNet-shaped ONNX model small enough to build in a second: the seed of the fuzzing campaign
and the model of the reliability and reproducibility tests."""

from __future__ import annotations

import pathlib

import torch


class TinyResNet(torch.nn.Module):
    """Conv-BN-ReLU, a residual block, GAP, Linear on 1x8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU())
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(y + self.block(y))
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def export_tiny_resnet(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """TorchScript export (keeps BatchNorm nodes for cleanup to fold), dynamic batch."""
    torch.manual_seed(seed)
    net = TinyResNet().eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path
