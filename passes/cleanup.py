"""Cleanup: constant folding, BatchNorm folding, Identity/Dropout removal, dead code removal.

Every step leaves the model's function unchanged (outputs equal within float rounding).

BatchNorm folding. A ``BatchNormalization`` in inference computes, per channel c,
``y = γ_c · (x − μ_c) / √(σ²_c + ε) + β_c``. When ``x = W ⊛ u + b`` comes from a Conv whose
output nothing else reads, with ``s_c = γ_c / √(σ²_c + ε)``:

    W'[c, ...] = W[c, ...] · s_c
    b'_c       = (b_c − μ_c) · s_c + β_c          (b = 0 when the Conv has no bias)

and ``BN(Conv(u; W, b)) = Conv(u; W', b')`` exactly in real arithmetic. The same holds for
ConvTranspose (scale the output-channel axis 1 of W, per group) and Gemm (scale the output
column of B; ``beta·C`` is folded into the new bias).

Which library does what (and what is written here by hand):

- constant folding: ``onnxscript.optimizer.fold_constants`` (also turns inference-mode
  Dropout into Identity and forwards Identity values), then onnx_ir's
  ``LiftConstantsToInitializersPass`` so folded values and Constant nodes become initializers
  (the BN rule only accepts initializers); a model below IR 4, where every initializer must
  also be a graph input, is raised to IR 4 (``deployopt.core.normalize.raise_ir_version``).
- BN folding: onnxscript's ``FuseBatchNormInto{Conv,ConvTranspose,Gemm}`` rewrite rules. They
  refuse shared Conv outputs, non-initializer parameters and shared weights, but silently: they
  do not say why, they do not look at ``training_mode``, and the fused Conv gets a generated
  name. By hand here: a pre-scan that gives every BatchNormalization a reason when it must stay
  (the rule is wrapped so it cannot fold those), the folded/skipped lists, and keeping the
  Conv's name.
- Identity: onnx_ir's ``IdentityEliminationPass``. Dropout: by hand (no onnx_ir pass does it,
  and onnxscript's ``dropout_inference`` rule only matches the pre-opset-12 attribute form):
  a Dropout that does not drop at inference (no/false ``training_mode`` or ``ratio`` 0) and
  whose mask is unused becomes an Identity, which the identity pass then removes.
- unused nodes/initializers/functions/opsets: onnx_ir's ``RemoveUnused*Pass``.
- duplicate initializers (off by default, because shared weights stop later per-tensor passes
  such as pruning from editing one layer alone): onnx_ir's ``DeduplicateInitializersPass``.

onnxruntime's offline ``ORT_ENABLE_BASIC`` optimizer would do much of this too, but only
through files, with no account of what it changed or skipped, and it may emit ORT-only fusions
at higher levels; the IR passes above keep the model in the standard opset and in memory.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common
from onnxscript import optimizer as onnxscript_optimizer
from onnxscript.rewriter import RewritePass, RewriteRule
# The rule classes live in a private module; the public names are only the ready-made rule
# objects, which cannot take an extra condition. Subclassing lets us veto folds (training mode)
# and record what was folded.
from onnxscript.rewriter.rules.common._fuse_batchnorm import (
    FuseBatchNormIntoConv,
    FuseBatchNormIntoConvTranspose,
    FuseBatchNormIntoGemm,
)

from deployopt.core.normalize import raise_ir_version
from deployopt.core.stats import op_histogram
from deployopt.passes.base import DeployInPlacePass

_DEFAULT_DOMAINS = ("", "ai.onnx")
_FOLD_TARGETS = ("Conv", "ConvTranspose", "Gemm")
_SMALL_CONSTANT = 1024  # elements; ConstantOfShape outputs up to this size are folded


def _fold_small_constant_of_shape(node: ir.Node) -> bool | None:
    """onnxscript never folds ConstantOfShape (to keep big zero tensors out of the file); a
    small one (pads, shapes: exporters without constant folding emit such chains) is folded so
    the computation behind it folds too. None = onnxscript's default rules for everything else."""
    if node.op_type != "ConstantOfShape" or node.domain not in _DEFAULT_DOMAINS:
        return None
    shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
    if shape is None:
        return None
    return True if int(np.prod(shape.numpy())) <= _SMALL_CONSTANT else None


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def _is_const_initializer(value: ir.Value | None) -> bool:
    return (value is not None and value.is_initializer() and value.const_value is not None
            and not value.is_graph_input())


def _not_constant_reason(value: ir.Value) -> str:
    if value.is_graph_input():
        return f"'{value.name}' is a graph input (may change at run time)"
    producer = value.producer()
    if producer is not None:
        return f"'{value.name}' is computed by {_label(producer)}, not a constant initializer"
    return f"'{value.name}' is not a constant initializer"


