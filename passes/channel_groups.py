"""Channel groups: which tensors of an ONNX graph share one channel axis, and what removing a
channel from them touches.

Structured pruning removes channel ``c`` of a tensor ``x [N, C, ...]`` (axis 1 in NCHW and in
``[N, C]`` after pooling). That is only legal when every tensor that is elementwise tied to ``x``
loses the same channel, and every layer that creates or consumes those channels is sliced the
same way. A *channel group* is that equivalence class. It is found by union-find over the graph's
values, where an op joins its input's and its output's classes when it maps channel ``c`` to
channel ``c`` (``y_c = f(x_c)``):

    BatchNormalization, Relu, Clip (ReLU6), HardSwish, HardSigmoid, Sigmoid, LeakyRelu, PRelu,
    pooling, Reduce* over spatial axes, Pad/Resize of spatial axes, Squeeze/Unsqueeze of
    spatial axes, Flatten/Reshape of an ``[N, C, 1, 1]`` map, Dropout, Identity;
    depthwise Conv (``group == C``, one filter per channel: ``y_c = w_c ⊛ x_c``);
    elementwise Add/Mul/Sub/Div/Max/Min with two tensor operands of the same channel count
    (residual ``y = F(x) + x`` and SiLU ``x·σ(x)`` tie both operands' channels).

Around a group sit the layers that change when a channel goes:

    sources   Conv (group 1) / Gemm / MatMul producing the channels: output rows of W (and b);
    sinks     Conv (group 1) / Gemm / MatMul contracting over them: input columns of W. After a
              Flatten of an ``[N, C, H, W]`` map channel ``c`` owns the ``H·W`` columns
              ``c·HW … c·HW + HW − 1`` of the following Gemm (``block = H·W``);
    tied      per-channel parameters on the way: BN γ/β/μ/σ², depthwise W/b (and ``group``),
              PRelu slopes and constant per-channel operands of elementwise ops;
    shapes    constant Reshape targets that spell out the channel count.

A Concat along channels makes a *derived* group: its channels are the concatenation of its
inputs' groups at offsets ``0, C_1, C_1 + C_2, …``, so it is sliced by the union of their kept
indices shifted by the offsets and is never ranked by itself.

A group is left whole, with the reason recorded, when it contains anything that cannot be mapped:
a graph input or output (the model's interface keeps its shapes), an op that mixes or reorders
channels (Softmax over channels, Transpose, Split, Slice, grouped Conv, Reshape to another
layout, unknown domains), a layer whose weight is not a constant, or an unknown channel count.
When a derived group is whole its inputs' groups are whole too.

Written by hand: no library maps channel dependencies on an ONNX graph (Torch-Pruning's
``DependencyGraph`` does it on a traced torch module; onnx_ir supplies the graph and values).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

#: y_c = f(x_c): one tensor input (plus scalar parameters), output 0 tied to input 0.
UNARY = frozenset({
    "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Gelu", "Erf", "Mish", "ThresholdedRelu", "Identity", "Abs",
    "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Cast",
    "Dropout",
})
#: Elementwise with numpy broadcasting: tensor operands of equal channel count are tied.
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu"})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
                   "GlobalLpPool"})
REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd",
                     "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})


@dataclasses.dataclass(eq=False)
class Slice:
    """Constant input ``node.inputs[input_index]`` loses entries along ``axis``: channel ``c``
    owns the ``block`` consecutive entries starting at ``c·block``."""

    node: ir.Node
    input_index: int
    axis: int
    block: int = 1


@dataclasses.dataclass(eq=False)
class ShapeFix:
    """Constant Reshape target whose entry ``position`` is ``channels·block``."""

    node: ir.Node
    position: int
    block: int


@dataclasses.dataclass(eq=False)
class Sink:
    """A Conv/Gemm/MatMul contracting over the group's channels (``block`` columns each)."""

    node: ir.Node
    block: int = 1


@dataclasses.dataclass(eq=False)
class Part:
    """One input of a channel Concat: ``group`` (None for a constant input) at ``offset``."""

    group: ChannelGroup | None
    offset: int
    channels: int


