"""Third-party graphs brought to the form the passes expect, each rewrite recorded.

Exporters other than ours (old model zoos, Caffe2, paddle2onnx, tf2onnx) write valid ONNX in
older conventions. ``normalize`` rewrites those conventions on load, before any pass, and returns
one ``Action`` per rewrite for the report. Every rewrite leaves the function the model computes
unchanged: the same values reach the same operators.

- **Initializers listed as graph inputs** (IR < 4 required it; Caffe2 and old zoo graphs keep
  it): such an input is a weight with a default value that a caller may override, not data.
  Nobody deploying the model feeds its weights, so the input is dropped from ``graph.inputs`` and
  the initializer stays. The value every node reads is the initializer's, as before.
- **IR version below 4** is raised to 4, the first version that allows an initializer which is
  not a graph input (the only rule that changed between IR 3 and 4), so that the rewrites here
  and the passes' own lifting of constants keep the model valid.
- **Constant nodes that hold weights** (paddle2onnx writes every weight as a ``Constant`` node
  and no initializer) become initializers of the same name, type and value, through onnx_ir's
  ``LiftConstantsToInitializersPass``: a Constant node's output and an initializer are the same
  thing to every consumer. Constants below ``LIFT_MIN_ELEMENTS`` elements (scalars, shapes,
  axes) stay nodes: they are not weights any pass edits.
- **Unused opset imports** (a ``Paddle`` domain that no node uses) are removed through onnx_ir's
  ``RemoveUnusedOpsetsPass``: an import that no node names selects no operator. Nodes in
  custom domains are left alone and listed, because only their runtime knows what they compute.
- **Opset upgrade** (``upgrade_opset``, run by the pipeline before a pass whose ``min_opset``
  the model is below): ``onnx.version_converter`` rewrites each node to the newer opset's
  definition of the same operator (e.g. ``Upsample``-9 to ``Resize``, attributes to inputs),
  whose semantics the ONNX adapters preserve; the tests compare outputs before and after.

Refused (``UserError``, before any work): a weight, initializer or Constant node, holding NaN, or
holding ±Inf unless only bounding and selecting operators read it (``Clip(x, 0, inf)``, a mask
in ``Where``). Quantization scales, BatchNorm folding and every statistic would propagate them
silently or fail deep inside onnxruntime; the user must fix the model.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from deployopt.core.errors import UserError, one_line

#: Constant nodes with fewer elements than this stay nodes (scalars, shapes, axes, scales).
LIFT_MIN_ELEMENTS = 16
#: The first IR version in which an initializer need not be listed as a graph input.
IR_INITIALIZERS_NOT_INPUTS = 4
DEFAULT_DOMAINS = ("", "ai.onnx")
#: Operators for which an infinite constant is a legitimate bound or fill, not a broken weight.
_INF_BOUND_READERS = frozenset({"Clip", "Min", "Max", "Where", "Less", "LessOrEqual", "Greater",
                                "GreaterOrEqual", "Equal"})
_CONVERTER_LOCATION = re.compile(r"^\S+\.(?:h|cc|cpp):\d+: \S+\(\): ")


@dataclasses.dataclass(frozen=True)
class Action:
    """One rewrite ``normalize`` or ``upgrade_opset`` made: what, how many, and why."""

    action: str
    count: int
    what: str
    why: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return f"{self.what} ({self.why})"


# -- facts ------------------------------------------------------------------------------------------

def default_opset(model: ir.Model) -> int:
    """The model's ONNX (default domain) opset version; 0 when it imports none."""
    return next((v for d, v in model.opset_imports.items() if d in DEFAULT_DOMAINS), 0)


def data_inputs(model: ir.Model) -> list[ir.Value]:
    """The graph inputs a caller feeds: initializers listed as inputs are weights, not data."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def _weights(model: ir.Model):
    """(value, tensor) of every initializer and every tensor-valued Constant node, subgraphs too."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value, value.const_value
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
            continue
        for attr in node.attributes.values():
            if attr.name == "value":
                yield node.outputs[0], attr.as_tensor()
            elif attr.name in ("value_float", "value_floats"):
                yield node.outputs[0], ir.tensor(np.asarray(attr.value, dtype=np.float32))


def _inf_is_a_bound(value: ir.Value) -> bool:
    """True when every reader uses ±Inf as a bound or a fill (``Clip(x, 0, inf)``, masks)."""
    return not value.is_graph_output() and all(
        use.node.op_type in _INF_BOUND_READERS and use.node.domain in DEFAULT_DOMAINS for use in value.uses())


def _non_finite(tensor: ir.TensorProtocol) -> tuple[int, int]:
    """(NaN count, Inf count) of a floating-point tensor; (0, 0) for other types."""
    if not tensor.dtype.is_floating_point():
        return 0, 0
    values = tensor.numpy()
    if values.dtype not in (np.float16, np.float32, np.float64):
        values = values.astype(np.float32)  # bfloat16 / float8 (ml_dtypes) widened for the check
    if np.isfinite(values).all():
        return 0, 0
    return int(np.count_nonzero(np.isnan(values))), int(np.count_nonzero(np.isinf(values)))


