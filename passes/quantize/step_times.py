"""Wall time of the pass's steps, for ``details['timings_s']``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class StepTimes:
    """Seconds per step name, summed over repeats (a step that runs once per trial adds up) and
    rounded to milliseconds. Steps may nest: the fallback's time includes its quantizations."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[step] = round(self.seconds.get(step, 0.0) + time.perf_counter() - t0, 3)
