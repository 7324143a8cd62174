"""A metric from user code: ``package.module:function``.

THIS IMPORTS AND RUNS USER CODE (only use code you trust). The module is imported with the
current folder on ``sys.path``, as for ``deployopt export package.module:callable``, and the
function is called with the metric's options as keyword arguments (``--metric
out=mypkg.metrics:make:scale=2`` calls ``make(scale=2)``). It returns an object with

    accumulate(outputs, reference_outputs=None, labels=None)   # dicts of output name -> batch array
    result() -> dict                                          # with a float "score", higher is better

``labels`` are the dataset's labels of the batch (class indices) or None. An error raised by
that code while it runs is a ``WorkFailed`` naming the metric, with its error in one line.
"""

from __future__ import annotations

from typing import Any

from deployopt.core.errors import UserError, WorkFailed, one_line
from deployopt.core.imports import import_callable
from deployopt.measure.tasks.base import Metric


def load_factory(spec: str):
    """The function ``spec`` names (UserError when it cannot be imported or is not callable)."""
    return import_callable(spec, f"metric {spec}")


class CustomMetric(Metric):
    """Adapter that runs a user metric and turns its errors into one-line ``WorkFailed``."""

    kind = "custom"

    def __init__(self, spec: str, options: dict[str, Any], outputs):
        super().__init__(outputs)
        self.spec = spec
        self.inner = self._call("creating it", load_factory(spec), **options)
        for method in ("accumulate", "result"):
            if not callable(getattr(self.inner, method, None)):
                raise UserError(f"metric {spec}: returned {type(self.inner).__name__}, which has no {method}()")

    def _call(self, doing: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise WorkFailed(f"metric {self.spec} failed {doing}: {one_line(e, 200, with_type=True)}") from e

    def accumulate(self, outputs, reference_outputs=None, labels=None) -> None:
        pick = (lambda d: d if not self.outputs or d is None else {n: d[n] for n in self.outputs})
        self._call("in accumulate", self.inner.accumulate, pick(outputs), pick(reference_outputs), labels)

    def result(self) -> dict[str, Any]:
        res = self._call("in result", self.inner.result)
        if not isinstance(res, dict) or not isinstance(res.get("score"), (int, float)) or \
                isinstance(res.get("score"), bool):
            raise WorkFailed(f"metric {self.spec} failed in result: it must return a dict with a numeric "
                             f"'score', got {one_line(repr(res), 120)}")
        return {"score_name": "score", **res, "score": float(res["score"])}
