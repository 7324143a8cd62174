"""The float model made ready for onnxruntime's quantizer.

Constant nodes become initializers (their weights can then be quantized), every node gets a name
(``nodes_to_exclude`` and the per-node profile need names), the opset is raised to what QDQ
needs (per-channel weights need DequantizeLinear's ``axis``, opset 13; below 11 onnxruntime does
not fuse Q/DQ at all) together with the IR version that opset needs (an IR 3 graph upgraded to
opset 13 but left at IR 3 has untyped value_info entries onnxruntime refuses: "Invalid tensor data
type 0"), then ``quant_pre_process`` runs shape inference and onnxruntime's basic optimization,
which keeps node names. onnxruntime's shape inference writes scratch files into the current
folder and the temp folder, so it runs confined to the pass's private folder.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Sequence

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, NameFixPass
from onnxruntime.quantization.shape_inference import quant_pre_process

from deployopt.core.contain import confined
from deployopt.core.errors import UserError, one_line
from deployopt.passes.quantize.data import InputSpec, model_inputs

PER_CHANNEL_OPSET = 13
MIN_OPSET = 11
#: The float model as given to quant_pre_process, kept as the latency reference.
FLOAT_FILE = "float.onnx"
PREPROCESSED_FILE = "preprocessed.onnx"


@dataclasses.dataclass
class Prepared:
    """The pre-processed float model (what is calibrated and quantized) and how it was made."""

    path: pathlib.Path
    proto: onnx.ModelProto
    inputs: list[InputSpec]
    #: The model before quant_pre_process (constants lifted, opset raised). It is the float
    #: reference of the latency trials: pre-processing inlines HardSwish into HardSigmoid + Mul,
    #: which the float runtime would otherwise fuse into the convolution before it.
    float_path: pathlib.Path
    constants_lifted: int
    opset: dict[str, int]  # {"input": ..., "quantized": ...}
    preprocess: str
    notes: list[str]
    #: The model accuracy is judged against: ``path`` unless equalization (equalize.py) rescaled
    #: channels in it, then the pre-processed model before that.
    reference: pathlib.Path | None = None

    def __post_init__(self):
        if self.reference is None:
            self.reference = self.path


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def prepare(proto: onnx.ModelProto, folder: pathlib.Path, *, per_channel: bool) -> Prepared:
    """Lift Constant weights, name nodes, raise the opset if needed, then quant_pre_process."""
    notes: list[str] = []
    work = ir.from_proto(proto)
    constants = sum(1 for n in work.graph if n.op_type == "Constant")
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(work)
    NameFixPass()(work)
    lifted = constants - sum(1 for n in work.graph if n.op_type == "Constant")
    if lifted:
        notes.append(f"{lifted} Constant nodes lifted to initializers (their weights can be quantized)")
    proto = ir.to_proto(work)
    opset = _opset(proto)
    target = PER_CHANNEL_OPSET if per_channel else MIN_OPSET
    if opset < target:
        try:
            proto = onnx.version_converter.convert_version(proto, target)
        except Exception as e:  # the converter raises its own (C++) exception types
            raise UserError(f"model: opset {opset} cannot be upgraded to {target} for "
                            f"quantization: {one_line(e, 200)}") from e
        need = "per-channel QDQ weights need DequantizeLinear axis" if per_channel \
            else "onnxruntime fuses Q/DQ only from opset 11"
        notes.append(f"opset upgraded from {opset} to {target} ({need})")
    ir_version = onnx.helper.find_min_ir_version_for(proto.opset_import, ignore_unknown=True)
    if proto.ir_version < ir_version:
        notes.append(f"IR version raised from {proto.ir_version} to {ir_version} (what opset "
                     f"{max(opset, target)} needs)")
        proto.ir_version = ir_version
    src, pre = folder / FLOAT_FILE, folder / PREPROCESSED_FILE
    onnx.save(proto, str(src))
    # symbolic shape inference saves the graph it could not finish as sym_shape_infer_temp.onnx
    # (+ <uuid>.data) in the current folder: confined, that is the private folder
    with confined(folder):
        try:
            quant_pre_process(str(src), str(pre))
            preprocess = "symbolic + onnx shape inference, onnxruntime basic optimization"
        except Exception as e:  # symbolic shape inference does not know every op
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            notes.append(f"symbolic shape inference skipped ({one_line(e, 120)}); onnx shape inference used")
            preprocess = "onnx shape inference, onnxruntime basic optimization"
    pre_proto = onnx.load(str(pre))
    if any(not n.name for n in pre_proto.graph.node):
        # Inlined function bodies (HardSwish -> HardSigmoid, Mul) come out unnamed.
        work = ir.from_proto(pre_proto)
        NameFixPass()(work)
        onnx.save(ir.to_proto(work), str(pre))
        pre_proto = onnx.load(str(pre))
    return Prepared(pre, pre_proto, model_inputs(pre_proto), src, lifted,
                    {"input": opset, "quantized": max(opset, target)}, preprocess, notes)


def matching_nodes(proto: onnx.ModelProto, patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """Node names equal to or fully matching one of ``patterns`` (regexes), in pattern order, and
    the patterns that matched nothing."""
    names = [n.name for n in proto.graph.node]
    chosen: list[str] = []
    unmatched: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if n == pattern or re.fullmatch(pattern, n)]
        if not hits:
            unmatched.append(pattern)
        chosen += [h for h in hits if h not in chosen]
    return chosen, unmatched
