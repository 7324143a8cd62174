"""torch.nn.Module -> one self-contained .onnx file, proven equal to the torch model.

Exporter choice (measured with torch 2.13 on the reference models in models/):

* ``dynamo=True`` (torch.export, the default and maintained exporter) folds BatchNorm into the
  preceding Conv, folds EfficientNet's TF-"SAME" ``Pad`` into asymmetric Conv ``pads``, names
  initializers after their module (``layer1.0.conv1.weight``: reports and per-tensor
  quantization fallbacks can name them), and emits opset 20 by default. But it writes the
  weights to ``<name>.onnx.data`` unless ``external_data=False``, it lowers
  ``AdaptiveAvgPool2d(1)`` to ``ReduceMean(axes=[-1,-2], keepdims=1)``, which int8 quantizers
  leave as a float island between QDQ pairs, and it silently emits opset 18 when asked for
  anything lower.
* ``dynamo=False`` (TorchScript, deprecated since torch 2.9) emits ``GlobalAveragePool`` and
  honours opsets below 18, but names weights ``onnx::Conv_624``, leaves ``Pad`` as an
  unfolded ConstantOfShape/Concat/Slice/Transpose/Cast subgraph, and adds Identity nodes for
  deduplicated initializers.

So ``exporter="auto"`` uses dynamo with ``external_data=False`` and rewrites the ReduceMean
over all spatial axes back to ``GlobalAveragePool`` (identical maths:
``GAP(x)[n, c] = mean_{h, w} x[n, c, h, w]``); it uses TorchScript when an opset below 18 is
requested, and falls back to it (recording why) when torch.export cannot capture the model.

Parity: the module (eval mode) and onnxruntime (CPUExecutionProvider, graph optimizations
disabled, so we test the file and not ORT's rewrites) run the same seeded N(0, 1) input; with a
dynamic batch also a second batch size. ``max |torch - ort|`` above ``tolerance`` is a
``WorkFailed`` and nothing is written. The file is written only after the check passes, atomically
(``deployopt.core.io.save``: temporary file in the target folder, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io as stdio
import logging
import os
import pathlib
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common)
import onnxruntime as ort
import torch
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from deployopt.core import io
from deployopt.core.errors import UserError, WorkFailed, one_line
from deployopt.core.session import open_session

from deployopt.models import EXPORTERS

_DYNAMO_MIN_OPSET = 18  # torch.export-based exporter's lowest opset (it ignores lower requests)
_MIN_OPSET = 7


@dataclasses.dataclass
class ExportResult:
    path: pathlib.Path
    exporter: str  # "dynamo" or "torchscript": the one that produced the file
    opset: int
    max_abs_diff: float  # max |torch - onnxruntime| over all outputs and checked batch sizes
    max_abs_output: float  # max |torch output|: the scale max_abs_diff is to be read against
    seconds: float
    bytes: int = 0
    fallback_reason: str | None = None  # why "auto" did not use dynamo, when it did not
    pooling_rewrites: int = 0  # ReduceMean -> GlobalAveragePool rewrites applied
    input_shape: tuple[int, ...] = ()  # the example input's shape (batch 1 of a dynamic batch included)


class ReduceMeanToGlobalAveragePool(pattern.RewriteRuleClassBase):
    """``ReduceMean(x, axes=[2..r-1], keepdims=1)`` -> ``GlobalAveragePool(x)`` for rank-r x, r >= 3.

    Written by hand: neither onnxscript's rewrite rules nor onnx_ir's passes have this one.
    Only the opset >= 18 form (axes as an input) is matched, which is what dynamo emits.
    """

    def pattern(self, op, x, axes):
        return op.ReduceMean(x, axes, _allow_other_attributes=True, _outputs=["mean"])

    def check(self, context, x: ir.Value, axes: ir.Value, mean: ir.Value, **_) -> MatchResult:
        result = MatchResult()
        node = mean.producer()
        if node.attributes.get_int("keepdims", 1) != 1:
            return result.fail("keepdims=0: GlobalAveragePool keeps the reduced dims")
        if x.shape is None or x.shape.rank() < 3:
            return result.fail("input rank unknown or below 3")
        rank = x.shape.rank()
        tensor = ir.convenience.get_const_tensor(axes)
        if tensor is None:
            return result.fail("axes are not a constant")
        reduced = sorted(int(a) % rank for a in tensor.numpy().reshape(-1))
        if reduced != list(range(2, rank)):
            return result.fail(f"axes {reduced} are not all spatial axes of a rank-{rank} tensor")
        return result

    def rewrite(self, op, x: ir.Value, **_) -> ir.Value:
        return op.GlobalAveragePool(x)


def reduce_mean_to_global_average_pool(model: ir.Model) -> int:
    """Apply the rewrite in place; returns how many ReduceMean nodes were replaced.

    The replaced nodes' ``axes`` initializers are dropped too (the rewriter leaves them behind).
    """
    count = pattern.RewriteRuleSet([ReduceMeanToGlobalAveragePool.rule()]).apply_to_model(model)
    if count:
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224); UserError naming --input-shape otherwise."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(f"--input-shape: '{text}' is not a comma-separated list of integers "
                        "(e.g. 1,3,224,224)") from None
    _check_shape(shape, "--input-shape")
    return shape


def _check_shape(shape: Sequence[int], what: str) -> None:
    if len(shape) < 1 or any(int(d) < 1 for d in shape):
        raise UserError(f"{what}: {tuple(shape)} must be a non-empty list of positive integers")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporters warn about deprecations and absent torchvision ops on every call; none of it
    # is about the user's model, so it would only bury the one-line summary.
    loggers = [logging.getLogger("torch")]  # torch configures only this one; children inherit
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _root_cause(exc: BaseException, limit: int = 200) -> str:
    """The innermost cause, first line only: torch.export wraps it in a page of advice."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    return one_line(f"{type(exc).__name__}: {first}", limit)


