"""Unstructured magnitude pruning of Conv/Gemm/MatMul weights, with least-squares reconstruction.

Pruning. A weight tensor ``W`` with ``n`` elements at target sparsity ``s`` loses its
``k = ⌊s·n + ½⌋`` smallest-|w| entries (set to 0; ties broken by position), so the achieved
sparsity is exactly ``k/n`` (more only when ``W`` already held more zeros). ``scope: layer``
applies ``s`` to every eligible tensor; ``scope: global`` pools the eligible tensors and zeroes the
``⌊s·N + ½⌋`` smallest |w| of the pool: one threshold for the whole model, so layers with small
weights lose more. ``overrides: {pattern: s'}`` (glob or regex, matched against the node name and
the weight name; the first matching pattern wins) gives the matching layers their own per-layer
sparsity; an override also beats ``skip_first_last`` and ``min_elements``. Biases are never
pruned. Weights may be initializers or ``Constant`` nodes; a weight that is a graph input, is
shared by several uses, or is computed at run time is skipped and the skip is noted.

Reconstruction (``reconstruct: true``). Each pruned layer is a linear map ``y = W x + b`` on rows
``x`` (Gemm/MatMul: the rows of its input; Conv: im2col patches, one problem per group, up to
``_MAX_POSITIONS`` output positions per sample drawn with the context's seed). With ``X`` the
layer's inputs in the *pruned* model and ``Y`` the *dense* layer's outputs on the same calibration
samples, each output channel ``o`` re-solves its kept (unmasked) weights and its bias:

    [w_o,K ; b_o] = (X̃_Kᵀ X̃_K + λ D)⁻¹ (X̃_Kᵀ y_o + λ D [w⁰_o,K ; 0]),
    X̃_K = [X[:, K_o], 1],   λ = ridge · mean diag(XᵀX)

(``D``: identity on the weights, 0 on the bias; see ``passes/_lstsq.py``). The ridge term pulls
toward the magnitude-pruned weights ``w⁰`` rather than toward zero (with ``w⁰ = 0`` this is plain
ridge, ``(X_KᵀX_K + λI)⁻¹ X_Kᵀ y``): directions the calibration data does not excite, such as
the weights of a unit that is never active on it, keep their values instead of being zeroed,
and a large ``ridge`` degrades gracefully to plain magnitude pruning (measured on the digits CNN
at 70% sparsity, ridge 1.0: 0.95 top-1 toward w⁰ vs 0.46 toward zero). The Gram matrices are
accumulated over streamed batches, so memory is flat in the number of samples. Layers are
corrected in graph order and each one's inputs come from the model whose earlier layers are
already pruned and reconstructed (sequential correction): a layer then also absorbs the error
that reached its inputs from upstream, rather than matching the dense layer on inputs the pruned
model never produces. Layers that do not depend on each other share one pass over the data.
An output channel keeps its plain pruned weights when the solve would not lower its squared
error on the calibration rows (in exact arithmetic it cannot: the solution minimizes
``E(w) + λ‖w − w⁰‖²``, so ``E(w) ≤ E(w⁰)``; the check guards against ill-conditioned solves).

Honesty about the result. onnxruntime's Conv/Gemm/MatMul CPU kernels are dense, so zeros do not
make the model faster; only the compressed file shrinks. ``context.details`` carries the per-layer
sparsity, the raw and zipped model bytes before and after, and COO sparse storage is mentioned
only for tensors where it would be smaller than dense storage (it is not written: onnxruntime
densifies sparse initializers at load time, so it would not save memory either).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import re
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from tqdm import tqdm

try:  # caps numpy's BLAS threads; installed with scikit-learn, optional here
    from threadpoolctl import threadpool_limits
except ImportError:  # BLAS then uses as many threads as it likes
    threadpool_limits = None

from deployopt.core.errors import UserError, WorkFailed
from deployopt.core.stats import model_stats
from deployopt.passes._lstsq import GramAccumulator, conv_output_size, conv_pads, conv_patches
from deployopt.passes.base import DeployInPlacePass, check_choice, check_range

OP_TYPES = ("Conv", "Gemm", "MatMul")
#: Conv output positions kept per sample when building Gram matrices (a random subset, fixed
#: seed, when the output grid is larger): enough rows for a well-posed fit, bounded cost.
_MAX_POSITIONS = 256
_BATCH = 64  # calibration samples per onnxruntime run when the model's batch is dynamic
_COO_INDEX_BYTES = 8  # ONNX SparseTensorProto indices are int64

SPEED_NOTE = ("onnxruntime's CPU kernels for Conv/Gemm/MatMul are dense: zeroed weights are "
              "multiplied like any others, so the pruned model runs no faster than the dense one "
              "and its raw file is as large; only the compressed (zipped) size shrinks. "
              "Use channel_prune for speed.")


@dataclasses.dataclass(eq=False)
class _Layer:
    """One Conv/Gemm/MatMul node whose operand 1 may be a weight."""

    node: ir.Node
    name: str
    weight: ir.Value
    constant: ir.Node | None = None  # the Constant node holding the weight (None: initializer)
    reason: str | None = None  # why it is not pruned
    target: float = 0.0
    override: bool = False  # the target comes from an override pattern
    kept: np.ndarray | None = None  # bool mask of nonzero weights after pruning

    @property
    def op_type(self) -> str:
        return self.node.op_type

    def array(self) -> np.ndarray:
        # A copy: the tensor object may be shared with clones of the model (the dense copy).
        return np.array(_tensor(self.weight, self.constant).numpy(), copy=True)

    def store(self, values: np.ndarray) -> None:
        _store(self.weight, self.constant, values)


def _tensor(value: ir.Value, constant: ir.Node | None) -> ir.TensorProtocol:
    """The tensor of an initializer (``constant`` None) or of a Constant node."""
    return value.const_value if constant is None else constant.attributes["value"].as_tensor()


def _store(value: ir.Value, constant: ir.Node | None, values: np.ndarray) -> None:
    """Replace a constant's tensor (initializer or Constant node) with ``values``, same dtype."""
    old = _tensor(value, constant)
    tensor = ir.tensor(np.asarray(values).astype(old.numpy().dtype, copy=False), name=old.name)
    if constant is None:
        value.const_value = tensor
    else:
        constant.attributes["value"] = ir.AttrTensor("value", tensor)
        if value.const_value is not None:
            value.const_value = tensor


