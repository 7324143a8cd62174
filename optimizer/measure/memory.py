"""Resident memory of this process: its peak so far, its size now, and the peak over a block.

Peak: VmHWM of /proc/self/status, the high-water mark of this process image only. Not
``getrusage().ru_maxrss``: Linux carries that over fork and exec, so a spawned worker (every
latency and profile worker is one) would report at least its parent's size at the moment it was
started, and a model's peak memory would include the parent's. ru_maxrss is only the fallback
where /proc is missing (macOS).

Neither can be reset, so the peak of one step of a longer run (e.g. calibration after a model
load) comes from ``RssSampler``, which samples the current size on a thread while a block runs.
"""

from __future__ import annotations

import os
import resource
import sys
import threading


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (module doc: VmHWM, not ru_maxrss)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    """Resident set size now, in MiB, from /proc/self/statm (Linux); None where that file is missing."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return None


class RssSampler:
    """Highest RSS (MiB, ``peak_mb``) seen while the ``with`` block runs, sampled every
    ``interval`` seconds by a daemon thread and once more on exit. ``peak_mb`` stays None where
    ``current_rss_mb`` cannot read the size."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mb = interval, current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = current_rss_mb()
        if now is not None and (self.peak_mb is None or now > self.peak_mb):
            self.peak_mb = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
