"""The deployopt pass contract on top of onnx_ir's pass infrastructure.

A pass is a dataclass whose init fields are its recipe settings, typed and bounded through
``deployopt.core.settings`` (checked in ``__post_init__``, before any work; ``validate()`` adds
rules that tie fields together). Every pass also takes ``min_step_speedup``, the step guard: the
pipeline reverts a step whose output is slower than its input by that ratio (off unless set;
``quantize`` sets its default to 1.0).

What a pass needs beyond the model comes in a ``PassContext`` (datasets, reference model, seed,
work folder, threads) that the pipeline hands over before calling it. What it did comes back in a
typed ``StepResult``: the model, whether it changed, ``notes`` (what it did, skipped and why, for
people), ``details`` (the same facts as data, for report.json) and ``failure`` (set when the pass
ran but missed its own tolerance: it still returns its best model, which the pipeline saves
before exiting 1 with this reason). Inside ``call`` a pass records them with ``note()``,
``self.details[...]`` and ``fail()``.

Subclass ``DeployInPlacePass`` (mutates and returns the same ``ir.Model``) or
``DeployFunctionalPass`` (returns a new ``ir.Model``, e.g. passes that round-trip through
onnxruntime's file-based APIs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any, ClassVar

import onnx_ir as ir

from deployopt.core.settings import Settings, setting, setting_fields
from deployopt.passes.context import PassContext


@dataclasses.dataclass
class StepResult(ir.passes.PassResult):
    """What one pass did: ``PassResult`` (model, modified) plus its notes, details and failure."""

    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    failure: str | None = None


@dataclasses.dataclass
class _DeployPassMixin(Settings):
    #: Name used in recipes and reports ("cleanup", "quantize", ...).
    name: ClassVar[str] = ""
    #: The pass cannot run without ``context.calibration`` (checked before any work). A pass whose
    #: needs depend on its settings overrides these with properties.
    needs_calibration: ClassVar[bool] = False
    #: The pass cannot run without ``context.evaluation``.
    needs_evaluation: ClassVar[bool] = False
    #: The pass cannot run without ``context.training`` (which falls back to the calibration data).
    needs_training: ClassVar[bool] = False
    #: The lowest ONNX opset the pass works on; the pipeline upgrades an older model before the
    #: pass runs (and reports it). None: any opset.
    min_opset: ClassVar[int | None] = None

    # The step guard (see the module docstring); None = off.
    min_step_speedup: float | None = setting(None, low=0, low_open=True)

    def __post_init__(self) -> None:
        self._context: PassContext | None = None
        self.notes: list[str] = []
        self.details: dict[str, Any] = {}
        self.failure: str | None = None
        super().__post_init__()

    def params(self) -> dict[str, Any]:
        """The settings, as recorded in the report."""
        return {f.name: getattr(self, f.name) for f in setting_fields(self)}

    # -- context -------------------------------------------------------------------------------
    @property
    def context(self) -> PassContext:
        if self._context is None:
            self._context = PassContext()
        return self._context

    @context.setter
    def context(self, value: PassContext) -> None:
        self._context = value

    # -- what the step did ------------------------------------------------------------------------
    def note(self, message: str) -> None:
        """Record a human-readable fact about this step (skips, fallbacks, choices)."""
        self.notes.append(message)

    @contextlib.contextmanager
    def private_folder(self) -> Iterator[pathlib.Path]:
        """A temporary folder for this step's files, below the run's work folder
        (``context.work_dir``, itself private to the run), removed when the step ends."""
        parent = self.context.work_dir
        if parent is not None:
            pathlib.Path(parent).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{self.name or 'pass'}-", dir=parent) as folder:
            yield pathlib.Path(folder)

    def fail(self, reason: str) -> None:
        """The pass missed its own tolerance: it returns its best model, the run exits 1 with ``reason``."""
        self.failure = reason

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> StepResult:
        self.notes, self.details, self.failure = [], {}, None
        result = super().__call__(model_or_result)
        return StepResult(result.model, result.modified, list(self.notes), dict(self.details), self.failure)


@dataclasses.dataclass
class DeployInPlacePass(_DeployPassMixin, ir.passes.InPlacePass):
    """A pass that edits the model in place."""


@dataclasses.dataclass
class DeployFunctionalPass(_DeployPassMixin, ir.passes.FunctionalPass):
    """A pass that returns a new model and leaves its input untouched."""