def _output_names(output_name: str, count: int) -> list[str]:
    return [output_name] if count == 1 else [f"{output_name}_{i}" for i in range(count)]


def _flatten_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise UserError(f"model output must be a tensor or a tuple of tensors, got {type(out).__name__}")


def _export_dynamo(module, example, input_name, output_names, dynamic_batch, opset) -> tuple[onnx.ModelProto, int]:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    program = torch.onnx.export(module, (example,), dynamo=True, external_data=False, verbose=False,
                                input_names=[input_name], output_names=output_names,
                                opset_version=opset, dynamic_shapes=dynamic_shapes, optimize=True)
    rewrites = reduce_mean_to_global_average_pool(program.model)
    return ir.to_proto(program.model), rewrites


def _export_torchscript(module, example, input_name, output_names, dynamic_batch, opset) -> onnx.ModelProto:
    axes = {name: {0: "batch"} for name in [input_name, *output_names]} if dynamic_batch else None
    with tempfile.TemporaryDirectory(prefix="deployopt-export-") as tmp:
        tmp_path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(module, (example,), tmp_path, dynamo=False, input_names=[input_name],
                          output_names=output_names, opset_version=opset, dynamic_axes=axes,
                          do_constant_folding=True)
        return onnx.load(tmp_path)


def _ort_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    # Graph optimizations off: the parity check tests the file, not onnxruntime's rewrites.
    return open_session(proto, optimization_level="disable", what="the exported model")


