"""The model registry (needs torch): a reference model from a name or a user's ``module:callable``.

``build(name, **kwargs)`` makes a reference model with a seeded random init (or, for
``efficientnet_lite0`` and ``mobilenet_v2`` with ``pretrained=True``, the real ImageNet weights
shipped in a package, never downloaded). Every built model carries ``default_input_shape`` (NCHW, batch 1) and
``num_classes``. The registry is an explicit dict, no import magic.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from deployopt.models.efficientnet import efficientnet_lite0
from deployopt.models.mobilenet import mobilenet_v2
from deployopt.models.resnet import resnet18
from deployopt.models.small import digits_cnn, resnet_mnist, seed_cnn, student_cifar, student_mnist
from deployopt.models.vision_zoo import gated_cnn, mobilenet_v3_small, ocr_crnn, prelu_facenet
from deployopt.models.weights import load_weights
from deployopt.core.errors import UserError
from deployopt.core.imports import import_callable
from deployopt.models import NAMES

REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "seed_cnn": seed_cnn,
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "efficientnet_lite0": efficientnet_lite0,
    "resnet_mnist": resnet_mnist,
    "student_mnist": student_mnist,
    "student_cifar": student_cifar,
    "digits_cnn": digits_cnn,
    "mobilenet_v3_small": mobilenet_v3_small,
    "prelu_facenet": prelu_facenet,
    "gated_cnn": gated_cnn,
    "ocr_crnn": ocr_crnn,
}
assert tuple(REGISTRY) == NAMES, "deployopt.models.NAMES lists the registry's names"

__all__ = ["REGISTRY", "build", "resolve", "load_weights", "accepts"]


def _check_kwargs(label: str, fn: Callable, kwargs: dict) -> None:
    """Refuse keyword arguments ``fn`` does not take, before calling it (one-line message)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins/C callables without a signature: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items()
                if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UserError(f"model '{label}': unknown argument(s) {', '.join(unknown)} "
                        f"(accepted: {', '.join(accepted) or 'none'})")


def accepts(name_or_fn: str | Callable, argument: str) -> bool:
    """Whether a registered model name (or a callable) takes keyword ``argument``."""
    fn = REGISTRY[name_or_fn] if isinstance(name_or_fn, str) else name_or_fn
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return argument in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _seeded_call(fn: Callable[..., nn.Module], seed: int, kwargs: dict) -> nn.Module:
    # fork_rng keeps the caller's global RNG state untouched while the init draws from `seed`.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(**kwargs)


def build(name: str, *, seed: int = 0, **kwargs) -> nn.Module:
    """Build reference model ``name`` (one of ``NAMES``), random init drawn from ``seed``.

    Keyword arguments go to the model: ``num_classes``, ``in_channels``, ``width_mult``
    (mobilenet_v2), ``width`` (small models), ``pretrained`` (efficientnet_lite0, mobilenet_v2), ...
    """
    if name not in REGISTRY:
        raise UserError(f"unknown model '{name}' (valid: {', '.join(NAMES)}, or package.module:callable)")
    fn = REGISTRY[name]
    _check_kwargs(name, fn, kwargs)
    for key in ("num_classes", "in_channels", "width", "image_size"):
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"model '{name}': {key} must be a positive integer, got {value!r}")
    if "width_mult" in kwargs and not (isinstance(kwargs["width_mult"], (int, float)) and kwargs["width_mult"] > 0):
        raise UserError(f"model '{name}': width_mult must be a positive number, got {kwargs['width_mult']!r}")
    try:
        return _seeded_call(fn, seed, kwargs)
    except UserError:
        raise
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:  # a value the builder rejects
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UserError(f"model '{name}': cannot build with {args}: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}") from e


def resolve(spec: str, *, seed: int = 0, **kwargs) -> nn.Module:
    """A model from a registered name or from ``package.module:callable``.

    For ``package.module:callable`` this IMPORTS AND RUNS USER CODE: the module is imported
    (the current folder is put on ``sys.path``) and the callable is called with ``kwargs`` under
    ``torch.manual_seed(seed)``; it must return an ``nn.Module``. Only pass specs you trust.
    """
    if ":" not in spec:
        return build(spec, seed=seed, **kwargs)
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise UserError(f"model '{spec}': expected a model name or package.module:callable")
    fn = import_callable(spec, f"model '{spec}'")
    _check_kwargs(spec, fn, kwargs)
    try:
        module = _seeded_call(fn, seed, kwargs)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"model '{spec}': calling it failed: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}") from e
    if not isinstance(module, nn.Module):
        raise UserError(f"model '{spec}': returned {type(module).__name__}, not a torch.nn.Module")
    return module
