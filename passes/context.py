"""PassContext: everything a pass may need beyond the model itself.

The pipeline builds one context per run and hands it to each pass before calling it; passes
never open files or datasets on their own. A pass writes what it did (and what it skipped and
why) into ``notes`` and machine-readable facts into ``details``; the pipeline copies both into
the step's record in report.json.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx_ir as ir

    from deployopt.core.data import Dataset


@dataclasses.dataclass
class PassContext:
    calibration: Dataset | None = None  # data.calibration of the recipe
    evaluation: Dataset | None = None  # data.evaluation of the recipe
    training: Dataset | None = None  # data.training (distillation); falls back to calibration
    reference: ir.Model | None = None  # the pipeline's input model (before any pass)
    seed: int = 0
    work_dir: pathlib.Path | None = None  # a private temporary folder, removed after the run
    threads: int = 1  # intra-op threads for any onnxruntime session a pass opens
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Set by a pass that ran but missed its own tolerance: it still returns its best model, the
    # pipeline saves that model and the report, and exits 1 with this reason.
    failure: str | None = None

    def note(self, message: str) -> None:
        """Record a human-readable fact about this step (skips, fallbacks, choices)."""
        self.notes.append(message)

    def for_step(self) -> PassContext:
        """A copy with empty notes/details, for the next pass (datasets are shared)."""
        return dataclasses.replace(self, notes=[], details={}, failure=None)
