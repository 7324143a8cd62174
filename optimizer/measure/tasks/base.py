"""The metric contract every task metric follows, and the checks they share.

A metric reads one or more model outputs and is fed batch by batch:

    metric.accumulate(outputs, reference_outputs=None, labels=None)
    metric.result() -> {"score": float, "score_name": str, ...named secondary keys}

``outputs`` and ``reference_outputs`` map output names to the arrays of one batch (leading axis
the batch); ``labels`` is the batch's labels as the metric's label reader gives them (class
indices, boxes per image, masks, texts), or None. ``score`` is the primary number, higher is
better, in [0, 1] for the built-in metrics: the label metric when labels were given, otherwise
the agreement with the reference. Gates and accuracy fallbacks compare ``score`` between models
measured the same way. Memory stays flat in the number of samples wherever the metric allows
(running sums, confusion matrices); mAP keeps the detections, at most ``max_detections`` per image.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deployopt.core.errors import UserError


def shape_text(shape: Sequence[Any]) -> str:
    """[1, 7600, 10] -> 1x7600x10; symbolic dims by name, unknown dims as '?'."""
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


def does_not_fit(kind: str, name: str, shape: Sequence[Any], needs: str) -> UserError:
    """The one-line refusal of a metric that cannot read an output."""
    return UserError(f"metric {kind}: output '{name}' has shape {shape_text(shape)}; {kind} needs {needs}")


def class_axis(axis: int, ndim: int, kind: str, name: str, shape: Sequence[Any]) -> int:
    """``axis`` made non-negative for an output of rank ``ndim`` (UserError when out of range)."""
    if not -ndim <= axis < ndim:
        raise does_not_fit(kind, name, shape, f"a class axis {axis} within its {ndim} axes")
    return axis % ndim


class Metric(abc.ABC):
    """A task metric over named model outputs (see the module docstring for the contract)."""

    kind: str = "metric"

    def __init__(self, outputs: Sequence[str]):
        self.outputs = list(outputs)  # the output names it reads, in order; empty: all of them

    def check(self, shapes: Mapping[str, Sequence[Any]]) -> None:
        """Refuse outputs this metric cannot read (``shapes``: name -> dims, possibly symbolic),
        before any sample runs. The default accepts anything."""

    @abc.abstractmethod
    def accumulate(self, outputs: Mapping[str, np.ndarray], reference_outputs: Mapping[str, np.ndarray] | None = None,
                   labels: Any = None) -> None:
        """Add one batch."""

    @abc.abstractmethod
    def result(self) -> dict[str, Any]:
        """{score, score_name, ...} of everything accumulated so far."""

    def selected(self, outputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The arrays this metric reads, in ``self.outputs`` order (all outputs when none named)."""
        return [outputs[n] for n in self.outputs] if self.outputs else list(outputs.values())