def _bn_skip_reason(bn: ir.Node) -> str | None:
    """Why this BatchNormalization must not be folded, or None when it may be."""
    training = bn.attributes.get("training_mode")
    if training is not None and training.as_int() != 0:
        return "it runs in training mode (training_mode=1)"
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return "its running-statistics outputs are used (training graph)"
    spatial = bn.attributes.get("spatial")
    if spatial is not None and spatial.as_int() == 0:
        return "spatial=0 (per-element statistics) is not supported"
    x = bn.inputs[0]
    producer = x.producer() if x is not None else None
    if producer is None:
        return f"its input '{x.name if x is not None else ''}' is not produced by a node"
    if producer.op_type not in _FOLD_TARGETS or producer.domain not in _DEFAULT_DOMAINS:
        return f"its input comes from {_label(producer)}, not from Conv/ConvTranspose/Gemm"
    others = [use.node for use in x.uses() if use.node is not bn]
    if others or x.is_graph_output():
        readers = ", ".join(_label(n) for n in others) or "a graph output"
        return f"the output of {_label(producer)} also feeds {readers}"
    for param in bn.inputs[1:5]:
        if param is None or not _is_const_initializer(param):
            return f"its parameter {_not_constant_reason(param)}" if param is not None else \
                "a parameter is missing"
    for weight in producer.inputs[1:3]:
        if weight is None:
            continue
        if not _is_const_initializer(weight):
            return f"{_label(producer)} input {_not_constant_reason(weight)}"
        sharers = [use.node for use in weight.uses() if use.node is not producer]
        if sharers:
            return (f"{_label(producer)} input '{weight.name}' is shared with "
                    f"{', '.join(_label(n) for n in sharers)}")
    return None


class _GuardedFold:
    """Mixin over onnxscript's BN fusion rules: veto listed BNs, keep names, record folds."""

    def __init__(self, vetoed: dict[ir.Node, str], folded: list[dict[str, str]]) -> None:
        super().__init__()
        self._vetoed = vetoed
        self._folded = folded

    def check(self, context, x, inbound_out, batchnorm_out):
        result = super().check(context, x, inbound_out, batchnorm_out)
        if result and batchnorm_out.producer() in self._vetoed:
            return result.fail(self._vetoed[batchnorm_out.producer()])
        return result

    def rewrite(self, op, x, inbound_out, batchnorm_out):
        inbound, bn = inbound_out.producer(), batchnorm_out.producer()
        new_out = super().rewrite(op, x, inbound_out, batchnorm_out)
        new_out.producer().name = inbound.name  # the library names it "node_Conv_<n>"
        self._folded.append({"batchnorm": bn.name, "into": inbound.name, "op": inbound.op_type})
        return new_out


def _guarded_rules(vetoed, folded) -> list[RewriteRule]:
    rules = []
    for base in (FuseBatchNormIntoConv, FuseBatchNormIntoConvTranspose, FuseBatchNormIntoGemm):
        cls = type(f"Guarded{base.__name__}", (_GuardedFold, base), {})
        rule = cls(vetoed, folded)
        # What RewriteRuleClassBase.rule() does, but with our instance (rule() makes its own).
        rules.append(RewriteRule(rule.pattern, rule.rewrite, rule.check, name=rule.name,
                                 remove_nodes=rule.remove_nodes, graph_pre_visitor=rule.setup,
                                 graph_post_visitor=rule.cleanup, as_function=rule.as_function))
    return rules