def _constant_source(value: ir.Value) -> tuple[ir.Node | None, str | None]:
    """(Constant node or None for an initializer, reason it cannot be rewritten or None)."""
    if value.is_graph_input():
        return None, "is a graph input (its value can be replaced at run time)"
    producer = value.producer()
    constant = None
    if producer is not None:
        if producer.op_type != "Constant" or producer.domain not in ("", "ai.onnx") \
                or "value" not in producer.attributes:
            return None, f"is computed at run time (by a {producer.op_type} node)"
        constant = producer
    elif value.const_value is None:
        return None, "has no constant value"
    uses = len(value.uses())
    if uses > 1:
        return constant, f"is shared by {uses} uses (changing it would change the other layers)"
    if value.is_graph_output():
        return constant, "is a graph output"
    tensor = _tensor(value, constant)
    if not tensor.dtype.is_floating_point():
        return constant, f"has dtype {tensor.dtype.name} (only floating-point weights are pruned)"
    return constant, None


def _is_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return value.const_value is not None or (producer is not None
                                             and producer.op_type == "Constant")


def _find_layers(graph: ir.Graph, op_types) -> tuple[list[_Layer], list[dict]]:
    """Weight layers in graph order, and operands that are not weights at all (for the notes).

    A layer whose weight cannot be rewritten (graph input, shared, not floating point) is still
    a weight layer (it counts for ``skip_first_last``) and carries the reason.
    """
    layers, not_weights = [], []
    for index, node in enumerate(graph):
        if node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            continue
        weight = node.inputs[1]
        name = node.name or weight.name or f"{node.op_type}_{index}"
        constant, reason = _constant_source(weight)
        if reason is not None and reason.startswith(("is computed", "has no constant")):
            why = ("its constant is the left operand (only x @ W is pruned)"
                   if node.op_type == "MatMul" and _is_constant(node.inputs[0])
                   else f"operand 1 '{weight.name}' {reason}")
            not_weights.append({"name": name, "op_type": node.op_type, "reason": why})
            continue
        if reason is not None:
            reason = f"weight '{weight.name}' {reason}"
        layers.append(_Layer(node, name, weight, constant, reason))
    return layers, not_weights