@dataclasses.dataclass(eq=False)
class ChannelGroup:
    index: int
    channels: int = 0
    values: list[ir.Value] = dataclasses.field(default_factory=list)
    sources: list[ir.Node] = dataclasses.field(default_factory=list)
    sinks: list[Sink] = dataclasses.field(default_factory=list)
    slices: list[Slice] = dataclasses.field(default_factory=list)
    depthwise: list[ir.Node] = dataclasses.field(default_factory=list)
    shape_fixes: list[ShapeFix] = dataclasses.field(default_factory=list)
    #: Flatten outputs [N, C·S] fed by this group (their shapes change with it).
    reshaped: list[ir.Value] = dataclasses.field(default_factory=list)
    #: For a Concat output: its inputs' groups in order (the group is derived from them).
    parts: list[Part] = dataclasses.field(default_factory=list)
    #: Derived (Concat output) groups this group is a part of, with its offset there.
    concat_users: list[tuple[ChannelGroup, int]] = dataclasses.field(default_factory=list)
    #: Why the group must stay whole; empty when it may be pruned.
    reasons: list[str] = dataclasses.field(default_factory=list)

    @property
    def derived(self) -> bool:
        return bool(self.parts)

    @property
    def whole(self) -> bool:
        return bool(self.reasons)

    @property
    def relevant(self) -> bool:
        """A group the user would call a channel group: it has layers that make its channels."""
        return bool(self.sources or self.parts)

    @property
    def kinds(self) -> list[str]:
        kinds = []
        if len(self.sources) > 1:
            kinds.append("residual")
        if self.depthwise:
            kinds.append("depthwise")
        if self.parts or self.concat_users:
            kinds.append("concat")
        if any(s.block > 1 for s in self.sinks):
            kinds.append("flatten")
        return kinds or ["plain"]

    @property
    def label(self) -> str:
        names = [n.name or n.op_type for n in self.sources]
        if not names and self.parts:
            names = ["concat(" + ", ".join(p.group.label if p.group else "const" for p in self.parts) + ")"]
        if len(names) > 3:
            return ", ".join(names[:3]) + f" (+{len(names) - 3} more)"
        return ", ".join(names) or f"group {self.index}"

    def block(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)


# -- small helpers -----------------------------------------------------------------------------