def check_finite(model: ir.Model, source: str) -> None:
    """UserError naming the first weight that holds NaN or Inf (and how many others do)."""
    bad = []
    for value, tensor in _weights(model):
        nans, infs = _non_finite(tensor)
        if infs and not nans and _inf_is_a_bound(value):
            continue
        if nans or infs:
            counts = " and ".join(f"{n} {kind}" for n, kind in ((nans, "NaN"), (infs, "Inf")) if n)
            bad.append(f"weight '{value.name}' has {counts} value{'s' if nans + infs > 1 else ''}")
    if bad:
        more = f" ({len(bad) - 1} more weights hold NaN or Inf)" if len(bad) > 1 else ""
        raise UserError(f"{source}: {bad[0]}{more}")


# -- rewrites ---------------------------------------------------------------------------------------

def raise_ir_version(model: ir.Model) -> Action | None:
    """IR 3 and older require every initializer to be a graph input; IR 4 dropped only that rule,
    so raising the version lets weights stop being inputs and keeps the rest as it was."""
    if model.ir_version is None or model.ir_version >= IR_INITIALIZERS_NOT_INPUTS:
        return None
    old, model.ir_version = model.ir_version, IR_INITIALIZERS_NOT_INPUTS
    return Action("ir_version_raised", 1, f"IR version {old} raised to {IR_INITIALIZERS_NOT_INPUTS}",
                  "from IR 4 on, an initializer need not be listed as a graph input")


def drop_initializer_inputs(model: ir.Model) -> Action | None:
    weights = [v.name for v in model.graph.inputs if v.is_initializer()]
    if not ir_common.RemoveInitializersFromInputsPass()(model).modified:
        return None
    shown = ", ".join(weights[:3]) + (", ..." if len(weights) > 3 else "")
    return Action("initializer_inputs_dropped", len(weights),
                  f"{len(weights)} initializers no longer listed as graph inputs ({shown})",
                  "an input with an initializer is a weight with a default, not data to feed")


def lift_constant_weights(model: ir.Model) -> Action | None:
    def constants() -> int:
        return sum(1 for n in ir.traversal.RecursiveGraphIterator(model.graph)
                   if n.op_type == "Constant" and n.domain in DEFAULT_DOMAINS)

    before = constants()
    if not ir_common.LiftConstantsToInitializersPass(size_limit=LIFT_MIN_ELEMENTS)(model).modified:
        return None
    after = constants()
    return Action("constants_lifted", before - after,
                  f"{before - after} Constant nodes became initializers ({after} below "
                  f"{LIFT_MIN_ELEMENTS} elements stay nodes)",
                  "passes read and edit weights as initializers")


def remove_unused_opsets(model: ir.Model) -> Action | None:
    before = dict(model.opset_imports)
    if not ir_common.RemoveUnusedOpsetsPass()(model).modified:
        return None
    removed = sorted(d for d in before if d not in model.opset_imports)
    return Action("unused_opsets_removed", len(removed),
                  "opset imports no node uses removed: "
                  + ", ".join(f"{d or 'ai.onnx'} {before[d]}" for d in removed),
                  "an import that no node names selects no operator")


def list_custom_nodes(model: ir.Model) -> Action | None:
    custom = collections.Counter(f"{n.domain}::{n.op_type}"
                                 for n in ir.traversal.RecursiveGraphIterator(model.graph)
                                 if n.domain not in DEFAULT_DOMAINS)
    if not custom:
        return None
    listed = ", ".join(f"{count} {op}" for op, count in sorted(custom.items()))
    return Action("custom_domain_nodes_kept", sum(custom.values()),
                  f"custom-domain nodes left as they are: {listed}",
                  "only their runtime knows what they compute")


def normalize(model: ir.Model, *, source: str = "model") -> tuple[ir.Model, list[Action]]:
    """Refuse NaN/Inf weights, then apply the rewrites above in place; the actions taken.

    ``source`` names the model in errors (the user's file)."""
    check_finite(model, source)
    actions = [raise_ir_version(model), drop_initializer_inputs(model), lift_constant_weights(model),
               remove_unused_opsets(model), list_custom_nodes(model)]
    return model, [a for a in actions if a is not None]


def upgrade_opset(model: ir.Model, target: int, *, source: str, why: str) -> tuple[ir.Model, Action]:
    """The model converted to ONNX opset ``target`` with onnx's version converter (a new model);
    UserError naming ``source`` and the opsets when the converter cannot do it."""
    opset = default_opset(model)
    try:
        proto = onnx.version_converter.convert_version(ir.to_proto(model), target)
    except Exception as e:  # the converter raises its own (C++) exception types
        reason = _CONVERTER_LOCATION.sub("", one_line(e, 300))  # drop "adapters/x.h:35: operator(): "
        raise UserError(f"{source}: opset {opset} cannot be upgraded to {target} ({why}): "
                        f"{reason[:200]}") from None
    proto.ir_version = max(proto.ir_version, onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid("", target)]))
    return ir.from_proto(proto), Action("opset_upgraded", 1, f"ONNX opset {opset} upgraded to {target}", why)