@dataclasses.dataclass
class CleanupPass(DeployInPlacePass):
    """Fold constants and BatchNorm, drop Identity/Dropout and everything unused."""

    name: ClassVar[str] = "cleanup"

    fold_constants: bool = True
    fold_batchnorm: bool = True
    remove_identity: bool = True  # Identity, and Dropout that does nothing at inference
    remove_unused: bool = True  # dead nodes, unused initializers, functions, opset imports
    dedupe_initializers: bool = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes_before = op_histogram(model)
        inits_before = len(model.graph.initializers)
        modified = False
        if self.fold_constants:
            # onnxscript's default size limits: inputs up to 8192 elements, outputs up to 512².
            modified |= onnxscript_optimizer.fold_constants(
                model, onnx_shape_inference=True,
                should_fold=_fold_small_constant_of_shape).modified
            lifted = ir_common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
            if lifted.modified and (raised := raise_ir_version(model)) is not None:
                self.note(f"{raised.what}: {raised.why}")  # IR 3 requires initializers to be inputs
            modified |= lifted.modified
        if self.remove_identity:
            modified |= self._dropouts_to_identity(model)
            modified |= ir_common.IdentityEliminationPass()(model).modified
        if self.fold_batchnorm:
            modified |= self._fold_batchnorm(model)
        if self.remove_unused:
            for unused_pass in (ir_common.RemoveUnusedNodesPass(),
                                ir_common.RemoveUnusedFunctionsPass(),
                                ir_common.RemoveUnusedOpsetsPass()):
                modified |= unused_pass(model).modified
        if self.dedupe_initializers:
            modified |= ir_common.DeduplicateInitializersPass()(model).modified

        nodes_after = op_histogram(model)
        inits_after = len(model.graph.initializers)
        self._note_changes(nodes_before, nodes_after, inits_before, inits_after)
        self.details.update({
            "nodes_before": nodes_before,
            "nodes_after": nodes_after,
            "node_count_before": sum(nodes_before.values()),
            "node_count_after": sum(nodes_after.values()),
            "initializers_before": inits_before,
            "initializers_after": inits_after,
        })
        return ir.passes.PassResult(model, modified=modified)

    # -- Dropout ----------------------------------------------------------------------------
    def _dropouts_to_identity(self, model: ir.Model) -> bool:
        # By hand: no onnx_ir pass removes Dropout (see the module docstring).
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        changed = False
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.op_type != "Dropout" or node.domain not in _DEFAULT_DOMAINS:
                continue
            mask = node.outputs[1] if len(node.outputs) > 1 else None
            if mask is not None and (mask.uses() or mask.is_graph_output()):
                self.note(f"kept {_label(node)}: its mask output '{mask.name}' is used")
                continue
            if opset < 7:
                is_test = node.attributes.get("is_test")
                if is_test is None or is_test.as_int() == 0:
                    self.note(f"kept {_label(node)}: opset {opset} Dropout without is_test=1")
                    continue
            elif opset >= 12 and len(node.inputs) > 2 and node.inputs[2] is not None:
                reason = self._dropout_active_reason(node)
                if reason:
                    self.note(f"kept {_label(node)}: {reason}")
                    continue
            identity = ir.node("Identity", [node.inputs[0]], name=node.name)
            ir.convenience.replace_nodes_and_values(
                node.graph, node, [node], [identity], [node.outputs[0]], [identity.outputs[0]])
            changed = True
        return changed

    @staticmethod
    def _dropout_active_reason(node: ir.Node) -> str | None:
        """None when this opset>=12 Dropout with a training_mode input is a no-op."""
        mode = node.inputs[2]
        if mode.const_value is None:
            return f"training_mode '{mode.name}' is not a constant"
        if not bool(mode.const_value.numpy()):
            return None
        ratio = node.inputs[1] if len(node.inputs) > 1 else None
        if ratio is not None and ratio.const_value is not None \
                and float(ratio.const_value.numpy()) == 0.0:
            return None
        return "training_mode is true and ratio is not a constant 0"

    # -- BatchNorm --------------------------------------------------------------------------
    def _fold_batchnorm(self, model: ir.Model) -> bool:
        bns = [n for n in ir.traversal.RecursiveGraphIterator(model.graph)
               if n.op_type == "BatchNormalization" and n.domain in _DEFAULT_DOMAINS]
        self.details["batchnorm_folded"] = []
        self.details["batchnorm_skipped"] = []
        if not bns:
            return False
        vetoed = {bn: reason for bn in bns if (reason := _bn_skip_reason(bn)) is not None}
        folded: list[dict[str, str]] = []
        result = RewritePass(_guarded_rules(vetoed, folded))(model)
        left = set(ir.traversal.RecursiveGraphIterator(model.graph))
        skipped = []
        for bn in bns:
            if bn not in left:
                continue
            reason = vetoed.get(bn, "onnxscript's fusion rule declined it")
            skipped.append({"batchnorm": bn.name, "reason": reason})
            self.note(f"kept BatchNormalization '{bn.name}': {reason}")
        if folded:
            targets = collections.Counter(f["op"] for f in folded)
            into = ", ".join(f"{n} {op}" for op, n in sorted(targets.items()))
            self.note(f"folded {len(folded)} BatchNormalization into {into}")
        self.details["batchnorm_folded"] = folded
        self.details["batchnorm_skipped"] = skipped
        return result.modified

    # -- notes ------------------------------------------------------------------------------
    def _note_changes(self, before: dict[str, int], after: dict[str, int],
                      inits_before: int, inits_after: int) -> None:
        removed = {op: n - after.get(op, 0) for op, n in before.items() if n > after.get(op, 0)}
        added = {op: n - before.get(op, 0) for op, n in after.items() if n > before.get(op, 0)}
        if removed:
            self.note("removed nodes: " + ", ".join(f"{n} {op}" for op, n in removed.items()))
        if added:
            self.note("added nodes: " + ", ".join(f"{n} {op}" for op, n in added.items()))
        self.note(f"nodes {sum(before.values())} -> {sum(after.values())}, "
                  f"initializers {inits_before} -> {inits_after}")
