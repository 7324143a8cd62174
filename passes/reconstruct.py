"""Layer reconstruction by ridge least squares: the engine behind ``prune`` and ``channel_prune``.

What is solved. A Conv, Gemm or MatMul layer is a linear map ``y = W x + b`` on rows ``x`` (a
Gemm/MatMul: the rows of its input; a Conv: im2col patches, one problem per group). After
pruning, the layer sees inputs ``X`` from the *pruned* model and should still produce the outputs
``Y`` of the *dense* model on the same calibration samples. Each output ``o`` re-solves its kept
weights ``K_o`` (the ones pruning left; ``prune`` keeps a mask per output, ``channel_prune`` one
set of kept input columns for all outputs) and, when fitted, its bias:

    θ_o = argmin ‖X̃_K θ − y_o‖² + λ ‖θ_w − θ⁰_o‖²,    X̃_K = [X[:, K_o], 1]
        = (X̃_Kᵀ X̃_K + λ D)⁻¹ (X̃_Kᵀ y_o + λ D θ⁰_o),   λ = ridge · mean diag(XᵀX)

``D`` is the identity on the weights and 0 on the bias (the bias is not shrunk); ``θ⁰`` is the
``prior`` the ridge pulls toward (zero by default, which is plain ridge ``(XᵀX + λI)⁻¹ Xᵀy``).
``ridge`` is relative to the mean input energy, so one value suits layers of any scale. With
``ridge == 0`` (or all-zero inputs) the minimum-norm least-squares solution is used, which stays
defined when the Gram matrix is singular (dead ReLU channels, constant padding).

Streaming. Only sufficient statistics are kept, so memory is flat in the number of samples:
``G = X̃ᵀX̃``, ``C = X̃ᵀY``, ``s_o = Σ y_o²`` and the row count. The squared error of any
weights follows from them without revisiting the data:

    E(θ_o) = Σ_n (x̃_n·θ_o − y_no)² = θ_oᵀ G θ_o − 2 θ_oᵀ C[:, o] + s_o

Sequential correction. Layers are solved level by level in graph order (``levels``): a layer's
inputs are captured from the pruned model in which every upstream layer is already
reconstructed, so it also absorbs the error that reached it from upstream instead of matching
the dense layer on inputs the pruned model never produces. Layers of one level share one pass
over the data.

Capture and sampling. Intermediate values are read with onnxruntime (``Activations``: a copy of
the model whose outputs are the wanted values, cut down to what they need). For a Conv only a
sample of output positions enters the Gram matrix (``Sampling``): neighbouring positions are
strongly correlated, and sampling keeps the cost independent of the image size.

Written by hand: numpy solves one system and has sliding windows, but no library keeps streamed
normal equations with a per-output sparsity pattern, or im2col with stride, padding, dilation
and groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from tqdm import tqdm

from deployopt.core.data import Dataset
from deployopt.core.errors import UserError, WorkFailed, one_line
from deployopt.core.session import open_session

#: Rows gathered before one Gram update: few large products run at full BLAS speed.
FLUSH_ROWS = 4096


# -- least squares --------------------------------------------------------------------------------
class GramAccumulator:
    """Accumulate XᵀX, XᵀY and Σy² over streamed batches, then solve masked ridge problems.

    ``GramAccumulator(in_features, out_features, intercept=True)``; ``add(x [n, k], y [n, m])``
    any number of times; ``solve(ridge, keep)`` -> ``(W [m, k], b [m] | None)``;
    ``squared_error(W, b)`` -> ``[m]`` and ``target_energy`` (Σy² per output) for relative errors.
    Added rows are buffered up to ``FLUSH_ROWS`` before they enter the sums.
    """

    def __init__(self, in_features: int, out_features: int, *, intercept: bool = True):
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.intercept = bool(intercept)
        size = self.in_features + (1 if self.intercept else 0)
        self.gram = np.zeros((size, size), dtype=np.float64)
        self.cross = np.zeros((size, self.out_features), dtype=np.float64)
        self._energy = np.zeros(self.out_features, dtype=np.float64)
        self._rows = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def rows(self) -> int:
        return self._rows + sum(len(x) for x, _ in self._pending)

    @property
    def target_energy(self) -> np.ndarray:
        self.flush()
        return self._energy

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add ``n`` rows: inputs ``x [n, in_features]``, targets ``y [n, out_features]``."""
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x: expected [n, {self.in_features}], got {list(x.shape)}")
        if y.shape != (x.shape[0], self.out_features):
            raise ValueError(f"y: expected [{x.shape[0]}, {self.out_features}], "
                             f"got {list(y.shape)}")
        self._pending.append((x, y))
        if sum(len(rows) for rows, _ in self._pending) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Fold the buffered rows into the sums."""
        if not self._pending:
            return
        x = np.concatenate([x for x, _ in self._pending]).astype(np.float64, copy=False)
        y = np.concatenate([y for _, y in self._pending]).astype(np.float64, copy=False)
        self._pending = []
        k = self.in_features
        self.gram[:k, :k] += x.T @ x
        self.cross[:k] += x.T @ y
        if self.intercept:
            col_sum = x.sum(axis=0)
            self.gram[:k, k] += col_sum
            self.gram[k, :k] += col_sum
            self.gram[k, k] += x.shape[0]
            self.cross[k] += y.sum(axis=0)
        self._energy += np.einsum("nm,nm->m", y, y)
        self._rows += x.shape[0]

    def damping(self, ridge: float) -> float:
        """λ = ridge · mean(diag(XᵀX)) over the weight coordinates."""
        self.flush()
        k = self.in_features
        return float(ridge) * float(np.mean(np.diag(self.gram)[:k])) if k else 0.0

    def solve(self, ridge: float, keep: np.ndarray | None = None,
              prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Ridge solution with the weights outside ``keep`` fixed at zero.

        ``keep``: None (all inputs), a bool vector ``[k]`` shared by all outputs (one multi-output
        solve, e.g. inputs removed by channel pruning), or a bool matrix ``[m, k]`` (one solve per
        output, e.g. unstructured pruning masks). ``prior [m, k]``: the weights the ridge term
        pulls toward (default zero). Returns ``W [m, k]`` (zeros outside ``keep``)
        and ``b [m]`` (None without intercept).
        """
        self.flush()
        if self._rows == 0:
            raise ValueError("no rows were added")
        k, m = self.in_features, self.out_features
        lam = self.damping(ridge)
        weights = np.zeros((m, k), dtype=np.float64)
        bias = np.zeros(m, dtype=np.float64) if self.intercept else None
        if keep is None:
            keep = np.ones(k, dtype=bool)
        keep = np.asarray(keep, dtype=bool)
        prior = np.zeros((m, k)) if prior is None else np.asarray(prior, dtype=np.float64)
        if keep.shape == (k,):
            kept = np.flatnonzero(keep)
            theta = self._solve_subset(kept, self.cross, lam, prior[:, kept].T)
            weights[:, keep] = theta[: keep.sum()].T
            if bias is not None:
                bias[:] = theta[-1]
            return weights, bias
        if keep.shape != (m, k):
            raise ValueError(f"keep: expected [{k}] or [{m}, {k}], got {list(keep.shape)}")
        for o in range(m):
            kept = np.flatnonzero(keep[o])
            theta = self._solve_subset(kept, self.cross[:, o : o + 1], lam,
                                       prior[o, kept][:, None])[:, 0]
            weights[o, kept] = theta[: kept.size]
            if bias is not None:
                bias[o] = theta[-1]
        return weights, bias

    def _solve_subset(self, kept: np.ndarray, rhs: np.ndarray, lam: float,
                      prior: np.ndarray) -> np.ndarray:
        index = np.append(kept, self.in_features) if self.intercept else kept
        if index.size == 0:
            return np.zeros((0, rhs.shape[1]))
        a = self.gram[np.ix_(index, index)].copy()
        b = rhs[index].copy()
        if lam > 0:
            a[np.arange(kept.size), np.arange(kept.size)] += lam  # the bias is not shrunk
            b[: kept.size] += lam * prior
            try:
                return np.linalg.solve(a, b)
            except np.linalg.LinAlgError:
                pass  # only when the bias column alone is singular (no rows): fall through
        return np.linalg.lstsq(a, b, rcond=None)[0]

    def squared_error(self, weights: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """Σ_n (x_n·w_o + b_o − y_no)² per output, from the accumulated statistics."""
        self.flush()
        theta = np.asarray(weights, dtype=np.float64).T  # [k, m]
        if self.intercept:
            b = np.zeros(self.out_features) if bias is None else np.asarray(bias, dtype=np.float64)
            theta = np.vstack([theta, b[None, :]])
        elif bias is not None:
            raise ValueError("bias given to an accumulator without intercept")
        quad = np.einsum("km,km->m", theta, self.gram @ theta)
        error = quad - 2.0 * np.einsum("km,km->m", theta, self.cross) + self._energy
        return np.maximum(error, 0.0)  # rounding can push an exact fit a hair below zero


# -- Conv as rows ---------------------------------------------------------------------------------
def conv_pads(auto_pad: str, pads, in_size, kernel, strides, dilations) -> tuple[int, ...]:
    """Explicit ONNX pads ``[h_begin, w_begin, h_end, w_end]`` for a 2-D Conv, resolving auto_pad.

    SAME_*: total = max((⌈i/s⌉ − 1)·s + (k − 1)·d + 1 − i, 0), the odd pixel at the end for
    SAME_UPPER and at the beginning for SAME_LOWER (the ONNX Conv definition).
    """
    if auto_pad in ("", "NOTSET"):
        return tuple(int(p) for p in pads) if pads else (0,) * (2 * len(kernel))
    if auto_pad == "VALID":
        return (0,) * (2 * len(kernel))
    begins, ends = [], []
    for i, k, s, d in zip(in_size, kernel, strides, dilations):
        total = max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return tuple(begins + ends)


def conv_output_size(in_size, kernel, strides, pads, dilations) -> tuple[int, int]:
    """Output grid ``(oh, ow)``: ⌊(i + pad_begin + pad_end − (k − 1)·d − 1) / s⌋ + 1."""
    n = len(kernel)
    return tuple((i + pads[a] + pads[a + n] - (k - 1) * d - 1) // s + 1
                 for a, (i, k, s, d) in enumerate(zip(in_size, kernel, strides, dilations)))


def conv_patches(x: np.ndarray, kernel: tuple[int, int], *, strides=(1, 1), pads=(0, 0, 0, 0),
                 dilations=(1, 1), group: int = 1,
                 positions: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """im2col for a 2-D Conv: ``x [b, C, H, W]`` -> ``[group, rows, C/group·kh·kw]``.

    ``positions`` picks output positions (flat, row-major over the ``oh × ow`` grid): None for
    all of them, a vector of flat indices shared by every sample (rows ``i·P + p``), or a pair
    ``(sample, flat)`` of per-row indices. Columns follow ``W[o].reshape(-1)`` (channel, kernel
    row, kernel column), so ``conv(x)[i, o, p] = patches[g(o)][row(i, p)] · W[o].reshape(-1) + b[o]``.
    Only the selected patches are copied out of the strided window view.
    """
    b, c, _, _ = x.shape
    kh, kw = kernel
    (sh, sw), (dh, dw) = strides, dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = np.lib.stride_tricks.sliding_window_view(xp, span, axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [b, c, oh, ow, kh, kw]
    ow = windows.shape[3]
    per = c // group
    if isinstance(positions, tuple):
        sample, flat = positions
        cols = windows[sample, :, flat // ow, flat % ow]  # [rows, c, kh, kw] (a copy)
        cols = cols.reshape(len(sample), group, per * kh * kw).transpose(1, 0, 2)
        return np.ascontiguousarray(cols)
    if positions is None:
        positions = np.arange(windows.shape[2] * ow)
    cols = windows[:, :, positions // ow, positions % ow]  # [b, c, P, kh, kw] (a copy)
    p = cols.shape[2]
    cols = cols.reshape(b, group, per, p, kh, kw).transpose(1, 0, 3, 2, 4, 5)
    return cols.reshape(group, b * p, per * kh * kw)


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """A 2-D Conv's attributes, read the way onnxruntime reads them."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, ...]
    auto_pad: str
    group: int

    @classmethod
    def of(cls, node: ir.Node, kernel: Sequence[int]) -> ConvGeometry:
        attrs = node.attributes
        return cls(tuple(int(k) for k in kernel), tuple(attrs.get_ints("strides", (1, 1))),
                   tuple(attrs.get_ints("dilations", (1, 1))), tuple(attrs.get_ints("pads", ())),
                   attrs.get_string("auto_pad", "NOTSET"), attrs.get_int("group", 1))

    def patches(self, x: np.ndarray, positions=None, *, grid: tuple[int, ...] | None = None) -> np.ndarray:
        """``conv_patches`` of ``x``; ``grid``, when given, is the Conv output's (checked)."""
        pads = conv_pads(self.auto_pad, self.pads, x.shape[2:], self.kernel, self.strides,
                         self.dilations)
        if grid is not None:
            computed = conv_output_size(x.shape[2:], self.kernel, self.strides, pads, self.dilations)
            if tuple(grid) != tuple(computed):
                raise WorkFailed(f"im2col grid {computed[0]}x{computed[1]} does not match the Conv "
                                 f"output {grid[0]}x{grid[1]}")
        return conv_patches(x, self.kernel, strides=self.strides, pads=pads,
                            dilations=self.dilations, group=self.group, positions=positions)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Which Conv output positions enter the Gram matrices.

    ``per_sample``: every sample draws its own ``positions`` (all of them, in random order, when
    the grid is smaller); ``channel_prune`` stores the dense targets at the drawn positions, so
    it keeps few per sample and spreads them. Otherwise one draw per batch serves all its samples,
    and only when the grid has more than ``positions`` (``prune``, which streams the targets and
    keeps many). Both draw from the one generator of a reconstruction, seeded by the run's seed.
    """

    positions: int
    per_sample: bool

    def draw(self, rng: np.random.Generator, samples: int, grid: int):
        """Positions for ``conv_patches``: None (all), flat indices, or ``(sample, flat)``."""
        if not self.per_sample:
            if grid <= self.positions:
                return None
            return np.sort(rng.choice(grid, self.positions, replace=False))
        per = min(self.positions, grid)
        flat = np.concatenate([rng.choice(grid, per, replace=False) for _ in range(samples)])
        return np.repeat(np.arange(samples), per), flat


def conv_targets(y: np.ndarray, positions) -> np.ndarray:
    """Rows ``[rows, C_out]`` of a Conv output ``y [b, C_out, oh, ow]`` at ``positions`` (as in
    ``conv_patches``), in the same row order as the patches."""
    if isinstance(positions, tuple):
        sample, flat = positions
        return y[sample, :, flat // y.shape[3], flat % y.shape[3]]
    y = y.reshape(y.shape[0], y.shape[1], -1)
    if positions is not None:
        y = y[:, :, positions]
    return y.transpose(0, 2, 1).reshape(-1, y.shape[1])


# -- running the models ---------------------------------------------------------------------------
def model_input(model: ir.Model, what: str = "data.calibration") -> ir.Value:
    """The model's single non-initializer input (calibration data feeds exactly one)."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    if len(inputs) != 1:
        raise UserError(f"{what}: the model has {len(inputs)} inputs "
                        f"({', '.join(str(v.name) for v in inputs) or 'none'}); calibration "
                        "data feeds models with exactly one")
    return inputs[0]


def sample_shape_fits(value: ir.Value, sample_shape: Sequence[int]) -> bool:
    """Samples of ``sample_shape`` fit the input ``value`` (its batch axis aside)."""
    if value.shape is None:
        return True
    dims = list(value.shape)[1:]
    return len(dims) == len(sample_shape) and all(
        not isinstance(d, int) or d == s for d, s in zip(dims, sample_shape))


def calibration_batches(model: ir.Model, dataset: Dataset, samples: int,
                        batch_size: int) -> Iterator[np.ndarray]:
    """Up to ``samples`` inputs in batches the model takes: ``batch_size`` when its batch axis is
    free, else its fixed batch (a short last batch is then dropped); in the input's dtype."""
    first = model_input(model)
    dims = list(first.shape) if first.shape is not None else []
    fixed = dims[0] if dims and isinstance(dims[0], int) else None
    dtype = first.dtype.numpy() if first.dtype is not None else np.float32
    remaining = samples
    for x, _ in dataset.batches(fixed or batch_size):
        if remaining <= 0:
            break
        x = np.ascontiguousarray(x[:remaining], dtype=dtype)
        if fixed is not None and len(x) != fixed:
            break
        if len(x):
            remaining -= len(x)
            yield x


class Activations:
    """An onnxruntime session over a copy of ``model`` whose outputs are the named values.

    The copy is cut down to what those values need. A name that is the model's input is answered
    with the input itself.
    """

    def __init__(self, model: ir.Model, names: Iterable[str], *, threads: int, what: str):
        self.what = what
        self.input_name = str(model_input(model).name)
        self.names = [n for n in dict.fromkeys(names) if n != self.input_name]
        self.session = None
        if not self.names:
            return
        copy = model.clone()
        dtype = model_input(copy).dtype or ir.DataType.FLOAT
        values = {v.name: v for node in copy.graph for v in node.outputs}
        outputs = []
        for name in self.names:
            value = values[name]
            if value.type is None:  # not shape-inferred: activations share the input's dtype
                value.type = ir.TensorType(dtype)
            outputs.append(value)
        copy.graph.outputs.clear()
        copy.graph.outputs.extend(outputs)
        RemoveUnusedNodesPass()(copy)
        self.session = open_session(copy, threads=threads, optimization_level="basic",
                                    what=f"the model for {what}")

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        found = {self.input_name: x}
        if self.session is not None:
            try:
                found.update(zip(self.names, self.session.run(self.names, {self.input_name: x})))
            except Exception as e:  # onnxruntime raises its own exception types
                raise WorkFailed(f"{self.what}: onnxruntime failed on calibration data: "
                                 f"{one_line(e)}") from e
        return found


# -- the reconstruction loop ----------------------------------------------------------------------
class Fit(Protocol):
    """One layer being re-fitted: input 0 is read from the pruned model, output 0 from the dense."""

    node: ir.Node

    def targets(self, y: np.ndarray, rng: np.random.Generator) -> Any:
        """What to keep of the dense output ``y`` of one batch (e.g. rows at sampled positions)."""

    def add(self, x: np.ndarray, targets: Any) -> None:
        """Pair the pruned model's input ``x`` of that batch with its targets."""

    def solve(self) -> Any:
        """Solve, write the weights into the pruned model, return a record."""


def levels(graph: ir.Graph, nodes: Sequence[ir.Node]) -> list[list[ir.Node]]:
    """``nodes`` grouped so that none depends on another of its own or a later level."""
    wanted = set(nodes)
    upstream: dict[ir.Node, int] = {}  # node -> deepest level of a wanted node feeding it
    level_of: dict[ir.Node, int] = {}
    for node in graph:  # topological order
        deepest = -1
        for v in node.inputs:
            producer = v.producer() if v is not None else None
            if producer is not None:
                deepest = max(deepest, upstream.get(producer, -1))
        if node in wanted:
            level_of[node] = upstream[node] = deepest + 1
        else:
            upstream[node] = deepest
    grouped: list[list[ir.Node]] = [[] for _ in range(max(level_of.values(), default=-1) + 1)]
    for node, level in level_of.items():
        grouped[level].append(node)
    return grouped


def reconstruct(dense: ir.Model, pruned: ir.Model, fits: Sequence[Fit],
                batches: Callable[[], Iterable[np.ndarray]], *, rng: np.random.Generator,
                threads: int, owner: str, dense_once: bool) -> tuple[list[Any], int]:
    """Re-fit ``fits`` level by level; (their ``solve()`` records in level order, samples used).

    ``owner`` (the pass name) labels the progress bar and the errors.

    ``dense_once``: run the dense model once and keep every layer's targets for all batches
    (cheap when few rows per sample are kept), else run it again for every level next to the
    pruned model (memory stays at one batch whatever the number of samples and layers).
    """
    what = f"{owner}'s reconstruction"
    by_node = {fit.node: fit for fit in fits}
    stored: dict[ir.Node, list[Any]] = {fit.node: [] for fit in fits}
    if dense_once:
        capture = Activations(dense, [f.node.outputs[0].name for f in fits], threads=threads,
                              what=what)
        for x in batches():
            outputs = capture.run(x)
            for fit in fits:
                stored[fit.node].append(fit.targets(outputs[fit.node.outputs[0].name], rng))
        del capture
    records: list[Any] = []
    samples = 0
    for level in tqdm(levels(pruned.graph, list(by_node)), desc=f"{owner}: reconstruct",
                      unit="level", disable=None):
        inputs = Activations(pruned, [n.inputs[0].name for n in level], threads=threads, what=what)
        outputs = None if dense_once else Activations(
            dense, [n.outputs[0].name for n in level], threads=threads, what=what)
        samples = 0
        for i, x in enumerate(batches()):
            found = inputs.run(x)
            dense_y = outputs.run(x) if outputs is not None else None
            for node in level:
                targets = (stored[node][i] if dense_y is None
                           else by_node[node].targets(dense_y[node.outputs[0].name], rng))
                by_node[node].add(found[node.inputs[0].name], targets)
            samples += len(x)
        if samples == 0:
            raise UserError("data.calibration: no samples to reconstruct with (the dataset is "
                            "empty or smaller than the model's fixed batch)")
        for node in level:
            records.append(by_node[node].solve())
            stored.pop(node, None)
    return records, samples