def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (initializer or Constant node), None when it is computed
    or a graph input (a user may feed a graph input, so it is not a constant)."""
    if value is None or value.is_graph_input():
        return None
    producer = value.producer()
    if producer is not None and producer.op_type == "Identity" and producer.domain in ("", "ai.onnx"):
        return const_array(producer.inputs[0])  # the torch exporter shares weights this way
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    return None if tensor is None else tensor.numpy()


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def dim(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.as_ints())


def _describe(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


# -- the analysis --------------------------------------------------------------------------------

class _Analysis:
    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.parent: dict[ir.Value, ir.Value] = {}
        self.facts: list[tuple[ir.Value, str, object]] = []  # (value, kind, payload)
        self.concats: list[tuple[ir.Node, ir.Value, list[tuple[ir.Value | None, int]]]] = []
        # Flatten/Reshape output of a spatial map -> (its input, block) when every reader is a
        # Gemm/MatMul that can take sliced column blocks.
        self.flattened: dict[ir.Value, tuple[ir.Value, int]] = {}

    # union-find over values
    def find(self, v: ir.Value) -> ir.Value:
        self.parent.setdefault(v, v)
        root = v
        while self.parent[root] is not root:
            root = self.parent[root]
        while self.parent[v] is not root:
            self.parent[v], v = root, self.parent[v]
        return root

    def union(self, a: ir.Value, b: ir.Value) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[rb] = ra

    def fact(self, value: ir.Value, kind: str, payload: object) -> None:
        self.find(value)
        self.facts.append((value, kind, payload))

    def block(self, value: ir.Value | None, reason: str) -> None:
        if value is not None and const_array(value) is None:
            self.fact(value, "block", reason)
            if value in self.flattened:  # a blocked reader of a Flatten blocks what it flattens
                self.fact(self.flattened[value][0], "block", reason)

    def block_all(self, node: ir.Node, reason: str) -> None:
        for v in list(node.inputs) + list(node.outputs):
            self.block(v, reason)

    # -- visiting ------------------------------------------------------------------------------
    def run(self) -> list[ChannelGroup]:
        nodes = list(self.graph)
        for node in nodes:
            self._find_flatten(node)
        for node in nodes:
            self._visit(node)
        for v in self.graph.inputs:
            self.block(v, f"contains the graph input '{v.name}'")
        for v in self.graph.outputs:
            self.block(v, f"reaches the graph output '{v.name}'")
        return self._resolve()

    def _visit(self, node: ir.Node) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            self.block_all(node, f"meets {_describe(node)} of domain '{node.domain}'")
        elif op == "Conv":
            self._conv(node)
        elif op == "Gemm":
            self._gemm(node)
        elif op == "MatMul":
            self._matmul(node)
        elif op == "BatchNormalization":
            self._batchnorm(node)
        elif op in UNARY:
            self._unary(node)
        elif op in ELEMENTWISE:
            self._elementwise(node)
        elif op in POOLS:
            self._tie_first(node)
        elif op in REDUCES:
            self._reduce(node)
        elif op in ("Squeeze", "Unsqueeze"):
            self._squeeze(node)
        elif op == "Pad":
            self._pad(node)
        elif op in ("Resize", "Upsample"):
            self._resize(node)
        elif op == "Concat":
            self._concat(node)
        elif op == "Shape":
            self._shape(node)
        elif op in ("Constant", "Flatten", "Reshape"):
            pass  # Flatten/Reshape were mapped by _find_flatten
        else:
            self.block_all(node, f"meets {_describe(node)}, which can mix or reorder channels")
            self._block_captured(node)

    def _block_captured(self, node: ir.Node) -> None:
        """Values of this graph read inside a subgraph (If/Loop/Scan bodies) stay whole."""
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                subgraphs = [attr.as_graph()]
            elif attr.type == ir.AttributeType.GRAPHS:
                subgraphs = list(attr.as_graphs())
            else:
                continue
            for sub in subgraphs:
                for inner in ir.traversal.RecursiveGraphIterator(sub):
                    for v in inner.inputs:
                        if v is not None and v.graph is self.graph:
                            self.block(v, f"is read inside the body of {_describe(node)}")

    def _tie_first(self, node: ir.Node) -> None:
        """Tie output 0 to input 0; a second output in use (MaxPool indices, Dropout mask) is
        something we cannot slice."""
        x, y = node.inputs[0], node.outputs[0]
        if x is None:
            return
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            self.block_all(node, f"meets {_describe(node)} with a second output in use")
            return
        self.union(x, y)

    def _weight(self, node: ir.Node, index: int) -> np.ndarray | None:
        return const_array(node.inputs[index]) if len(node.inputs) > index else None

    def _conv(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        w = self._weight(node, 1)
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        if w is None or (has_bias and self._weight(node, 2) is None):
            self.block_all(node, f"meets {_describe(node)} whose weight or bias is not a constant")
            return
        groups = attr_int(node, "group", 1)
        cin = dim(x, 1)
        if groups == 1:
            self.fact(x, "sink", Sink(node))
            self.fact(x, "slice", Slice(node, 1, 1))
            self.fact(y, "source", node)
            self.fact(y, "slice", Slice(node, 1, 0))
            if has_bias:
                self.fact(y, "slice", Slice(node, 2, 0))
        elif cin is not None and groups == cin and w.shape[0] == cin and w.shape[1] == 1:
            self.union(x, y)
            self.fact(y, "depthwise", node)
            self.fact(y, "slice", Slice(node, 1, 0))
            if has_bias:
                self.fact(y, "slice", Slice(node, 2, 0))
        else:
            self.block_all(node, f"meets grouped {_describe(node)} (group={groups}), which ties "
                                 "channels in blocks")

    def _dense_input(self, node: ir.Node, a: ir.Value, weight_axis: int) -> None:
        """Register ``a`` (input 0 of Gemm/MatMul) as contracted along the weight's ``weight_axis``."""
        if a in self.flattened:
            source, block = self.flattened[a]
            self.fact(source, "sink", Sink(node, block))
            self.fact(source, "slice", Slice(node, 1, weight_axis, block))
        else:
            self.fact(a, "sink", Sink(node))
            self.fact(a, "slice", Slice(node, 1, weight_axis))

    def _gemm(self, node: ir.Node) -> None:
        a, y = node.inputs[0], node.outputs[0]
        w = self._weight(node, 1)
        c_in = node.inputs[2] if len(node.inputs) > 2 else None
        c = const_array(c_in) if c_in is not None else None
        if w is None or attr_int(node, "transA", 0) or (c_in is not None and c is None) or w.ndim != 2:
            self.block_all(node, f"meets {_describe(node)} with a transposed input or a "
                                 "non-constant weight")
            return
        trans_b = attr_int(node, "transB", 0)
        n_out = w.shape[0] if trans_b else w.shape[1]
        self._dense_input(node, a, 1 if trans_b else 0)
        self.fact(y, "source", node)
        self.fact(y, "slice", Slice(node, 1, 0 if trans_b else 1))
        if c is not None and c.size > 1:
            if c.ndim == 1 and c.shape[0] == n_out:
                self.fact(y, "slice", Slice(node, 2, 0))
            elif c.ndim == 2 and c.shape[1] == n_out:
                self.fact(y, "slice", Slice(node, 2, 1))
            else:
                self.block(y, f"meets {_describe(node)} whose bias of shape {list(c.shape)} does "
                              "not map onto its outputs")

    def _matmul(self, node: ir.Node) -> None:
        a, y = node.inputs[0], node.outputs[0]
        w = self._weight(node, 1)
        if w is None or w.ndim != 2 or rank(a) != 2:
            self.block_all(node, f"meets {_describe(node)} that is not a [N, K] x constant [K, M] "
                                 "product")
            return
        self._dense_input(node, a, 0)
        self.fact(y, "source", node)
        self.fact(y, "slice", Slice(node, 1, 1))

    def _batchnorm(self, node: ir.Node) -> None:
        if any(self._weight(node, i) is None for i in range(1, 5)):
            self.block_all(node, f"meets {_describe(node)} with non-constant statistics")
            return
        if len(node.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            self.block_all(node, f"meets {_describe(node)} in training mode")
            return
        self.union(node.inputs[0], node.outputs[0])
        for i in range(1, 5):
            self.fact(node.outputs[0], "slice", Slice(node, i, 0))

    def _unary(self, node: ir.Node) -> None:
        for extra in node.inputs[1:]:  # Clip min/max, Dropout ratio/training_mode: scalars only
            if extra is not None and extra.shape is not None and math.prod(
                    d if isinstance(d, int) else 2 for d in extra.shape) > 1:
                self.block_all(node, f"meets {_describe(node)} with a non-scalar parameter")
                return
        self._tie_first(node)

    def _elementwise(self, node: ir.Node) -> None:
        y = node.outputs[0]
        out_rank, channels = rank(y), dim(y, 1)
        if out_rank is None or out_rank < 2 or channels is None:
            self.block_all(node, f"meets {_describe(node)} whose output shape is unknown")
            return
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            array = const_array(v)
            shape = list(array.shape) if array is not None else (
                None if v.shape is None else [d if isinstance(d, int) else None for d in v.shape])
            if shape is None:
                self.block_all(node, f"meets {_describe(node)} with an operand of unknown shape")
                return
            if math.prod(d if d is not None else 2 for d in shape) == 1:
                continue  # a scalar
            if array is None and len(shape) != out_rank:
                # numpy broadcasting would land this tensor's channel axis on another axis
                self.block_all(node, f"meets {_describe(node)} with operands of different ranks")
                return
            axis = 1 - (out_rank - len(shape))  # the operand axis broadcast onto channels
            if axis < 0 or shape[axis] == 1:
                continue  # the same for every channel
            if shape[axis] != channels:
                self.block_all(node, f"meets {_describe(node)} with an operand of shape {shape} "
                                     "that does not map onto channels")
                return
            if array is not None:
                self.fact(y, "slice", Slice(node, i, axis))  # per-channel constant (PRelu slope)
            else:
                self.union(v, y)

    def _axes(self, node: ir.Node, input_index: int) -> list[int] | None:
        axes = _attr_ints(node, "axes")
        if axes is None and len(node.inputs) > input_index and node.inputs[input_index] is not None:
            array = const_array(node.inputs[input_index])
            if array is None:
                return None
            axes = [int(a) for a in np.atleast_1d(array)]
        return axes

    def _reduce(self, node: ir.Node) -> None:
        x = node.inputs[0]
        r = rank(x)
        axes = self._axes(node, 1)
        computed = axes is None and len(node.inputs) > 1 and node.inputs[1] is not None
        if r is None or computed:
            self.block_all(node, f"meets {_describe(node)} over unknown axes")
            return
        if not axes:
            if not attr_int(node, "noop_with_empty_axes", 0):
                self.block_all(node, f"meets {_describe(node)} over all axes, which mixes channels")
                return
            axes = []
        axes = sorted(a % r for a in axes)
        if 1 in axes or (0 in axes and not attr_int(node, "keepdims", 1)):
            self.block_all(node, f"meets {_describe(node)} over axes {axes}, which mixes channels")
            return
        self.union(x, node.outputs[0])

    def _squeeze(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        axes = self._axes(node, 1)
        r = rank(x) if node.op_type == "Squeeze" else rank(y)
        if axes is None or r is None or any(a % r <= 1 for a in axes):
            self.block_all(node, f"meets {_describe(node)} over the batch or channel axis")
            return
        self.union(x, y)

    def _pad(self, node: ir.Node) -> None:
        x = node.inputs[0]
        r = rank(x)
        pads = _attr_ints(node, "pads")
        if pads is None and len(node.inputs) > 1:
            array = const_array(node.inputs[1])
            pads = None if array is None else [int(p) for p in array]
        axes = self._axes(node, 3) if len(node.inputs) > 3 and node.inputs[3] is not None else (
            None if r is None else list(range(r)))
        if pads is None or axes is None or r is None or len(pads) != 2 * len(axes):
            self.block_all(node, f"meets {_describe(node)} with computed pads")
            return
        n = len(axes)
        for k, a in enumerate(axes):
            if a % r <= 1 and (pads[k] or pads[k + n]):
                self.block_all(node, f"meets {_describe(node)} padding the batch or channel axis")
                return
        self.union(x, node.outputs[0])

    def _resize(self, node: ir.Node) -> None:
        index = 1 if node.op_type == "Upsample" else 2
        scales = const_array(node.inputs[index]) if len(node.inputs) > index and node.inputs[index] is not None else None
        uses_sizes = node.op_type == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None
        if scales is None or scales.size < 2 or scales[0] != 1 or scales[1] != 1 or uses_sizes:
            self.block_all(node, f"meets {_describe(node)} without constant spatial-only scales")
            return
        self.union(node.inputs[0], node.outputs[0])

    def _concat(self, node: ir.Node) -> None:
        y = node.outputs[0]
        r = rank(y)
        axis = attr_int(node, "axis", 0)
        if r is None or axis % r != 1:
            self.block_all(node, f"meets {_describe(node)} along an axis other than channels")
            return
        parts: list[tuple[ir.Value | None, int]] = []
        for v in node.inputs:
            c = dim(v, 1)
            if c is None:
                self.block_all(node, f"meets {_describe(node)} with an input of unknown channels")
                return
            parts.append((None if const_array(v) is not None else v, c))
        self.find(y)
        for v, _ in parts:
            if v is not None:
                self.find(v)
        self.concats.append((node, y, parts))

    def _shape(self, node: ir.Node) -> None:
        # Shape only reads sizes; it is harmless unless something reads the channel count.
        x, out = node.inputs[0], node.outputs[0]
        r = rank(x)
        dims = None if r is None else list(range(r))[attr_int(node, "start", 0):
                                                      attr_int(node, "end", r) if "end" in node.attributes else r]
        for use in out.uses():
            reader = use.node
            index = (const_array(reader.inputs[1])
                     if reader.op_type == "Gather" and len(reader.inputs) > 1 else None)
            if dims is None or index is None or attr_int(reader, "axis", 0) != 0 or any(
                    dims[int(i)] == 1 for i in np.atleast_1d(index)):
                self.block(x, f"meets {_describe(node)} whose result reads the channel count")
                return

    def _find_flatten(self, node: ir.Node) -> None:
        """Pre-pass: Flatten/Reshape that maps ``[N, C, *S]`` to ``[N, C·ΠS]`` or ``[N, C]`` to
        ``[N, C, 1, 1]``; record how channels map through it (or block it)."""
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Flatten", "Reshape"):
            return
        x, y = node.inputs[0], node.outputs[0]
        shape_in, shape_out = x.shape, y.shape
        reason = f"meets {_describe(node)} to a layout that does not keep channels on axis 1"
        if shape_in is None or shape_out is None or len(shape_in) < 2 or len(shape_out) < 2:
            self.block_all(node, reason)
            return
        dims_in = [d if isinstance(d, int) else None for d in shape_in]
        dims_out = [d if isinstance(d, int) else None for d in shape_out]
        if None in dims_in[1:] or None in dims_out[1:]:
            self.block_all(node, reason)
            return
        if node.op_type == "Flatten" and attr_int(node, "axis", 1) % len(dims_in) != 1:
            self.block_all(node, reason)
            return
        channels = dims_in[1]
        spatial_in, spatial_out = math.prod(dims_in[2:]), math.prod(dims_out[2:])
        if dims_out[1] * spatial_out != channels * spatial_in:
            self.block_all(node, reason)
            return
        if len(dims_out) == 2:
            block = spatial_in  # [N, C, *S] -> [N, C·S]
        elif len(dims_in) == 2 and dims_out[1] == channels and spatial_out == 1:
            block = 1  # [N, C] -> [N, C, 1, 1]
        else:
            self.block_all(node, reason)
            return
        if node.op_type == "Reshape":
            target = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if target is None or target.ndim != 1 or len(target) != len(dims_out):
                self.block_all(node, f"meets {_describe(node)} with a computed target shape")
                return
            copies = int(target[1]) == 0 and not attr_int(node, "allowzero", 0)
            if int(target[1]) != -1 and not copies:
                if int(target[1]) != dims_out[1]:
                    self.block_all(node, reason)
                    return
                self.fact(x, "shape_fix", ShapeFix(node, 1, block))
        if block == 1:
            self.union(x, y)
            return
        for use in y.uses():
            reader = use.node
            ok = use.idx == 0 and (
                (reader.op_type == "Gemm" and not attr_int(reader, "transA", 0))
                or (reader.op_type == "MatMul")) and self._weight(reader, 1) is not None
            if not ok:
                self.block(x, f"meets {_describe(node)} whose result feeds {_describe(reader)}")
                return
        if y.is_graph_output():
            self.block(x, f"reaches the graph output '{y.name}' through {_describe(node)}")
            return
        self.flattened[y] = (x, block)
        self.fact(x, "reshaped", y)

    # -- groups --------------------------------------------------------------------------------
    def _resolve(self) -> list[ChannelGroup]:
        groups: dict[ir.Value, ChannelGroup] = {}

        def group_of(v: ir.Value) -> ChannelGroup:
            root = self.find(v)
            if root not in groups:
                groups[root] = ChannelGroup(index=len(groups))
            return groups[root]

        for v in list(self.parent):
            group_of(v).values.append(v)
        for v, kind, payload in self.facts:
            g = group_of(v)
            if kind == "block":
                g.block(payload)
            elif kind == "source":
                g.sources.append(payload)
            elif kind == "sink":
                g.sinks.append(payload)
            elif kind == "slice":
                g.slices.append(payload)
            elif kind == "depthwise":
                g.depthwise.append(payload)
            elif kind == "shape_fix":
                g.shape_fixes.append(payload)
            elif kind == "reshaped":
                g.reshaped.append(payload)

        for g in groups.values():
            counts = {dim(v, 1) for v in g.values if v not in self.flattened}
            if None in counts or len(counts) != 1:
                g.block(f"has an unknown or inconsistent channel count ({sorted(map(str, counts))})")
            else:
                g.channels = counts.pop()

        for node, y, parts in self.concats:
            out = group_of(y)
            if out.sources or out.parts:
                reason = f"joins the output of {_describe(node)} with other producers of channels"
                out.block(reason)
                for v, _ in parts:
                    if v is not None:
                        group_of(v).block(reason)
                continue
            offset = 0
            for v, c in parts:
                part = None if v is None else group_of(v)
                out.parts.append(Part(part, offset, c))
                if part is not None:
                    part.concat_users.append((out, offset))
                offset += c

        for g in groups.values():
            if g.sources and not g.sinks and not g.concat_users and not g.whole:
                g.block("its channels reach no Conv/Gemm/MatMul that could drop them")

        # A whole derived group keeps its parts whole (to a fixed point: Concats can nest).
        changed = True
        while changed:
            changed = False
            for g in groups.values():
                if g.derived and g.whole:
                    for p in g.parts:
                        if p.group is not None and not p.group.whole:
                            p.group.block(f"feeds a Concat whose output is left whole "
                                          f"({g.reasons[0]})")
                            changed = True
        return [g for g in groups.values() if g.relevant]


def find_channel_groups(graph: ir.Graph) -> list[ChannelGroup]:
    """All channel groups of ``graph`` that have producing layers (whole ones carry reasons).

    Needs value shapes (run shape inference first) and a topologically sorted graph."""
    return _Analysis(graph).run()
