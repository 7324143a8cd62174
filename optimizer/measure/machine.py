"""Machine stamp: what a latency number was measured on.

Latency only means something next to the CPU it came from: int8 kernels in onnxruntime are fast
only where the CPU has VNNI (avx512_vnni) or AMX, so the stamp lists the ISA flags that decide
which kernels run, together with the core count, the onnxruntime version, the version of every
runtime deployopt can measure on that is installed (``runtimes``, on request) and the OS.
"""

from __future__ import annotations

import os
import platform
import sys

#: ISA flags (as spelled in /proc/cpuinfo) that change which onnxruntime CPU kernels run.
ISA_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "amx_int8")


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str | None, set[str]]:
    """CPU model name and flag set from /proc/cpuinfo (Linux); (None, empty) elsewhere."""
    name, flags = None, set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if name is not None and flags:
                    break
    except OSError:
        pass
    return name, flags


def _cores() -> int:
    # The cores this process may run on (cgroup/affinity limits), not the host's total.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def stamp(*, runtimes: bool = False) -> dict:
    """{cpu, isa[], cores, onnxruntime, os, python} for report.json and results pages; with
    ``runtimes`` also {runtimes: {name: version}} for every installed runtime deployopt measures on."""
    import onnxruntime

    from deployopt.measure.runtime import RUNTIMES, runtime_version

    name, flags = _cpuinfo()
    result = {
        "cpu": name or platform.processor() or platform.machine(),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
        "cores": _cores(),
        "onnxruntime": onnxruntime.__version__,
        "os": platform.platform(),
        "python": sys.version.split()[0],
    }
    if runtimes:
        result["runtimes"] = {name: version for name in RUNTIMES if (version := runtime_version(name))}
    return result


def stamp_line(machine: dict) -> str:
    """One human-readable line for tables and results pages."""
    isa = ", ".join(machine.get("isa") or []) or "none of " + "/".join(ISA_FLAGS)
    others = "".join(f", {name} {version}" for name, version in (machine.get("runtimes") or {}).items()
                     if name != "onnxruntime")
    return (f"{machine['cpu']} ({machine['cores']} cores; {isa}), onnxruntime "
            f"{machine['onnxruntime']}{others}, {machine['os']}, Python {machine.get('python', '?')}")
