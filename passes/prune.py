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

Reconstruction (``reconstruct: true``, ``passes.reconstruct`` does the least squares). Each
pruned layer is a linear map ``y = W x + b`` on rows ``x`` (Gemm/MatMul: the rows of its input;
Conv: im2col patches, one problem per group, up to ``_SAMPLING.positions`` output positions per
batch drawn with the context's seed). With ``X`` the layer's inputs in the *pruned* model and ``Y``
the *dense* layer's outputs on the same calibration samples, each output channel ``o`` re-solves
its kept (unmasked) weights ``K_o`` and its bias:

    [w_o,K ; b_o] = (X̃_Kᵀ X̃_K + λ D)⁻¹ (X̃_Kᵀ y_o + λ D [w⁰_o,K ; 0]),
    X̃_K = [X[:, K_o], 1],   λ = ridge · mean diag(XᵀX)

(``D``: identity on the weights, 0 on the bias). The ridge term pulls toward the
magnitude-pruned weights ``w⁰`` rather than toward zero: directions the calibration data does not
excite, such as the weights of a unit that is never active on it, keep their values instead of
being zeroed, and a large ``ridge`` degrades gracefully to plain magnitude pruning. Layers are
corrected level by level in graph order, each on inputs from the model whose upstream layers are
already pruned and reconstructed. An output channel keeps its plain pruned weights when the solve
would not lower its squared error on the calibration rows (in exact arithmetic it cannot: the
solution minimizes ``E(w) + λ‖w − w⁰‖²``, so ``E(w) ≤ E(w⁰)``; the check guards against
ill-conditioned solves).

Honesty about the result. onnxruntime's Conv/Gemm/MatMul CPU kernels are dense, so zeros do not
make the model faster; only the compressed file shrinks. The step's details carry the per-layer
sparsity, the raw and zipped model bytes before and after, and COO sparse storage is mentioned
only for tensors where it would be smaller than dense storage (it is not written: onnxruntime
densifies sparse initializers at load time, so it would not save memory either).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import re
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

try:  # caps numpy's BLAS threads; installed with scikit-learn, optional here
    from threadpoolctl import threadpool_limits
except ImportError:  # BLAS then uses as many threads as it likes
    threadpool_limits = None

from deployopt.core.data import Dataset
from deployopt.core.errors import UserError
from deployopt.core.settings import setting
from deployopt.core.stats import model_stats
from deployopt.passes import reconstruct as recon
from deployopt.passes.base import DeployInPlacePass

OP_TYPES = ("Conv", "Gemm", "MatMul")
#: Conv output positions per batch entering the Gram matrices (a random subset, drawn once per
#: batch for all its samples, when the output grid is larger): enough rows for a well-posed fit,
#: bounded cost. The targets are streamed, so many positions cost no memory.
_SAMPLING = recon.Sampling(positions=256, per_sample=False)
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

    sparsity: float = setting(0.5, low=0, high=1, high_open=True)
    scope: Literal["layer", "global"] = "layer"
    # {name pattern: sparsity}, for the matching layers instead of ``sparsity``
    overrides: dict[str, float] = setting(default_factory=dict, low=0, high=1, high_open=True)
    skip_first_last: bool = True
    min_elements: int = setting(256, low=0)
    op_types: list[str] = setting(default_factory=lambda: list(OP_TYPES), choices=OP_TYPES, min_len=1)
    reconstruct: bool = False
    ridge: float = setting(0.01, low=0)
    samples: int = setting(512, low=1)

    @property
    def needs_calibration(self) -> bool:
        """Reconstruction fits on calibration data; plain pruning needs none."""
        return self.reconstruct

    def validate(self) -> None:
        if "" in self.overrides:
            raise UserError("overrides: pattern '' is not a non-empty string")

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
        self.details["skipped"] = skipped
        prunable = [layer for layer in layers if layer.reason is None]
        if not prunable:
            self.details["layers"] = []
            ops = "/".join(self.op_types)
            self.note(f"nothing to prune: the model has no {ops} weight this pass may change; "
                      "the model is unchanged" if not layers else
                      f"nothing to prune: all {len(layers)} {ops} weight layers are skipped "
                      "(reasons above); the model is unchanged")
            return ir.passes.PassResult(model, modified=False)

        before = _model_sizes(model)
        dense = None
        if self.reconstruct:
            _check_calibration(model, self.context.calibration)  # before any weight changes
            dense = model.clone()
        self._prune(prunable)
        errors: dict[str, tuple[float, float]] = {}
        samples = 0
        if dense is not None:
            # The solves are many mid-sized LAPACK calls: on a busy machine a BLAS thread pool
            # wider than the pass's thread budget spins for cores others hold, so BLAS gets
            # ``context.threads`` like onnxruntime.
            limit = (threadpool_limits(limits=self.context.threads, user_api="blas")
                     if threadpool_limits is not None else contextlib.nullcontext())
            with limit:
                errors, samples = self._reconstruct(dense, model, prunable)
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
        details = self.details
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

    # -- reconstruction ---------------------------------------------------------------------------
    def _reconstruct(self, dense: ir.Model, model: ir.Model,
                     layers: list[_Layer]) -> tuple[dict[str, tuple[float, float]], int]:
        """Re-fit the layers; ({layer: (relative error pruned, re-solved)}, samples used)."""
        fits = []
        for layer in layers:
            fit = _fit(layer, self.ridge)
            if isinstance(fit, str):
                self.note(f"{layer.name}: pruned but not reconstructed, {fit}")
                continue
            if fit.bias_note:
                self.note(f"{layer.name}: {fit.bias_note}")
            fits.append(fit)
        if not fits:
            return {}, 0
        data = self.context.calibration
        records, samples = recon.reconstruct(
            dense, model, fits, lambda: recon.calibration_batches(model, data, self.samples, _BATCH),
            rng=np.random.default_rng(self.context.seed), threads=self.context.threads,
            owner="prune", dense_once=False)
        return dict(records), samples


def _check_calibration(model: ir.Model, dataset: Dataset) -> None:
    value = recon.model_input(model)
    if not recon.sample_shape_fits(value, dataset.sample_shape):
        dims = [d if isinstance(d, int) else str(d) for d in value.shape]
        raise UserError(f"data.calibration: samples of shape {list(dataset.sample_shape)} do "
                        f"not fit model input '{value.name}' of shape {dims}")


def _smallest(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the ``k`` smallest entries (exactly ``k``, ties broken by position)."""
    mask = np.zeros(magnitude.size, dtype=bool)
    mask[np.argsort(magnitude, kind="stable")[:max(k, 0)]] = True
    return mask


@dataclasses.dataclass(eq=False)
class _PruneFit:
    """A pruned layer as ``y = W x + b`` (a ``reconstruct.Fit``): rows in, solution written back."""

    layer: _Layer
    weights: list[np.ndarray]  # per group: effective W [m, k] (pruned)
    kept: list[np.ndarray]  # per group: bool [m, k]
    bias: np.ndarray | None  # effective bias [O] (None: no bias)
    fit_bias: bool  # True: re-solve the bias too; False: it stays, targets exclude it
    ridge: float
    conv: recon.ConvGeometry | None = None
    bias_note: str | None = None
    accumulators: list[recon.GramAccumulator] = dataclasses.field(default_factory=list)

    @property
    def node(self) -> ir.Node:
        return self.layer.node

    def targets(self, y: np.ndarray, rng: np.random.Generator):
        positions = None
        if self.conv is not None:
            positions = _SAMPLING.draw(rng, len(y), y.shape[2] * y.shape[3])
            rows = recon.conv_targets(y, positions).astype(np.float64)
        else:
            rows = y.reshape(-1, y.shape[-1]).astype(np.float64)
        if self.bias is not None and not self.fit_bias:  # a kept bias: fit y - b
            if self.conv is not None or self.bias.size == rows.shape[1]:
                rows = rows - self.bias.reshape(-1)
            else:  # Gemm's C broadcast over the batch ([M, N] or a scalar)
                rows = rows - np.broadcast_to(self.bias, y.shape).reshape(rows.shape)
        return positions, rows, y.shape[2:]

    def add(self, x: np.ndarray, targets) -> None:
        positions, rows_y, grid = targets
        if self.conv is None:
            if self.node.op_type == "Gemm" and self.node.attributes.get_int("transA", 0):
                x = x.T
            groups_x, outs = [x.reshape(-1, x.shape[-1])], [slice(None)]
        else:
            groups_x = self.conv.patches(x, positions, grid=grid)
            per = rows_y.shape[1] // self.conv.group
            outs = [slice(g * per, (g + 1) * per) for g in range(self.conv.group)]
        if not self.accumulators:
            self.accumulators = [recon.GramAccumulator(w.shape[1], w.shape[0], intercept=self.fit_bias)
                                 for w in self.weights]
        for accumulator, rows, out in zip(self.accumulators, groups_x, outs):
            accumulator.add(rows, rows_y[:, out])

    def solve(self) -> tuple[str, tuple[float, float]]:
        """Re-solve every output channel, write the weights (and bias) back; relative errors."""
        solved_mats, solved_bias = [], []
        error_before = error_after = energy = 0.0
        for g, accumulator in enumerate(self.accumulators):
            pruned = self.weights[g]
            out = slice(g * pruned.shape[0], (g + 1) * pruned.shape[0])
            old_bias = self.bias.reshape(-1)[out] if self.fit_bias else None
            # The ridge pulls toward the pruned weights, not toward zero: a weight whose input
            # the calibration data never excites (a dead ReLU, say) keeps its value.
            weights, bias = accumulator.solve(self.ridge, self.kept[g], prior=pruned)
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
        self._write_back(solved_mats, solved_bias)
        energy = max(energy, np.finfo(np.float64).tiny)
        return self.layer.name, (error_before / energy, error_after / energy)

    def _write_back(self, mats: list[np.ndarray], biases: list) -> None:
        layer, node = self.layer, self.layer.node
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
        if self.fit_bias:
            bias = np.concatenate(biases)
            if node.op_type == "Gemm":
                bias = bias / node.attributes.get_float("beta", 1.0)
            bias_value = node.inputs[2]
            constant, _ = _constant_source(bias_value)
            _store(bias_value, constant, bias.reshape(_tensor(bias_value, constant).shape.numpy()))


def _fit(layer: _Layer, ridge: float) -> _PruneFit | str:
    """The least-squares view of a pruned layer, or why it cannot be reconstructed."""
    node = layer.node
    if _is_constant(node.inputs[0]):
        return "its input is a constant"
    weight = layer.array()
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias, fit_bias, bias_note = None, False, None
    if bias_value is not None:
        constant, reason = _constant_source(bias_value)
        if reason is not None and not reason.startswith("is shared"):
            return f"its bias '{bias_value.name}' {reason}"
        bias = _tensor(bias_value, constant).numpy().astype(np.float64)
        fit_bias = reason is None
        if reason is not None:
            bias_note = (f"bias '{bias_value.name}' {reason}; reconstruction keeps it and "
                         "re-solves the weights only")
    if node.op_type == "Conv":
        if weight.ndim != 4:
            return "only 2-D convolutions are reconstructed"
        conv = recon.ConvGeometry.of(node, weight.shape[2:])
        per = weight.shape[0] // conv.group
        mats = [weight[g * per:(g + 1) * per].reshape(per, -1).astype(np.float64)
                for g in range(conv.group)]
        masks = [layer.kept[g * per:(g + 1) * per].reshape(per, -1) for g in range(conv.group)]
        return _PruneFit(layer, mats, masks, bias, fit_bias, ridge, conv, bias_note)
    if weight.ndim != 2:
        return f"its weight has {weight.ndim} dimensions (2 are reconstructed)"
    if node.op_type == "MatMul":
        return _PruneFit(layer, [weight.T.astype(np.float64)], [layer.kept.T], None, False, ridge)
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
    return _PruneFit(layer, [mat], [mask], bias, fit_bias, ridge, bias_note=bias_note)
