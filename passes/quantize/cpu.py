"""What this CPU's int8 kernels need from the weights: ``reduce_range``, decided once per run.

Without VNNI, x86 int8 kernels multiply uint8 by int8 with ``vpmaddubsw``, whose pairwise int16
sums saturate when both operands use the full 8 bits (2 x 255 x 127 > 32767); 7-bit weights
avoid that. With VNNI (``vpdpbusd`` accumulates in int32) or on other architectures, full 8-bit
weights are exact.

Depthwise convolutions (one input and one output channel per group) are exempt: onnxruntime's
int8 depthwise kernel widens each product to int32 before summing, so it cannot saturate.
Measured on an AVX2-only CPU (tests/test_quantize_cpu.py): full-range int8 weights against uint8
inputs near 255 give the QDQ model's float result bit for bit, in onnxruntime's QLinearConv and
in the OpenVINO runtime's uint8 convolution alike, where a dense 3x3 or 1x1 conv is off by tens
of output steps. Those weights keep all 8 bits, which halves their rounding error on
the layers of MobileNet-style networks with the fewest weights per output (9).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable

import onnx

from deployopt.measure import machine

#: CPU flags of int8 dot products that accumulate in int32.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def is_depthwise(weight_shape: Iterable[int], group: int) -> bool:
    """A Conv with one input and one output channel per group: the int8 kernel that sums in int32."""
    shape = tuple(weight_shape)
    return len(shape) >= 3 and group > 1 and shape[0] == group and shape[1] == 1


def conv_group(node: onnx.NodeProto) -> int:
    """A Conv's ``group`` attribute (1 when absent)."""
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def full_range_weights(proto: onnx.ModelProto) -> list[str]:
    """The weight initializers of ``proto`` that keep 8 bits under ``reduce_range`` (depthwise Conv)."""
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    names = []
    for node in proto.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in shapes:
            continue
        if is_depthwise(shapes[node.input[1]], conv_group(node)):
            names.append(node.input[1])
    return names


def auto_reduce_range() -> tuple[bool, str]:
    """``reduce_range`` for this CPU and why (recorded in the report)."""
    arch = platform.machine().lower()
    if arch not in ("x86_64", "amd64", "i386", "i686"):
        return False, f"{arch} CPU: onnxruntime's int8 kernels here do not saturate, full 8-bit weights"
    isa = machine.stamp()["isa"]  # the project's single reading of /proc/cpuinfo
    if any(flag in isa for flag in VNNI_FLAGS):
        return False, "CPU has VNNI (" + ", ".join(f for f in isa if "vnni" in f or "amx" in f) + \
            "): full 8-bit weights"
    return True, ("CPU has no VNNI: uint8 x int8 products can saturate the int16 sums of "
                  "vpmaddubsw, so weights use 7 bits (reduce_range=True; depthwise Conv weights keep 8, "
                  "their kernel sums in int32); set reduce_range: false to override")
