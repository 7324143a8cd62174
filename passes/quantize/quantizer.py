"""QDQ insertion by onnxruntime's ``quantize_static``, repeatable for every trial.

Every quantized tensor is stored as ``q = clamp(round(x / s) + z, qmin, qmax)`` and read back as
``x' = s (q - z)``. The ranges come from a calibration cache, so fallback and latency trials
re-quantize with more nodes in float without re-calibrating; each result's integer weights and
biases are then refined (refine.py) against float statistics collected once. onnxruntime's
quantizer round-trips the model through temporary folders: they go in the folder of the result.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

from onnxruntime.quantization import QuantType, quantize_static

from deployopt.core.contain import confined
from deployopt.core.errors import WorkFailed, one_line
from deployopt.passes.quantize.refine import Refiner
from deployopt.passes.quantize.step_times import StepTimes

#: Setting values -> onnxruntime's integer types.
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


@dataclasses.dataclass
class Quantizer:
    """QDQ models of one pre-processed float model, calibrated once, with chosen nodes in float."""

    float_path: pathlib.Path  # the pre-processed float model
    cache: pathlib.Path  # calibration ranges (save_tensors_data)
    options: dict[str, Any]  # quantize_static's format arguments (QDQ, types, per-channel, ...)
    times: StepTimes
    refiner: Refiner | None = None
    float_nodes: list[str] = dataclasses.field(default_factory=list)  # always kept float
    #: The refinement summary of every model made, by path (shared by ``keeping_float`` copies).
    refinements: dict[pathlib.Path, dict] = dataclasses.field(default_factory=dict)

    def __call__(self, float_nodes: Sequence[str], path: pathlib.Path) -> pathlib.Path:
        """Quantize with ``float_nodes`` (beyond ``self.float_nodes``) in float into ``path``."""
        with self.times("quantize"), confined(path.parent):
            try:
                quantize_static(str(self.float_path), str(path), calibration_data_reader=None,
                                calibration_cache_path=str(self.cache),
                                nodes_to_exclude=[*self.float_nodes, *float_nodes], **self.options)
            except Exception as e:  # onnxruntime raises whatever its quantizer hits
                raise WorkFailed(f"onnxruntime quantize_static failed: {one_line(e, with_type=True)}") from e
        if self.refiner is not None:
            with self.times("refine"):
                self.refinements[path] = self.refiner(path)
        return path

    def keeping_float(self, nodes: Sequence[str]) -> Quantizer:
        """The same quantizer with ``nodes`` also always in float."""
        return dataclasses.replace(self, float_nodes=[*self.float_nodes, *nodes])
