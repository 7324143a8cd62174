"""The deployopt pass contract on top of onnx_ir's pass infrastructure.

A pass is a dataclass whose (init) fields are its recipe parameters. ``validate()`` runs in
``__post_init__`` and raises ``UserError`` whose message names the field and the allowed range;
the recipe loader prefixes it with ``passes[i].name``. The pipeline sets ``self.context`` (a
``PassContext``) before calling the pass, and reads ``context.notes``/``context.details`` after.

Subclass one of ``DeployInPlacePass`` (mutates and returns the same ``ir.Model``) or
``DeployFunctionalPass`` (returns a new ``ir.Model``; e.g. passes that round-trip through
onnxruntime's file-based APIs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import onnx_ir as ir

from deployopt.passes.context import PassContext
from deployopt.core.errors import UserError


class _DeployPassMixin:
    #: Name used in recipes and reports ("cleanup", "quantize", ...).
    name: ClassVar[str] = ""
    #: True when the pass cannot run without ``context.calibration`` (checked before any work).
    needs_calibration: ClassVar[bool] = False
    #: True when the pass cannot run without ``context.evaluation``.
    needs_evaluation: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self._context: PassContext | None = None
        self.validate()

    # -- settings -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Check field values; raise ``UserError('field: why (allowed ...)')``."""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    # -- context --------------------------------------------------------------------------------
    @property
    def context(self) -> PassContext:
        if self._context is None:
            self._context = PassContext()
        return self._context

    @context.setter
    def context(self, value: PassContext) -> None:
        self._context = value

    def note(self, message: str) -> None:
        self.context.note(message)


def check_range(field: str, value: float, low: float | None = None, high: float | None = None,
                *, low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``UserError`` naming ``field`` when ``value`` is outside the interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{field}: expected a number, got {value!r}")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lb = "(" if low_open else "["
        rb = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise UserError(f"{field}: {value!r} is outside {lb}{lo}, {hi}{rb}")


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{field}: {value!r} is not one of {', '.join(choices)}")


@dataclasses.dataclass
class DeployInPlacePass(_DeployPassMixin, ir.passes.InPlacePass):
    """A pass that edits the model in place."""

    def __post_init__(self) -> None:  # dataclass calls this; keep the mixin's behaviour
        _DeployPassMixin.__post_init__(self)


@dataclasses.dataclass
class DeployFunctionalPass(_DeployPassMixin, ir.passes.FunctionalPass):
    """A pass that returns a new model and leaves its input untouched."""

    def __post_init__(self) -> None:
        _DeployPassMixin.__post_init__(self)