def _matches(pattern: str, name: str) -> bool:
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:  # not a valid regex: a glob only
        return False


def _model_sizes(model: ir.Model) -> dict[str, int]:
    """Raw and zipped bytes, parameters and nonzero parameters (``deployopt.core.stats``)."""
    stats = model_stats(model)
    return {key: int(stats[key]) for key in ("bytes", "bytes_zip", "params", "nonzero_params")}


@dataclasses.dataclass
class MagnitudePrunePass(DeployInPlacePass):
    """Zero the smallest-|w| fraction of Conv/Gemm/MatMul weights; optionally re-fit the rest."""

    name: ClassVar[str] = "prune"

    sparsity: float = 0.5
    scope: str = "layer"  # "layer" | "global"
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    skip_first_last: bool = True
    min_elements: int = 256
    op_types: list[str] = dataclasses.field(default_factory=lambda: list(OP_TYPES))
    reconstruct: bool = False
    ridge: float = 0.01
    samples: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        # The pipeline checks this before any work; it depends on a field, so it is set per
        # instance (the class attribute stays False).
        self.needs_calibration = bool(self.reconstruct)

    def validate(self) -> None:
        check_range("sparsity", self.sparsity, 0, 1, high_open=True)
        check_choice("scope", self.scope, ("layer", "global"))
        if not isinstance(self.overrides, dict):
            raise UserError(f"overrides: expected a mapping {{name pattern: sparsity}}, "
                            f"got {self.overrides!r}")
        for pattern, value in self.overrides.items():
            if not isinstance(pattern, str) or not pattern:
                raise UserError(f"overrides: pattern {pattern!r} is not a non-empty string")
            check_range(f"overrides[{pattern!r}]", value, 0, 1, high_open=True)
        for field in ("skip_first_last", "reconstruct"):
            if not isinstance(getattr(self, field), bool):
                raise UserError(f"{field}: expected true or false, got {getattr(self, field)!r}")
        for field, low in (("min_elements", 0), ("samples", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{field}: expected an integer >= {low}, got {value!r}")
        if isinstance(self.op_types, str) or not isinstance(self.op_types, (list, tuple)) \
                or not self.op_types:
            raise UserError(f"op_types: expected a non-empty list of {', '.join(OP_TYPES)}, "
                            f"got {self.op_types!r}")
        for op in self.op_types:
            check_choice("op_types", op, OP_TYPES)
        check_range("ridge", self.ridge, 0)

    # -- the pass ---------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.reconstruct and self.context.calibration is None:
            raise UserError("data.calibration: prune with reconstruct: true needs calibration "
                            "data, and the recipe sets none")
        layers, not_weights = _find_layers(model.graph, self.op_types)
        skipped = list(not_weights)
        self._assign_targets(layers)
        for layer in layers:
            if layer.reason is not None:
                skipped.append({"name": layer.name, "op_type": layer.op_type,
                                "reason": layer.reason})
                self.note(f"{layer.name} ({layer.op_type}): not pruned, {layer.reason}")
        for entry in not_weights:
            self.note(f"{entry['name']} ({entry['op_type']}): not pruned, {entry['reason']}")
        self.context.details["skipped"] = skipped
        prunable = [layer for layer in layers if layer.reason is None]
        if not prunable:
            self.context.details["layers"] = []
            ops = "/".join(self.op_types)
            self.note(f"nothing to prune: the model has no {ops} weight this pass may change; "
                      "the model is unchanged" if not layers else
                      f"nothing to prune: all {len(layers)} {ops} weight layers are skipped "
                      "(reasons above); the model is unchanged")
            return ir.passes.PassResult(model, modified=False)

        before = _model_sizes(model)
        # Checks the calibration data against the model before any weight changes.
        reconstructor = _Reconstructor(self, model.clone(), model) if self.reconstruct else None
        self._prune(prunable)
        errors: dict[str, tuple[float, float]] = {}
        samples = 0
        if reconstructor is not None:
            # The solves are many mid-sized LAPACK calls: on a busy machine a BLAS thread pool
            # wider than the pass's thread budget spins for cores others hold (measured 8x
            # slower at load 8 on 2 cores), so BLAS gets ``context.threads`` like onnxruntime.
            limit = (threadpool_limits(limits=self.context.threads, user_api="blas")
                     if threadpool_limits is not None else contextlib.nullcontext())
            with limit:
                errors, samples = reconstructor.run(prunable)
        after = _model_sizes(model)
        self._report(prunable, errors, samples, before, after)
        return ir.passes.PassResult(model, modified=True)

    def _assign_targets(self, layers: list[_Layer]) -> None:
        for pattern in self.overrides:
            if not any(_matches(pattern, layer.name) or _matches(pattern, layer.weight.name or "")
                       for layer in layers):
                names = ", ".join(layer.name for layer in layers[:8]) or "none"
                raise UserError(f"overrides: pattern {pattern!r} matches no "
                                f"{'/'.join(self.op_types)} layer (layers: {names}"
                                f"{', ...' if len(layers) > 8 else ''})")
        for position, layer in enumerate(layers):
            override = next((value for pattern, value in self.overrides.items()
                             if _matches(pattern, layer.name)
                             or _matches(pattern, layer.weight.name or "")), None)
            if layer.reason is not None:
                continue
            layer.override = override is not None
            if override is not None:
                layer.target = float(override)
            elif self.skip_first_last and position in (0, len(layers) - 1):
                layer.reason = (f"it is the {'first' if position == 0 else 'last'} weight layer "
                                "(skip_first_last)")
            elif _tensor(layer.weight, layer.constant).size < self.min_elements:
                layer.reason = (f"its {_tensor(layer.weight, layer.constant).size} weights are "
                                f"fewer than min_elements={self.min_elements}")
            else:
                layer.target = float(self.sparsity)
            if layer.reason is None and layer.target == 0:
                layer.reason = "its sparsity is 0"

    def _prune(self, layers: list[_Layer]) -> None:
        pooled = [layer for layer in layers if self.scope == "global" and not layer.override]
        arrays = {id(layer): layer.array() for layer in layers}
        masks: dict[int, np.ndarray] = {}
        for layer in layers:
            if layer in pooled:
                continue
            magnitude = np.abs(arrays[id(layer)].astype(np.float64)).ravel()
            masks[id(layer)] = _smallest(magnitude, int(layer.target * magnitude.size + 0.5))
        if pooled:
            magnitudes = [np.abs(arrays[id(layer)].astype(np.float64)).ravel() for layer in pooled]
            pool = np.concatenate(magnitudes)
            zero = _smallest(pool, int(self.sparsity * pool.size + 0.5))
            offsets = np.cumsum([0] + [m.size for m in magnitudes])
            for layer, start, stop in zip(pooled, offsets[:-1], offsets[1:]):
                masks[id(layer)] = zero[start:stop]
        for layer in layers:
            values = arrays[id(layer)]
            values.reshape(-1)[masks[id(layer)]] = 0
            layer.kept = values != 0
            layer.store(values)

    def _report(self, layers, errors, samples, before, after) -> None:
        rows, total, zeros = [], 0, 0
        sparse_dense_bytes = sparse_coo_bytes = 0
        sparse_layers = []
        for layer in layers:
            n = int(layer.kept.size)
            nnz = int(layer.kept.sum())
            row: dict[str, Any] = {"name": layer.name, "op_type": layer.op_type,
                                   "weight": layer.weight.name, "elements": n,
                                   "sparsity": (n - nnz) / n, "target": layer.target}
            if layer.name in errors:
                row["output_error_pruned"], row["output_error_reconstructed"] = errors[layer.name]
            rows.append(row)
            total, zeros = total + n, zeros + n - nnz
            itemsize = int(_tensor(layer.weight, layer.constant).dtype.itemsize)
            if nnz * (itemsize + _COO_INDEX_BYTES) < n * itemsize:
                sparse_layers.append(layer.name)
                sparse_dense_bytes += n * itemsize
                sparse_coo_bytes += nnz * (itemsize + _COO_INDEX_BYTES)
        details = self.context.details
        details["layers"] = rows
        details["sparsity"] = zeros / total
        details["pruned_elements"] = zeros
        details["total_elements"] = total
        details["size"] = {"before": before, "after": after}
        details["speed"] = SPEED_NOTE
        details["sparse_storage"] = None
        self.note(f"pruned {len(rows)} layers ({self.scope} scope) to {zeros / total:.1%} overall: "
                  + ", ".join(f"{r['name']} ({r['op_type']}, {r['elements']}) {r['sparsity']:.1%}"
                              for r in rows))
        if errors:
            details["reconstruction"] = {"layers": len(errors), "samples": samples,
                                         "ridge": self.ridge, "inputs": "pruned model",
                                         "targets": "dense model"}
            self.note(f"reconstructed {len(errors)} layers by ridge least squares "
                      f"(ridge={self.ridge}) on {samples} calibration samples, inputs from the "
                      "pruned model, targets from the dense model; relative output error on the "
                      "calibration data, pruned -> re-solved: "
                      + ", ".join(f"{name} {a:.4f} -> {b:.4f}" for name, (a, b) in errors.items()))
        self.note(f"size: raw {before['bytes']} -> {after['bytes']} bytes, zipped "
                  f"{before['bytes_zip']} -> {after['bytes_zip']} bytes; nonzero parameters "
                  f"{before['nonzero_params']} -> {after['nonzero_params']}")
        self.note(SPEED_NOTE)
        if sparse_layers:
            details["sparse_storage"] = {"format": "COO (values + int64 indices)",
                                         "layers": sparse_layers, "dense_bytes": sparse_dense_bytes,
                                         "coo_bytes": sparse_coo_bytes}
            self.note(f"COO sparse storage would hold the weights of {len(sparse_layers)} layer(s) "
                      f"in {sparse_coo_bytes} instead of {sparse_dense_bytes} bytes; this pass "
                      "keeps dense initializers (onnxruntime densifies sparse ones at load), so "
                      "the zipped size is the saving")
        else:
            self.note("the zeros are stored densely: the raw size is unchanged and the zipped "
                      "size is the saving")
        if any(r["sparsity"] == 1.0 for r in rows):
            self.note("layers left with no weight at all: "
                      + ", ".join(r["name"] for r in rows if r["sparsity"] == 1.0)
                      + " (give them an override)")


def _smallest(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the ``k`` smallest entries (exactly ``k``, ties broken by position)."""
    mask = np.zeros(magnitude.size, dtype=bool)
    mask[np.argsort(magnitude, kind="stable")[:max(k, 0)]] = True
    return mask


# -- reconstruction -------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class _Problem:
    """A pruned layer as y = W x + b: how to read rows and write the solution back."""

    layer: _Layer
    weights: list[np.ndarray]  # per group: effective W [m, k] (pruned)
    kept: list[np.ndarray]  # per group: bool [m, k]
    bias: np.ndarray | None  # effective bias [O] (None: no bias)
    fit_bias: bool  # True: re-solve the bias too; False: it stays, targets exclude it
    accumulators: list[GramAccumulator] = dataclasses.field(default_factory=list)
    conv: dict[str, Any] | None = None  # Conv geometry


class _Reconstructor:
    """Streams calibration data through the dense and the pruned model and re-fits each layer."""

    def __init__(self, owner: MagnitudePrunePass, dense: ir.Model, model: ir.Model):
        self.owner = owner
        self.context = owner.context
        self.dense = dense
        self.model = model
        self.rng = np.random.default_rng(self.context.seed)
        inputs = [v for v in model.graph.inputs if not v.is_initializer()]
        if len(inputs) != 1:
            raise UserError(f"data.calibration: reconstruction feeds one model input, the model "
                            f"has {len(inputs)} ({', '.join(v.name for v in inputs)})")
        self.input = inputs[0]
        dataset = self.context.calibration
        dims = list(self.input.shape.dims) if self.input.shape is not None else None
        if dims is not None and (len(dims) != 1 + len(dataset.sample_shape) or any(
                isinstance(d, int) and d != s for d, s in zip(dims[1:], dataset.sample_shape))):
            raise UserError(f"data.calibration: samples of shape {list(dataset.sample_shape)} do "
                            f"not fit model input '{self.input.name}' of shape "
                            f"{[d if isinstance(d, int) else str(d) for d in dims]}")
        self.static_batch = dims[0] if dims and isinstance(dims[0], int) else None
        self.batch = self.static_batch or _BATCH
        self.dtype = self.input.dtype.numpy() if self.input.dtype is not None else np.float32

    def run(self, layers: list[_Layer]) -> tuple[dict[str, tuple[float, float]], int]:
        """Re-fit the layers; ({layer: (relative error pruned, re-solved)}, samples used)."""
        problems = []
        for layer in layers:
            problem = self._problem(layer)
            if isinstance(problem, str):
                self.owner.note(f"{layer.name}: pruned but not reconstructed, {problem}")
            else:
                problems.append(problem)
        errors = {}
        samples = 0
        for group in tqdm(self._independent_groups(problems), desc="prune: reconstruct",
                          unit="group", disable=None):
            samples = self._accumulate(group)
            for problem in group:
                errors[problem.layer.name] = self._solve(problem)
        return errors, samples

    # -- layer views ------------------------------------------------------------------------------
    def _problem(self, layer: _Layer) -> _Problem | str:
        node = layer.node
        if _is_constant(node.inputs[0]):
            return "its input is a constant"
        weight = layer.array()
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias, fit_bias = None, False
        if bias_value is not None:
            constant, reason = _constant_source(bias_value)
            if reason is not None and not reason.startswith("is shared"):
                return f"its bias '{bias_value.name}' {reason}"
            bias = _tensor(bias_value, constant).numpy().astype(np.float64)
            fit_bias = reason is None
            if reason is not None:
                self.owner.note(f"{layer.name}: bias '{bias_value.name}' {reason}; reconstruction "
                                "keeps it and re-solves the weights only")
        if node.op_type == "Conv":
            if weight.ndim != 4:
                return "only 2-D convolutions are reconstructed"
            group = node.attributes.get_int("group", 1)
            out_channels = weight.shape[0]
            per = out_channels // group
            mats = [weight[g * per:(g + 1) * per].reshape(per, -1).astype(np.float64)
                    for g in range(group)]
            masks = [layer.kept[g * per:(g + 1) * per].reshape(per, -1) for g in range(group)]
            conv = {"group": group, "kernel": weight.shape[2:],
                    "strides": tuple(node.attributes.get_ints("strides", (1, 1))),
                    "dilations": tuple(node.attributes.get_ints("dilations", (1, 1))),
                    "pads": tuple(node.attributes.get_ints("pads", (0, 0, 0, 0))),
                    "auto_pad": node.attributes.get_string("auto_pad", "NOTSET")}
            return _Problem(layer, mats, masks, bias, fit_bias, conv=conv)
        if weight.ndim != 2:
            return f"its weight has {weight.ndim} dimensions (2 are reconstructed)"
        if node.op_type == "MatMul":
            return _Problem(layer, [weight.T.astype(np.float64)], [layer.kept.T], None, False)
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        if alpha == 0:
            return "its alpha is 0"
        trans_b = node.attributes.get_int("transB", 0)
        mat = (weight if trans_b else weight.T).astype(np.float64) * alpha
        mask = layer.kept if trans_b else layer.kept.T
        if bias is not None:
            bias = bias * beta
            if beta == 0:
                bias, fit_bias = None, False
            elif bias.size != mat.shape[0] or bias.ndim > 2 \
                    or (bias.ndim == 2 and bias.shape[0] != 1):
                fit_bias = False  # a broadcast C ([M, N] or scalar) stays as it is
        return _Problem(layer, [mat], [mask], bias, fit_bias)

    # -- activations ------------------------------------------------------------------------------
    def _independent_groups(self, problems: list[_Problem]) -> list[list[_Problem]]:
        """Consecutive layers none of which feeds another (they can share one data pass)."""
        groups: list[list[_Problem]] = []
        for problem in problems:
            upstream = _upstream_nodes(problem.layer.node)
            if groups and not any(p.layer.node in upstream for p in groups[-1]):
                groups[-1].append(problem)
            else:
                groups.append([problem])
        return groups

    def _session(self, model: ir.Model, names: list[str]):
        """An onnxruntime session on a copy of ``model`` whose outputs are the named tensors."""
        import onnxruntime as ort

        copy = model.clone()
        values = {v.name: v for node in copy.graph for v in node.outputs}
        outputs = []
        for name in names:
            value = values[name]
            if value.type is None:  # untyped (no shape inference): activations share the input's
                value.type = ir.TensorType(self.input.dtype or ir.DataType.FLOAT)
            outputs.append(value)
        copy.graph.outputs.clear()
        copy.graph.outputs.extend(outputs)
        RemoveUnusedNodesPass()(copy)  # compute only what the requested tensors need
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.context.threads
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(ir.to_proto(copy).SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise WorkFailed(f"prune: onnxruntime cannot run the model for reconstruction: "
                             f"{' '.join(str(e).split())[:300]}") from e

    def _batches(self):
        """Calibration inputs, at most ``samples`` of them, in the model's batch size."""
        remaining = self.owner.samples
        for x, _ in self.context.calibration.batches(self.batch):
            if remaining <= 0:
                break
            x = np.asarray(x[:remaining], dtype=self.dtype)
            if self.static_batch is not None and len(x) != self.static_batch:
                break  # a static-batch model cannot take the short tail
            remaining -= len(x)
            yield x

    def _accumulate(self, group: list[_Problem]) -> int:
        """One pass over the calibration data filling the Gram matrices of ``group``."""
        input_name = self.input.name
        x_names = list(dict.fromkeys(p.layer.node.inputs[0].name for p in group))
        run_names = [n for n in x_names if n != input_name]
        y_names = list(dict.fromkeys(p.layer.node.outputs[0].name for p in group))
        pruned = self._session(self.model, run_names) if run_names else None
        dense = self._session(self.dense, y_names)
        samples = 0
        for x in self._batches():
            try:
                found = dict(zip(run_names, pruned.run(run_names, {input_name: x}))) if pruned \
                    else {}
                found[input_name] = x
                targets = dict(zip(y_names, dense.run(y_names, {input_name: x})))
            except Exception as e:  # onnxruntime raises its own exception types
                raise WorkFailed(f"prune: onnxruntime failed on calibration data: "
                                 f"{' '.join(str(e).split())[:300]}") from e
            for problem in group:
                self._add_rows(problem, found[problem.layer.node.inputs[0].name],
                               targets[problem.layer.node.outputs[0].name])
            samples += len(x)
        if samples == 0:
            raise UserError("data.calibration: no samples to reconstruct with (the dataset is "
                            f"empty or smaller than the model's static batch of {self.batch})")
        return samples

    def _add_rows(self, problem: _Problem, x: np.ndarray, y: np.ndarray) -> None:
        layer = problem.layer
        if problem.conv is None:
            node = layer.node
            if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
                x = x.T
            rows_x = x.reshape(-1, x.shape[-1])
            rows_y = y.reshape(-1, y.shape[-1]).astype(np.float64)
            groups_x, out_slices = [rows_x], [slice(None)]
        else:
            conv = problem.conv
            kernel, strides, dilations = conv["kernel"], conv["strides"], conv["dilations"]
            pads = conv_pads(conv["auto_pad"], conv["pads"], x.shape[2:], kernel, strides,
                             dilations)
            oh, ow = conv_output_size(x.shape[2:], kernel, strides, pads, dilations)
            if y.shape[2:] != (oh, ow):
                raise WorkFailed(f"prune: {layer.name}: im2col grid {oh}x{ow} does not match the "
                                 f"Conv output {y.shape[2]}x{y.shape[3]}")
            positions = None
            if oh * ow > _MAX_POSITIONS:
                positions = np.sort(self.rng.choice(oh * ow, _MAX_POSITIONS, replace=False))
            groups_x = conv_patches(x, kernel, strides=strides, pads=pads, dilations=dilations,
                                    group=conv["group"], positions=positions)
            y = y.reshape(y.shape[0], y.shape[1], -1)
            if positions is not None:
                y = y[:, :, positions]
            rows_y = y.transpose(0, 2, 1).reshape(-1, y.shape[1]).astype(np.float64)
            per = rows_y.shape[1] // conv["group"]
            out_slices = [slice(g * per, (g + 1) * per) for g in range(conv["group"])]
        if problem.bias is not None and not problem.fit_bias:  # a kept bias: fit y - b
            if problem.conv is not None or problem.bias.size == rows_y.shape[1]:
                rows_y = rows_y - problem.bias.reshape(-1)
            else:  # Gemm's C broadcast over the batch ([M, N] or a scalar)
                rows_y = rows_y - np.broadcast_to(problem.bias, y.shape).reshape(rows_y.shape)
        if not problem.accumulators:
            problem.accumulators = [
                GramAccumulator(w.shape[1], w.shape[0], intercept=problem.fit_bias)
                for w in problem.weights]
        for accumulator, rows, out in zip(problem.accumulators, groups_x, out_slices):
            accumulator.add(rows, rows_y[:, out])

    def _solve(self, problem: _Problem) -> tuple[float, float]:
        """Re-solve every output channel; write the weights (and bias) back; relative errors."""
        layer = problem.layer
        solved_mats, solved_bias = [], []
        error_before = error_after = energy = 0.0
        for g, accumulator in enumerate(problem.accumulators):
            pruned = problem.weights[g]
            out = slice(g * pruned.shape[0], (g + 1) * pruned.shape[0])
            old_bias = problem.bias.reshape(-1)[out] if problem.fit_bias else None
            # The ridge pulls toward the pruned weights, not toward zero: a weight whose input
            # the calibration data never excites (a dead ReLU, say) keeps its value.
            weights, bias = accumulator.solve(self.owner.ridge, problem.kept[g], prior=pruned)
            before = accumulator.squared_error(pruned, old_bias)
            after = accumulator.squared_error(weights, bias)
            worse = after > before  # an ill-conditioned solve: keep the plain pruned weights
            weights[worse] = pruned[worse]
            if bias is not None:
                bias[worse] = old_bias[worse]
            solved_mats.append(weights)
            solved_bias.append(bias)
            error_before += float(before.sum())
            error_after += float(np.minimum(before, after).sum())
            energy += float(accumulator.target_energy.sum())
        self._write_back(problem, solved_mats, solved_bias)
        energy = max(energy, np.finfo(np.float64).tiny)
        return error_before / energy, error_after / energy

    def _write_back(self, problem: _Problem, mats: list[np.ndarray], biases: list) -> None:
        layer, node = problem.layer, problem.layer.node
        shape = _tensor(layer.weight, layer.constant).shape.numpy()
        if node.op_type == "Conv":
            weight = np.concatenate(mats, axis=0).reshape(shape)
        elif node.op_type == "MatMul":
            weight = mats[0].T
        else:
            mat = mats[0] / node.attributes.get_float("alpha", 1.0)
            weight = mat if node.attributes.get_int("transB", 0) else mat.T
        weight = np.where(layer.kept, weight, 0.0)  # the pruned entries stay exactly zero
        layer.store(weight)
        layer.kept = weight != 0
        if problem.fit_bias:
            bias = np.concatenate(biases)
            if node.op_type == "Gemm":
                bias = bias / node.attributes.get_float("beta", 1.0)
            bias_value = node.inputs[2]
            constant, _ = _constant_source(bias_value)
            _store(bias_value, constant, bias.reshape(_tensor(bias_value, constant).shape.numpy()))


def _upstream_nodes(node: ir.Node) -> set[ir.Node]:
    """Every node whose output reaches ``node``'s inputs."""
    seen: set[ir.Node] = set()
    stack = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(v.producer() for v in current.inputs
                     if v is not None and v.producer() is not None)
    return seen
