"""Calibration-driven parts of channel pruning: activation energy and layer reconstruction.

Activation energy. For a channel group and each layer ``L`` that consumes it (weights ``W_L``),
channel ``c`` carries into ``L`` the energy

    e_c = Σ_L E[x_c²] · ‖W_L[:, c]‖²

(``x_c`` over calibration samples and positions; after a Flatten the channel's block of columns
is summed). It is the output error ``L`` would suffer from losing ``c`` if channels were
uncorrelated, so it ranks channels by what removing them costs downstream.

Reconstruction. After slicing, a consumer layer ``L`` sees only the kept input channels ``K`` of
the *pruned* model, ``X̂`` (im2col patches ``[n, |K|·kh·kw]`` for a Conv, rows for a Gemm/MatMul),
and should still produce the *dense* model's output ``Y`` on its kept output channels. Its
weights and bias are re-solved by ridge least squares

    [W'; b'] = argmin ‖[X̂, 1][W; b]ᵀ − Y‖² + λ‖W‖²,   λ = ridge · mean(diag X̂ᵀX̂)

accumulating ``X̂ᵀX̂`` and ``X̂ᵀY`` over streamed batches (``passes._lstsq.GramAccumulator``): the
normal equations take ``O(k²)`` memory whatever the number of samples. The dense targets are kept
only at the sampled rows (``samples · POSITIONS_PER_SAMPLE · C_out`` floats per Conv; about
110 MB for ResNet-18 at 256 samples), so the dense model runs once. The refitted bias absorbs the mean that removed
(post-ReLU, positive-mean) channels used to contribute. Layers are solved level by level in graph
order: a layer's inputs are taken from the pruned model in which every upstream layer is already
reconstructed, so later layers also correct what earlier ones could not (as in ThiNet and He et
al. 2017, "Channel pruning for accelerating very deep neural networks"). For a Conv only
``POSITIONS_PER_SAMPLE`` random output positions per sample enter the Gram matrix: neighbouring
positions are strongly correlated, and this keeps the cost independent of the image size.

Runs use onnxruntime on the CPU; the needed intermediate values become extra graph outputs of a
copy of the model cut down to what they need (``onnx.utils.Extractor``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx
import onnx.utils
import onnx_ir as ir

from deployopt.core.data import Dataset
from deployopt.core.errors import UserError
from deployopt.passes._lstsq import GramAccumulator
from deployopt.passes.channel_groups import attr_int, const_array

#: Output positions per sample used for a Conv's least squares (see the module docstring).
POSITIONS_PER_SAMPLE = 64
#: Samples per onnxruntime call when the model's batch size is free.
BATCH = 16


# -- running the model -------------------------------------------------------------------------

class Capture:
    """An onnxruntime session over a copy of ``model`` whose outputs are ``names``."""

    def __init__(self, model: ir.Model | onnx.ModelProto, names: list[str], threads: int):
        import onnxruntime as ort

        proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
        input_names = [v.name for v in proto.graph.input
                       if v.name not in {t.name for t in proto.graph.initializer}]
        cut = onnx.utils.Extractor(proto).extract_model(input_names, list(dict.fromkeys(names)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        self.session = ort.InferenceSession(cut.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = input_names[0]
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, {self.input_name: x})))


def check_data(model: ir.Model, dataset: Dataset, what: str) -> None:
    """Refuse, before any work, data the model cannot take."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    if len(inputs) != 1:
        raise UserError(f"{what}: the model has {len(inputs)} inputs; calibration data "
                        "feeds models with exactly one")
    shape = inputs[0].shape
    want = None if shape is None else [d if isinstance(d, int) else None for d in shape[1:]]
    got = list(dataset.sample_shape)
    if want is not None and (len(want) != len(got) or any(w not in (None, g) for w, g in zip(want, got))):
        raise UserError(f"{what}: samples of '{dataset.name}' have shape {got}, the model input "
                        f"'{inputs[0].name}' expects {['?' if w is None else w for w in want]}")
    if len(dataset) == 0:
        raise UserError(f"{what}: dataset '{dataset.name}' is empty")


def batches(model: ir.Model, dataset: Dataset, samples: int) -> Iterator[np.ndarray]:
    """Up to ``samples`` samples in batches the model accepts (a fixed batch size is honoured;
    a last partial batch is dropped then)."""
    first = next(v for v in model.graph.inputs if not v.is_initializer())
    fixed = first.shape[0] if first.shape is not None and isinstance(first.shape[0], int) else None
    size = fixed or BATCH
    seen = 0
    for x, _ in dataset.batches(size):
        x = np.ascontiguousarray(x[: samples - seen], dtype=np.float32)
        if fixed is not None and len(x) != fixed:
            break
        if len(x):
            yield x
        seen += len(x)
        if seen >= samples:
            break


