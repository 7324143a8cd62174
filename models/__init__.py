"""Reference PyTorch models, offline weights and the torch-to-ONNX exporter: deployopt's torch side.

Everything here needs the ``torch`` extra (``pip install 'deployopt[torch]'``). Importing this
package does not import torch: the names below are torch-free, and ``build``, ``resolve``,
``load_weights``, ``accepts`` and ``REGISTRY`` load ``deployopt.models.registry`` on first use,
so the CLI and the ONNX-only features start without torch. Without torch installed, touching
them raises a one-line ``UserError`` naming the extra.
"""

from __future__ import annotations

import importlib
from typing import Any

from deployopt.core.errors import UserError

#: Registered reference model names (``deployopt.models.registry.REGISTRY`` holds the builders).
NAMES: tuple[str, ...] = ("seed_cnn", "resnet18", "mobilenet_v2", "efficientnet_lite0", "resnet_mnist",
                          "student_mnist", "student_cifar", "digits_cnn", "mobilenet_v3_small",
                          "prelu_facenet", "gated_cnn", "ocr_crnn")
#: torch exporters ``deployopt.models.export.export_model`` can use.
EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "torchscript")

_LAZY = ("REGISTRY", "build", "resolve", "load_weights", "accepts")


def require_torch(feature: str) -> None:
    """Raise a one-line ``UserError`` when torch is missing; ``feature`` names what needed it."""
    try:
        importlib.import_module("torch")
    except ImportError as e:
        raise UserError(f"{feature} needs PyTorch, which is not installed: "
                        "pip install 'deployopt[torch]'") from e


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require_torch(f"deployopt.models.{name}")
        registry = importlib.import_module("deployopt.models.registry")
        return getattr(registry, name)
    raise AttributeError(f"module 'deployopt.models' has no attribute {name!r}")
