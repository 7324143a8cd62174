"""What this CPU's int8 kernels need from the weights: ``reduce_range``, decided once per run.

Without VNNI, x86 int8 kernels multiply uint8 by int8 with ``vpmaddubsw``, whose pairwise int16
sums saturate when both operands use the full 8 bits (2 x 255 x 127 > 32767); 7-bit weights
avoid that. With VNNI (``vpdpbusd`` accumulates in int32) or on other architectures, full 8-bit
weights are exact.
"""

from __future__ import annotations

import platform

from deployopt.measure import machine

#: CPU flags of int8 dot products that accumulate in int32.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


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
                  "vpmaddubsw, so weights use 7 bits (reduce_range=True); set reduce_range: false "
                  "to override")
