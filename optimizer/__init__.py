"""deployopt: optimize ONNX vision models for CPU deployment and prove what every step bought.

The Python API (see ``deployopt.api``): ``optimize``, ``sweep``, ``bench``, ``profile``, ``evaluate``, ``export``,
``inspect`` and their typed results ``Report``, ``BenchResult``, ``EvalResult``. Errors:
``UserError`` (bad input) and ``WorkFailed`` (the work ran and failed).

Importing this package is light: the API functions load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from deployopt.core.errors import DeployoptError, UserError, WorkFailed  # noqa: E402

_API = ("optimize", "sweep", "bench", "profile", "evaluate", "export", "inspect", "Report", "BenchResult", "EvalResult")
__all__ = [*_API, "DeployoptError", "UserError", "WorkFailed", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("deployopt.api"), name)
    raise AttributeError(f"module 'deployopt' has no attribute {name!r}")