# -- activation energy -------------------------------------------------------------------------

def mean_squares(model: ir.Model, names: list[str], dataset: Dataset, samples: int,
                 threads: int) -> dict[str, np.ndarray]:
    """E[x²] per axis-1 entry (channel or column) of each named value, over the data."""
    capture = Capture(model, names, threads)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for x in batches(model, dataset, samples):
        for name, value in capture.run(x).items():
            value = value.astype(np.float64)
            axes = tuple(a for a in range(value.ndim) if a != 1)
            sums[name] = sums.get(name, 0.0) + np.sum(value * value, axis=axes)
            counts[name] = counts.get(name, 0) + value.size // value.shape[1]
    return {name: sums[name] / counts[name] for name in sums}


# -- reconstruction ------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Layer:
    """A consumer layer of the pruned model whose input channels changed."""

    node: ir.Node  # Conv (group 1, 2-D), Gemm or MatMul in the pruned model
    kept_out: np.ndarray | None  # its output channels still present (None: all)


def _conv_pads(node: ir.Node, size: tuple[int, int], kernel: tuple[int, int],
               strides: list[int], dilations: list[int]) -> list[int]:
    """[top, left, bottom, right] padding, resolving auto_pad as ONNX defines it."""
    auto = node.attributes.get("auto_pad")
    auto = auto.as_string() if auto is not None else "NOTSET"
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k, s, d in zip(size, kernel, strides, dilations):
            out = -(-n // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
            small = total // 2
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin + end
    if auto == "VALID":
        return [0, 0, 0, 0]
    pads = node.attributes.get("pads")
    return list(pads.as_ints()) if pads is not None else [0, 0, 0, 0]


def im2col(x: np.ndarray, node: ir.Node, kernel: tuple[int, int], out_hw: tuple[int, int],
           positions: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Patches ``[rows, C·kh·kw]`` of a 2-D Conv's input ``x`` at output positions ``(n, oh, ow)``
    (the layout of ``W.reshape(C_out, -1)``). numpy's sliding_window_view does the windowing
    (a view: only the sampled patches are copied)."""
    strides = list(node.attributes["strides"].as_ints()) if "strides" in node.attributes else [1, 1]
    dilations = list(node.attributes["dilations"].as_ints()) if "dilations" in node.attributes else [1, 1]
    top, left, bottom, right = _conv_pads(node, x.shape[2:], kernel, strides, dilations)
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    windows = windows[:, :, : out_hw[0], : out_hw[1]]
    n, oh, ow = positions
    return windows[n, :, oh, ow].reshape(len(n), -1)  # [rows, C, kh, kw] -> [rows, C·kh·kw]


class _Fit:
    """One layer: its dense targets at sampled positions, its accumulator, its weights now."""

    #: Rows gathered before one Gram update (large products run at full BLAS speed).
    FLUSH_ROWS = 4096

    def __init__(self, layer: Layer):
        node = layer.node
        self.layer = layer
        self.w_now = const_array(node.inputs[1]).astype(np.float64)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        b = const_array(bias) if bias is not None else None
        if node.op_type == "Conv":
            self.kernel = tuple(self.w_now.shape[2:])
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
        self.acc = GramAccumulator(matrix.shape[1], matrix.shape[0], intercept=self.intercept)
        self.targets: list[tuple[tuple | None, np.ndarray]] = []  # per batch: (positions, rows)
        self.out_hw: tuple[int, int] | None = None
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []

    def keep_targets(self, y: np.ndarray, rng: np.random.Generator) -> None:
        """Store the dense output of one batch: all rows (Gemm/MatMul) or, for a Conv,
        ``POSITIONS_PER_SAMPLE`` random positions per sample."""
        if self.layer.kept_out is not None:
            y = y[:, self.layer.kept_out]
        if self.layer.node.op_type != "Conv":
            self.targets.append((None, y.reshape(len(y), -1).astype(np.float32)))
            return
        self.out_hw = tuple(y.shape[2:])
        count = self.out_hw[0] * self.out_hw[1]
        per = min(POSITIONS_PER_SAMPLE, count)
        flat = np.concatenate([rng.choice(count, per, replace=False) for _ in range(len(y))])
        n = np.repeat(np.arange(len(y)), per)
        oh, ow = np.divmod(flat, self.out_hw[1])
        self.targets.append(((n, oh, ow), y[n, :, oh, ow].astype(np.float32)))

    def add(self, x: np.ndarray, batch: int) -> None:
        """Pair the pruned model's input for ``batch`` with the stored dense targets."""
        positions, y = self.targets[batch]
        if positions is None:
            rows = x.reshape(len(x), -1)
        else:
            rows = im2col(x, self.layer.node, self.kernel, self.out_hw, positions)
        self._x.append(rows)
        self._y.append(y)
        if sum(len(r) for r in self._x) >= self.FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._x:
            self.acc.add(np.concatenate(self._x), np.concatenate(self._y))
            self._x, self._y = [], []

    def solve_and_write(self, graph: ir.Graph, ridge: float) -> dict:
        self._flush()
        self.targets = []
        node = self.layer.node
        energy = float(self.acc.target_energy.sum()) or 1.0
        before = float(self.acc.squared_error(self.matrix, self.bias).sum()) / energy
        weights, bias = self.acc.solve(ridge)
        after = float(self.acc.squared_error(weights, bias).sum()) / energy
        record = {"layer": node.name, "rows": self.acc.rows, "features": self.acc.in_features,
                  "rel_error_sliced": before, "rel_error_reconstructed": after}
        if not np.isfinite(after) or after > before:
            record["kept_sliced"] = True  # least squares did not help on its own data
            return record
        if node.op_type == "Conv":
            new_w = weights.reshape(self.w_now.shape)
        elif node.op_type == "Gemm":
            new_w = weights if attr_int(node, "transB", 0) else weights.T
            node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        else:
            new_w = weights.T
        set_input(graph, node, 1, new_w.astype(np.float32))
        if bias is not None:
            set_input(graph, node, 2, bias.astype(np.float32))
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


def _levels(graph: ir.Graph, layers: list[Layer]) -> list[list[Layer]]:
    """Group layers so that no layer depends on another layer of its own or a later level."""
    by_node = {layer.node: layer for layer in layers}
    upstream: dict[ir.Node, int] = {}  # node -> deepest level of a reconstructed layer feeding it
    level_of: dict[ir.Node, int] = {}
    for node in graph:  # topological order
        deepest = -1
        for v in node.inputs:
            producer = v.producer() if v is not None else None
            if producer is not None:
                deepest = max(deepest, upstream.get(producer, -1))
        if node in by_node:
            level_of[node] = deepest + 1
            upstream[node] = deepest + 1
        else:
            upstream[node] = deepest
    count = max(level_of.values(), default=-1) + 1
    levels: list[list[Layer]] = [[] for _ in range(count)]
    for node, level in level_of.items():
        levels[level].append(by_node[node])
    return levels


def reconstruct(original: ir.Model | onnx.ModelProto, pruned: ir.Model, layers: list[Layer],
                dataset: Dataset, *, samples: int, ridge: float, seed: int, threads: int) -> list[dict]:
    """Re-solve each layer's weights so it reproduces ``original`` on the pruned model's inputs;
    writes them into ``pruned``. Returns one record per layer (relative squared errors).

    The dense model runs once, keeping every layer's targets at the sampled positions
    (``samples · POSITIONS_PER_SAMPLE`` rows per Conv, ``samples`` per Gemm); the pruned model
    runs once per level, cut down to the inputs that level needs."""
    rng = np.random.default_rng(seed)
    fits = [_Fit(layer) for layer in layers]
    dense = Capture(original, [f.layer.node.outputs[0].name for f in fits], threads)
    for x in batches(pruned, dataset, samples):
        outputs = dense.run(x)
        for fit in fits:
            fit.keep_targets(outputs[fit.layer.node.outputs[0].name], rng)
    del dense
    by_node = {fit.layer.node: fit for fit in fits}
    records = []
    for level in _levels(pruned.graph, layers):
        level_fits = [by_node[layer.node] for layer in level]
        capture = Capture(pruned, [f.layer.node.inputs[0].name for f in level_fits], threads)
        for i, x in enumerate(batches(pruned, dataset, samples)):
            inputs = capture.run(x)
            for fit in level_fits:
                fit.add(inputs[fit.layer.node.inputs[0].name], i)
        records += [fit.solve_and_write(pruned.graph, ridge) for fit in level_fits]
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