def _compare(module, session, input_name, shape, seed) -> tuple[float, float]:
    """(max |torch - ort|, max |torch|) on a seeded N(0, 1) input of ``shape``."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in _flatten_outputs(module(torch.from_numpy(x)))]
    try:
        actual = session.run(None, {input_name: x})
    except Exception as e:
        raise WorkFailed(f"onnxruntime failed to run the exported model on shape {tuple(shape)}: "
                         f"{one_line(e, with_type=True)}") from e
    worst, scale = 0.0, 0.0
    for e, a in zip(expected, actual):
        if e.shape != a.shape:
            raise WorkFailed(f"exported model output shape {a.shape} differs from torch's {e.shape} "
                             f"for input shape {tuple(shape)}")
        worst = max(worst, float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64)), initial=0.0)))
        scale = max(scale, float(np.max(np.abs(e), initial=0.0)))
    return worst, scale


def _check_arguments(input_shape, exporter, opset, tolerance) -> None:
    _check_shape(input_shape, "input_shape")
    if exporter not in EXPORTERS:
        raise UserError(f"exporter: '{exporter}' is not one of {', '.join(EXPORTERS)}")
    max_opset = onnx.defs.onnx_opset_version()
    if opset is not None and not _MIN_OPSET <= opset <= max_opset:
        raise UserError(f"opset: {opset} is outside {_MIN_OPSET}..{max_opset}")
    if exporter == "dynamo" and opset is not None and opset < _DYNAMO_MIN_OPSET:
        raise UserError(f"opset: {opset} is below {_DYNAMO_MIN_OPSET}, the lowest the dynamo exporter emits "
                        "(use exporter 'torchscript' or 'auto')")
    if not tolerance >= 0:
        raise UserError(f"tolerance: {tolerance} must be >= 0")


def _run_exporter(module, example, input_name, output_names, dynamic_batch, opset, exporter):
    """(proto, exporter used, fallback reason, pooling rewrites) following the policy above."""
    fallback_reason = None
    if exporter == "dynamo" or (exporter == "auto" and (opset is None or opset >= _DYNAMO_MIN_OPSET)):
        try:
            # torch.export print()s the partial graph to stderr when it fails; the exception
            # carries the reason, so the dump is dropped.
            with _quiet_exporter(), contextlib.redirect_stderr(stdio.StringIO()):
                proto, rewrites = _export_dynamo(module, example, input_name, output_names, dynamic_batch, opset)
            return proto, "dynamo", None, rewrites
        except Exception as e:
            if exporter == "dynamo":
                raise WorkFailed(f"dynamo export failed: {_root_cause(e)}") from e
            fallback_reason = f"dynamo export failed: {_root_cause(e)}"
    elif exporter == "auto":
        fallback_reason = f"opset {opset} is below {_DYNAMO_MIN_OPSET}"
    try:
        with _quiet_exporter():
            proto = _export_torchscript(module, example, input_name, output_names, dynamic_batch, opset)
    except Exception as e:
        detail = f"; {fallback_reason}" if fallback_reason else ""
        raise WorkFailed(f"torchscript export failed: {one_line(e, with_type=True)}{detail}") from e
    return proto, "torchscript", fallback_reason, 0


def export_model(module: torch.nn.Module, path: str | os.PathLike, input_shape: Sequence[int], *,
                 dynamic_batch: bool = False, opset: int | None = None, tolerance: float = 1e-4,
                 input_name: str = "input", output_name: str = "output", seed: int = 0,
                 exporter: str = "auto") -> ExportResult:
    """Export ``module`` to a single .onnx file at ``path`` and check it against torch.

    Raises UserError for bad arguments, an output path that cannot be written or an input shape
    the model does not accept (all before exporting), WorkFailed when export fails or
    ``max |torch - ort| > tolerance`` (then nothing is written). The module is run in eval mode
    and handed back in the mode it came in.
    """
    start = time.perf_counter()
    input_shape = tuple(int(d) for d in input_shape)
    _check_arguments(input_shape, exporter, opset, tolerance)
    path = io.check_output_path(path)

    was_training = module.training
    module.eval()
    try:
        example = torch.from_numpy(np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32))
        try:
            with torch.no_grad():
                outputs = _flatten_outputs(module(example))
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"input shape {input_shape} does not fit the model: {one_line(e, with_type=True)}") from e
        output_names = _output_names(output_name, len(outputs))

        proto, used, fallback_reason, rewrites = _run_exporter(
            module, example, input_name, output_names, dynamic_batch, opset, exporter)
        produced_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset is not None and produced_opset != opset:
            raise WorkFailed(f"asked for opset {opset}, the {used} exporter produced opset {produced_opset}")

        session = _ort_session(proto)
        diff, scale = _compare(module, session, input_name, input_shape, seed)
        if dynamic_batch:  # prove the batch dim really is dynamic: run a second batch size too
            diff2, scale2 = _compare(module, session, input_name, (input_shape[0] + 2, *input_shape[1:]), seed + 1)
            diff, scale = max(diff, diff2), max(scale, scale2)
        if not diff <= tolerance:  # also catches NaN
            raise WorkFailed(f"{path}: exported model differs from torch: max abs diff {diff:.3g} "
                             f"> tolerance {tolerance:g}; nothing written")
        io.save(proto, path)
    finally:
        module.train(was_training)
    return ExportResult(path=path, exporter=used, opset=produced_opset, max_abs_diff=diff, max_abs_output=scale,
                        seconds=time.perf_counter() - start, bytes=path.stat().st_size,
                        fallback_reason=fallback_reason, pooling_rewrites=rewrites,
                        input_shape=tuple(input_shape))

