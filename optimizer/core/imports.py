"""Importing a user's ``package.module:callable``, for every place that accepts one (export's model
factory, custom metrics).

This IMPORTS AND RUNS USER CODE: only specs the user gave, and only code they trust. Like
``python -m`` the current folder is made importable (the console script's ``sys.path`` does not
include it). Every failure is one ``UserError`` line that starts with ``what``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from deployopt.core.errors import UserError, one_line


def import_callable(spec: str, what: str) -> Callable:
    """The callable that ``spec`` (``package.module:attr.path``) names; ``what`` prefixes errors,
    e.g. ``"model 'pkg.mod:make'"``."""
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise UserError(f"{what}: expected package.module:callable")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise UserError(f"{what}: cannot import module '{module_name}' ({e})") from e
    except Exception as e:  # user code failing at import time: report it, one line
        raise UserError(f"{what}: importing '{module_name}' failed: {one_line(e, 200, with_type=True)}") from e
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise UserError(f"{what}: module '{module_name}' has no attribute '{attr_path}'")
        target = getattr(target, attr)
    if not callable(target):
        raise UserError(f"{what}: '{attr_path}' is not callable")
    return target
