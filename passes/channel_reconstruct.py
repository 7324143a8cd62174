"""Calibration-driven parts of channel pruning: activation energy, mean compensation and layer
reconstruction.

Activation energy. For a channel group and each layer ``L`` that consumes it (weights ``W_L``),
channel ``c`` carries into ``L`` the energy

    e_c = Σ_L E[x_c²] · ‖W_L[:, c]‖²

(``x_c`` over calibration samples and positions; after a Flatten the channel's block of columns
is summed). It is the output error ``L`` would suffer from losing ``c`` if channels were
uncorrelated, so it ranks channels by what removing them costs downstream.

Mean compensation. A removed channel ``c`` did not carry only its variations: it also carried
its mean ``μ_c = E[x_c]``, and a channel whose filter is small but whose bias is large carries
little else (a near-constant ``ReLU6(b)``). Dropping it shifts every consumer's output by a
constant, which the L1 ranking (weights only) cannot see; on MobileNetV2 pruning 10% of one
depthwise block's channels that way cut top-1 agreement with the dense model to 3 of 16 photo
crops (16 of 16 with compensation). So each consumer's bias takes over the removed channels'
means,

    b'_o = b_o + Σ_{c removed} Σ_k W[o, c, k] · μ_c

(``k`` over the kernel taps of a Conv, or the channel's block of columns after a Flatten, with
Gemm's ``alpha``/``beta`` applied). For a Conv it is exact away from zero-padded borders, where
some taps fall outside the image. MatMul has no bias to take the shift and is left as sliced.

Reconstruction (``passes.reconstruct`` runs the models and solves). After slicing, a consumer
layer ``L`` sees only the kept input channels ``K`` of the *pruned* model, ``X̂`` (im2col patches
``[n, |K|·kh·kw]`` for a Conv, rows for a Gemm/MatMul), and should still produce the *dense*
model's output ``Y`` on its kept output channels. Its weights and bias are re-solved by ridge
least squares toward zero,

    [W'; b'] = argmin ‖[X̂, 1][W; b]ᵀ − Y‖² + λ‖W‖²,   λ = ridge · mean(diag X̂ᵀX̂)

The refitted bias absorbs the mean that removed (post-ReLU, positive-mean) channels used to
contribute. The dense model runs once and every layer's targets are kept at the sampled rows
(``samples · SAMPLING.positions · C_out`` floats per Conv), which is why each sample keeps
only ``SAMPLING.positions`` random output positions; the pruned model runs once per level.
A layer keeps its sliced weights when the solve does not lower its calibration error.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from deployopt.core.data import Dataset
from deployopt.core.errors import UserError
from deployopt.passes import reconstruct as recon
from deployopt.passes.channel_groups import attr_int, const_array

#: Output positions per sample used for a Conv's least squares (see the module docstring).
SAMPLING = recon.Sampling(positions=64, per_sample=True)
#: Samples per onnxruntime call when the model's batch size is free: the dense run captures
#: every reconstructed layer's output at once, so its batches stay small.
BATCH = 16


def check_data(model: ir.Model, dataset: Dataset, what: str) -> None:
    """Refuse, before any work, data the model cannot take."""
    value = recon.model_input(model, what)
    if not recon.sample_shape_fits(value, dataset.sample_shape):
        want = ["?" if not isinstance(d, int) else d for d in list(value.shape)[1:]]
        raise UserError(f"{what}: samples of '{dataset.name}' have shape {list(dataset.sample_shape)}, "
                        f"the model input '{value.name}' expects {want}")
    if len(dataset) == 0:
        raise UserError(f"{what}: dataset '{dataset.name}' is empty")


def batches(model: ir.Model, dataset: Dataset, samples: int):
    """Up to ``samples`` calibration inputs in batches of ``BATCH`` (or the model's fixed batch)."""
    return recon.calibration_batches(model, dataset, samples, BATCH)


# -- channel statistics: activation energy and means --------------------------------------------

def channel_moments(model: ir.Model, names: list[str], dataset: Dataset, samples: int,
                    threads: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``(E[x], E[x²])`` per axis-1 entry (channel or column) of each named value, over the data."""
    capture = recon.Activations(model, names, threads=threads, what="channel_prune's channel statistics")
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for x in batches(model, dataset, samples):
        for name, value in capture.run(x).items():
            if name not in names:
                continue
            value = value.astype(np.float64)
            axes = tuple(a for a in range(value.ndim) if a != 1)
            sums[name] = sums.get(name, 0.0) + np.sum(value, axis=axes)
            squares[name] = squares.get(name, 0.0) + np.sum(value * value, axis=axes)
            counts[name] = counts.get(name, 0) + value.size // value.shape[1]
    return {name: (sums[name] / counts[name], squares[name] / counts[name]) for name in sums}


def mean_shift(node: ir.Node, removed: np.ndarray, means: np.ndarray) -> np.ndarray | None:
    """What the removed input entries (channels, or columns after a Flatten) added on average to
    each output of ``node``, from its weights before slicing: ``Σ_{c∈removed} Σ_k W[o, c, k]·μ_c``
    (module docstring). None when the layer has no bias to take it (MatMul, a grouped Conv, a
    Gemm bias that is not per output)."""
    w = const_array(node.inputs[1]).astype(np.float64)
    mu = means[removed].astype(np.float64)
    if node.op_type == "Conv":
        if attr_int(node, "group", 1) != 1:
            return None
        return w[:, removed].reshape(w.shape[0], len(removed), -1).sum(2) @ mu
    if node.op_type != "Gemm":
        return None
    alpha = node.attributes["alpha"].as_float() if "alpha" in node.attributes else 1.0
    beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
    shift = alpha * (w[:, removed] @ mu if attr_int(node, "transB", 0) else mu @ w[removed, :])
    c = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if beta == 0 or (c is not None and c.size not in (1, len(shift))):
        return None
    return shift / beta  # C enters as beta·C


def add_to_bias(graph: ir.Graph, node: ir.Node, shift: np.ndarray) -> None:
    """``node``'s bias (input 2; created when absent) plus ``shift``, one value per output."""
    old = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    bias = np.zeros(len(shift)) if old is None else np.broadcast_to(
        old.reshape(-1).astype(np.float64), (len(shift),))
    set_input(graph, node, 2, (bias + shift).astype(np.float32))


# -- reconstruction ------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Layer:
    """A consumer layer of the pruned model whose input channels changed."""

    node: ir.Node  # Conv (group 1, 2-D), Gemm or MatMul in the pruned model
    kept_out: np.ndarray | None  # its output channels still present (None: all)


class _Fit:
    """One layer as a ``reconstruct.Fit``: its accumulator and its weights now."""

    def __init__(self, layer: Layer, graph: ir.Graph, ridge: float):
        node = layer.node
        self.layer, self.node, self.graph, self.ridge = layer, node, graph, ridge
        self.w_now = const_array(node.inputs[1]).astype(np.float64)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        b = const_array(bias) if bias is not None else None
        self.conv = None
        if node.op_type == "Conv":
            self.conv = recon.ConvGeometry.of(node, self.w_now.shape[2:])
            matrix = self.w_now.reshape(self.w_now.shape[0], -1)
        elif node.op_type == "Gemm":
            alpha = node.attributes["alpha"].as_float() if "alpha" in node.attributes else 1.0
            beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
            matrix = alpha * (self.w_now if attr_int(node, "transB", 0) else self.w_now.T)
            if b is not None:  # Gemm's C broadcasts; only a per-output vector can be refitted
                b = beta * np.broadcast_to(b.reshape(-1), (matrix.shape[0],))
        else:  # MatMul: y = x @ B
            matrix = self.w_now.T
        self.matrix = matrix  # [m, k]: y = x·matrixᵀ + b
        self.intercept = node.op_type != "MatMul"
        self.bias = None
        if self.intercept:
            self.bias = np.zeros(matrix.shape[0]) if b is None else np.broadcast_to(
                b.reshape(-1).astype(np.float64), (matrix.shape[0],)).copy()
        self.acc = recon.GramAccumulator(matrix.shape[1], matrix.shape[0], intercept=self.intercept)

    def targets(self, y: np.ndarray, rng: np.random.Generator):
        """The dense output of one batch: all rows (Gemm/MatMul) or, for a Conv,
        ``SAMPLING.positions`` random positions per sample."""
        if self.layer.kept_out is not None:
            y = y[:, self.layer.kept_out]
        if self.conv is None:
            return None, y.reshape(len(y), -1).astype(np.float32)
        positions = SAMPLING.draw(rng, len(y), y.shape[2] * y.shape[3])
        return positions, recon.conv_targets(y, positions).astype(np.float32)

    def add(self, x: np.ndarray, targets) -> None:
        positions, y = targets
        rows = x.reshape(len(x), -1) if positions is None else self.conv.patches(x, positions)[0]
        self.acc.add(rows, y)

    def solve(self) -> dict:
        """Solve, write the weights (and bias) into the pruned model; the layer's record."""
        node = self.node
        energy = float(self.acc.target_energy.sum()) or 1.0
        before = float(self.acc.squared_error(self.matrix, self.bias).sum()) / energy
        weights, bias = self.acc.solve(self.ridge)
        after = float(self.acc.squared_error(weights, bias).sum()) / energy
        record = {"layer": node.name, "rows": self.acc.rows, "features": self.acc.in_features,
                  "rel_error_sliced": before, "rel_error_reconstructed": after}
        if not np.isfinite(after) or after > before:
            record["kept_sliced"] = ("least squares did not lower its calibration error "
                                     f"({before:.3g})")
            return record
        if node.op_type == "Conv":
            new_w = weights.reshape(self.w_now.shape)
        elif node.op_type == "Gemm":
            new_w = weights if attr_int(node, "transB", 0) else weights.T
            node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        else:
            new_w = weights.T
        set_input(self.graph, node, 1, new_w.astype(np.float32))
        if bias is not None:
            set_input(self.graph, node, 2, bias.astype(np.float32))
        return record


def set_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Make ``node.inputs[index]`` an initializer holding ``array``.

    The existing initializer is rewritten in place when this node is its only reader (its name
    stays); otherwise a new initializer is added, so other readers keep the old tensor."""
    old = node.inputs[index] if len(node.inputs) > index else None
    if (old is not None and old.is_initializer() and not old.is_graph_input()
            and not old.is_graph_output() and len(old.uses()) == 1):
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        return
    base = (old.name if old is not None and old.name else f"{node.name or node.op_type}_input{index}")
    name, k = f"{base}_pruned", 1
    while name in graph.initializers:
        k += 1
        name = f"{base}_pruned{k}"
    new = ir.Value(name=name, shape=ir.Shape(array.shape),
                   type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                   const_value=ir.tensor(array, name=name))
    graph.register_initializer(new)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)
    _drop_if_unused(graph, old)


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove an initializer, Constant or Identity-of-constant nobody reads any more."""
    if value is None or value.uses() or value.is_graph_input() or value.is_graph_output():
        return
    if value.is_initializer():
        del graph.initializers[value.name]
        return
    producer = value.producer()
    if producer is not None and producer.op_type in ("Constant", "Identity"):
        source = producer.inputs[0] if producer.inputs else None
        graph.remove(producer, safe=True)
        _drop_if_unused(graph, source)


def reconstruct(original: ir.Model, pruned: ir.Model, layers: list[Layer], dataset: Dataset, *,
                samples: int, ridge: float, seed: int, threads: int) -> list[dict]:
    """Re-solve each layer's weights so it reproduces ``original`` on the pruned model's inputs;
    writes them into ``pruned``. Returns one record per layer (relative squared errors)."""
    fits = [_Fit(layer, pruned.graph, ridge) for layer in layers]
    records, _ = recon.reconstruct(original, pruned, fits, lambda: batches(pruned, dataset, samples),
                                   rng=np.random.default_rng(seed), threads=threads,
                                   owner="channel_prune", dense_once=True)
    return records


def unsupported(node: ir.Node) -> str | None:
    """Why ``node`` cannot be reconstructed here (None when it can)."""
    w = const_array(node.inputs[1])
    if node.op_type == "Conv" and (w is None or w.ndim != 4):
        return "only 2-D convolutions are reconstructed"
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = const_array(node.inputs[2])
        m = w.shape[0] if attr_int(node, "transB", 0) else w.shape[1]
        if c is None or c.size not in (1, m):
            return "its bias is not a per-output vector"
    return None
