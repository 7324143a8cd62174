"""PassContext: everything a pass may need beyond the model itself.

The pipeline builds one context per run and hands it to each pass before calling it; passes
never open files or datasets on their own. The context holds inputs only: what a pass did comes
back in its ``StepResult`` (``deployopt.passes.base``).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx_ir as ir

    from deployopt.core.data import Dataset
    from deployopt.measure.tasks import MetricSpec


@dataclasses.dataclass
class PassContext:
    calibration: Dataset | None = None  # data.calibration of the recipe
    evaluation: Dataset | None = None  # data.evaluation of the recipe
    training: Dataset | None = None  # data.training (distillation); falls back to calibration
    reference: ir.Model | None = None  # the pipeline's input model (before any pass)
    seed: int = 0
    work_dir: pathlib.Path | None = None  # a private temporary folder, removed after the run
    threads: int = 1  # intra-op threads for any onnxruntime session a pass opens
    # The target latency is measured on (benchmark.runtime / benchmark.ep): a pass that times
    # models (latency-aware quantization) decides on this target (deployopt.measure.runtime).
    runtime: str = "onnxruntime"
    ep: str | None = None
    # The recipe's task metric specs (deployopt.measure.tasks.MetricSpec), by which a pass with an
    # accuracy tolerance judges its candidates (deployopt.measure.judge); empty: the defaults.
    metrics: list[MetricSpec] = dataclasses.field(default_factory=list)
    # Runs a latency measurement while this run holds the machine's benchmark slot:
    # ``bench_slot(measure)`` returns ``measure()``. A sweep runs trials side by side, and a pass's
    # own timings must not overlap another trial's; None: measure at once.
    bench_slot: Callable[[Callable[[], Any]], Any] | None = None
