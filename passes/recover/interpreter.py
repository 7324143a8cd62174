"""An ONNX graph as a torch ``nn.Module``: the op-by-op interpreter the recover pass trains.

``OnnxModule(model)`` walks the graph's nodes in topological order and runs each with the torch
op of the same meaning (ONNX semantics: numpy broadcasting, ``pads = [b_1..b_n, e_1..e_n]``,
opset-dependent attributes-vs-inputs). It holds every float initializer of the model:

    trainable    (``nn.Parameter``): the weights of a layer, i.e. Conv W and B, Gemm B and C,
                 the constant operand of a MatMul, BatchNormalization scale and B, and the
                 constant operand of an Add that adds a bias to a Conv/Gemm/MatMul output;
    buffers      everything else (normalisation constants, Clip bounds, BN mean and variance,
                 shape tensors): they describe the graph, not what it learned.

Quantized graphs (QDQ, as the quantize pass writes them) train too: quantization-aware
fine-tuning. A weight stored as integers q with scale s and zero point z behind a
DequantizeLinear is trained as its float value w = s (q - z) (a parameter, in float units so the
optimizer's step means the same for every layer), and every forward uses its fake-quantized form

    DQ(w) = s (clamp(round(w / s) + z, q_min, q_max) - z)

with the straight-through estimator for the rounding (d round(u) / du := 1; zero outside the
clamp). q_min, q_max are the tensor's own integer range when it was given for 8-bit weights (so
a weight quantized to 7 bits for CPUs without VNNI stays 7-bit) and the integer type's range
otherwise (int32 biases). A QuantizeLinear on an activation computes clamp(round(x / s) + z)
with the same estimator, so training sees the rounding and clipping onnxruntime applies, with
the model's scales and zero points held fixed. ``trained_arrays()`` writes each such weight back
as clamp(round(w / s) + z) in its integer dtype: the same graph, scales and kernels.

BatchNormalization always uses its stored mean and variance (inference form, also while
training): the graph is fine-tuned as the ONNX file computes it, and the running statistics are
written back unchanged. ``trained_arrays()`` returns the parameters under their initializer
names, with the initializers' shapes and dtypes, for writing back into the same graph.

Ops outside ``SUPPORTED`` (and any node of a non-default domain, e.g. quantized ops) are refused
by ``check_supported`` with one line naming the op and the node, before anything runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from deployopt.core.errors import UserError

# -- what may be trained ----------------------------------------------------------------------------

#: op type -> input positions whose constant is a layer weight (trained).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1), "BatchNormalization": (1, 2)}
#: An Add of a constant onto the output of one of these is a bias (trained).
BIAS_AFTER = ("Conv", "Gemm", "MatMul")


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _is_float(value: ir.Value) -> bool:
    return value.const_value is not None and value.dtype in (
        ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


def _is_integer_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.dtype is not None and value.dtype in (
        ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32)


def quantized_weights(model: ir.Model) -> dict[str, ir.Node]:
    """Integer initializers read by a DequantizeLinear (QDQ weights and biases) -> that node."""
    found: dict[str, ir.Node] = {}
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and node.inputs:
            value = node.inputs[0]
            if value.name in model.graph.initializers and _is_integer_constant(value):
                found.setdefault(value.name, node)
    return found


def trainable_initializers(model: ir.Model) -> list[str]:
    """Names of the initializers the interpreter trains (module docstring), in graph order."""
    graph = model.graph
    names: list[str] = []
    quantized = quantized_weights(model)
    for node in graph:
        if node.op_type == "DequantizeLinear" and node.inputs and node.inputs[0] is not None \
                and node.inputs[0].name in quantized and node.inputs[0].name not in names:
            names.append(node.inputs[0].name)
            continue
        positions: Iterable[int] = WEIGHT_INPUTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
        if node.op_type == "Add" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
            a, b = node.inputs
            if a is not None and b is not None:
                if b.const_value is not None and a.producer() is not None and a.producer().op_type in BIAS_AFTER:
                    positions = (1,)
                elif a.const_value is not None and b.producer() is not None and b.producer().op_type in BIAS_AFTER:
                    positions = (0,)
        for i in positions:
            if i < len(node.inputs):
                value = node.inputs[i]
                if (value is not None and value.name in graph.initializers and _is_float(value)
                        and value.name not in names):
                    names.append(value.name)
    return names


# -- ops ------------------------------------------------------------------------------------------

def _int_list(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _conv_padding(node: ir.Node, x: torch.Tensor, w: torch.Tensor, strides, dilations) -> tuple[torch.Tensor, list[int]]:
    """Apply ONNX ``pads``/``auto_pad``: symmetric pads go to the conv, asymmetric ones to F.pad."""
    spatial = x.dim() - 2
    auto = _attr(node, "auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(spatial):
            size, k = x.shape[2 + i], (w.shape[2 + i] - 1) * dilations[i] + 1
            out = math.ceil(size / strides[i])
            total = max(0, (out - 1) * strides[i] + k - size)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
    elif auto == "VALID":
        pads_b = pads_e = [0] * spatial
    else:
        pads = _int_list(_attr(node, "pads", [0] * (2 * spatial)))
        pads_b, pads_e = pads[:spatial], pads[spatial:]
    if pads_b == pads_e:
        return x, pads_b
    torch_pads: list[int] = []
    for i in reversed(range(spatial)):
        torch_pads += [pads_b[i], pads_e[i]]
    return F.pad(x, torch_pads), [0] * spatial


def _conv(node, x, w, b=None):
    spatial = x.dim() - 2
    strides = _int_list(_attr(node, "strides", [1] * spatial))
    dilations = _int_list(_attr(node, "dilations", [1] * spatial))
    x, padding = _conv_padding(node, x, w, strides, dilations)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, w, b, stride=strides, padding=padding, dilation=dilations, groups=int(_attr(node, "group", 1)))


def _gemm(node, a, b, c=None):
    if _attr(node, "transA", 0):
        a = a.transpose(0, 1)
    if _attr(node, "transB", 0):
        b = b.transpose(0, 1)
    y = float(_attr(node, "alpha", 1.0)) * (a @ b)
    return y if c is None else y + float(_attr(node, "beta", 1.0)) * c


def _div(node, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _clip(node, x, low=None, high=None):
    if node.attributes.get("min") is not None or node.attributes.get("max") is not None:  # opset < 11
        low, high = _attr(node, "min"), _attr(node, "max")
    lo = None if low is None else (low.item() if isinstance(low, torch.Tensor) else low)
    hi = None if high is None else (high.item() if isinstance(high, torch.Tensor) else high)
    return torch.clamp(x, lo, hi)


def _softmax(node, x, opset: int):
    axis = int(_attr(node, "axis", -1 if opset >= 13 else 1))
    if opset >= 13:
        return torch.softmax(x, dim=axis)
    # Before opset 13 Softmax works on the input coerced to 2-D at ``axis``.
    axis = axis % x.dim()
    flat = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    return torch.softmax(flat, dim=1).reshape(x.shape)


def _pool_pads(node, x: torch.Tensor, kernel, strides, fill: float) -> tuple[torch.Tensor, list[int], bool]:
    spatial = x.dim() - 2
    auto = _attr(node, "auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto not in ("NOTSET", "VALID"):
        raise UserError(f"op {node.op_type} (node '{node.name}'): auto_pad {auto} is not supported by the "
                        f"ONNX-to-torch interpreter")
    pads = [0] * (2 * spatial) if auto == "VALID" else _int_list(_attr(node, "pads", [0] * (2 * spatial)))
    b, e = pads[:spatial], pads[spatial:]
    if b == e and all(p <= k // 2 for p, k in zip(b, kernel)):
        return x, b, False
    torch_pads: list[int] = []
    for i in reversed(range(spatial)):
        torch_pads += [b[i], e[i]]
    return F.pad(x, torch_pads, value=fill), [0] * spatial, True


def _max_pool(node, x):
    spatial = x.dim() - 2
    kernel = _int_list(_attr(node, "kernel_shape"))
    strides = _int_list(_attr(node, "strides", [1] * spatial))
    x, padding, _ = _pool_pads(node, x, kernel, strides, float("-inf"))
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
    return pool(x, kernel, strides, padding, dilation=_int_list(_attr(node, "dilations", [1] * spatial)),
                ceil_mode=bool(_attr(node, "ceil_mode", 0)))


def _avg_pool(node, x):
    spatial = x.dim() - 2
    kernel = _int_list(_attr(node, "kernel_shape"))
    strides = _int_list(_attr(node, "strides", [1] * spatial))
    include = bool(_attr(node, "count_include_pad", 0))
    x, padding, padded = _pool_pads(node, x, kernel, strides, 0.0)
    if padded and not include:
        raise UserError(f"op AveragePool (node '{node.name}'): asymmetric pads without count_include_pad are "
                        f"not supported by the ONNX-to-torch interpreter")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    return pool(x, kernel, strides, padding, ceil_mode=bool(_attr(node, "ceil_mode", 0)), count_include_pad=include)


def _batch_norm(node, x, scale, bias, mean, var):
    shape = [1, -1] + [1] * (x.dim() - 2)
    eps = float(_attr(node, "epsilon", 1e-5))
    factor = scale / torch.sqrt(var + eps)
    return x * factor.reshape(shape) + (bias - mean * factor).reshape(shape)


def _reshape(node, x, shape):
    target = _int_list(shape)
    if not _attr(node, "allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _axes(node, axes_input, opset: int, since: int):
    if opset >= since:
        return None if axes_input is None else _int_list(axes_input)
    value = _attr(node, "axes")
    return None if value is None else _int_list(value)


def _reduce_mean(node, x, axes=None, opset: int = 18):
    dims = _axes(node, axes, opset, 18)
    keep = bool(_attr(node, "keepdims", 1))
    if not dims:
        if _attr(node, "noop_with_empty_axes", 0):
            return x
        dims = list(range(x.dim()))
    return x.mean(dim=dims, keepdim=keep)


def _squeeze(node, x, axes=None, opset: int = 13):
    dims = _axes(node, axes, opset, 13)
    if dims is None:
        return x.squeeze()
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = x.squeeze(d)
    return x


def _unsqueeze(node, x, axes=None, opset: int = 13):
    dims = _axes(node, axes, opset, 13)
    rank = x.dim() + len(dims)
    for d in sorted(d % rank for d in dims):
        x = x.unsqueeze(d)
    return x


def _pad(node, x, pads=None, value=None, axes=None, opset: int = 18):
    mode = _attr(node, "mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if opset < 11:
        pads, fill = _int_list(_attr(node, "pads")), float(_attr(node, "value", 0.0))
    else:
        pads, fill = _int_list(pads), 0.0 if value is None else float(value.item())
    rank = x.dim()
    dims = list(range(rank)) if axes is None else [a % rank for a in _int_list(axes)]
    begin, end = [0] * rank, [0] * rank
    for i, d in enumerate(dims):
        begin[d], end[d] = pads[i], pads[len(dims) + i]
    torch_pads: list[int] = []
    for d in reversed(range(rank)):
        torch_pads += [begin[d], end[d]]
    while torch_pads[-2:] == [0, 0] and len(torch_pads) > 2:  # torch pads trailing dims only
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        return F.pad(x, torch_pads, value=fill)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None or len(torch_pads) // 2 > rank - 2:
        raise UserError(f"op Pad (node '{node.name}'): mode {mode} on these axes is not supported by the "
                        f"ONNX-to-torch interpreter")
    return F.pad(x, torch_pads, mode=torch_mode)


def _slice(node, x, starts, ends, axes=None, steps=None):
    starts, ends = _int_list(starts), _int_list(ends)
    axes = list(range(len(starts))) if axes is None else _int_list(axes)
    steps = [1] * len(starts) if steps is None else _int_list(steps)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st != 1:
            raise UserError(f"op Slice (node '{node.name}'): step {st} is not supported by the "
                            f"ONNX-to-torch interpreter")
        size = x.shape[a]
        index[a] = slice(max(-size, min(s, size)), max(-size - 1, min(e, size)))
    return x[tuple(index)]


def _shape(node, x):
    dims = list(x.shape)
    start, end = int(_attr(node, "start", 0)), _attr(node, "end")
    return torch.tensor(dims[start:None if end is None else int(end)], dtype=torch.int64)


def _gather(node, x, index):
    axis = int(_attr(node, "axis", 0)) % x.dim()
    index = torch.where(index < 0, index + x.shape[axis], index)
    return torch.index_select(x, axis, index.reshape(-1)).reshape(
        *x.shape[:axis], *index.shape, *x.shape[axis + 1:])


def _flatten(node, x):
    axis = int(_attr(node, "axis", 1)) % (x.dim() + 1) if x.dim() else 0
    lead = int(np.prod(x.shape[:axis], dtype=np.int64))
    return x.reshape(lead, -1)


def _cast(node, x):
    to = ir.DataType(int(_attr(node, "to")))
    dtypes = {ir.DataType.FLOAT: torch.float32, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
              ir.DataType.DOUBLE: torch.float64, ir.DataType.BOOL: torch.bool}
    if to not in dtypes:
        raise UserError(f"op Cast (node '{node.name}'): cast to {to.name} is not supported by the "
                        f"ONNX-to-torch interpreter")
    return x.to(dtypes[to])


#: Integer ranges of the quantized types (QuantizeLinear's output, DequantizeLinear's input).
#: int32's top is 2^31 - 128, the largest float32 below 2^31: float32 rounds 2^31 - 1 up to 2^31,
#: which no longer casts to int32 (an int32 bias of a near-dead channel, whose scale s_x s_w is
#: tiny, can reach the bound).
INTEGER_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535),
                  torch.int16: (-32768, 32767), torch.int32: (-2**31, 2**31 - 128)}


def _along(node, t: torch.Tensor, rank: int) -> torch.Tensor:
    """A scale or zero point shaped to broadcast along the node's ``axis`` (per-channel)."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    if _attr(node, "block_size", 0):
        raise UserError(f"op {node.op_type} (node '{node.name}'): blocked quantization is not supported by the "
                        f"ONNX-to-torch interpreter")
    shape = [1] * rank
    shape[int(_attr(node, "axis", 1)) % rank] = -1
    return t.reshape(shape)


def _round_ste(u: torch.Tensor) -> torch.Tensor:
    """round(u) forward, identity gradient (straight-through estimator)."""
    return u + (torch.round(u) - u).detach()


def fake_quantize(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """clamp(round(u / scale) + zero, low, high): the integers, as floats, with the STE gradient.
    A zero scale (a channel whose weights are all 0) divides by 1 instead: its dequantized value
    is 0 whatever the integer."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(_round_ste(u / safe) + zero, low, high)


def _quantize(node, x, scale, zero=None):
    low, high = INTEGER_RANGES[torch.uint8 if zero is None else zero.dtype]
    zero_f = torch.zeros(()) if zero is None else _along(node, zero.float(), x.dim())
    return fake_quantize(x, _along(node, scale, x.dim()), zero_f, low, high)


def _dequantize(node, q, scale, zero=None):
    zero_f = torch.zeros(()) if zero is None else _along(node, zero.float(), q.dim())
    return (q.float() - zero_f) * _along(node, scale, q.dim())


#: op type -> fn(node, *inputs, [opset=]) returning one tensor.
OPS: dict[str, Callable] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": lambda n, a, b: torch.matmul(a, b),
    "Add": lambda n, a, b: a + b, "Sub": lambda n, a, b: a - b, "Mul": lambda n, a, b: a * b, "Div": _div,
    "Relu": lambda n, x: F.relu(x), "Clip": _clip, "Sigmoid": lambda n, x: torch.sigmoid(x),
    "HardSigmoid": lambda n, x: torch.clamp(float(_attr(n, "alpha", 0.2)) * x + float(_attr(n, "beta", 0.5)), 0, 1),
    "HardSwish": lambda n, x: F.hardswish(x), "Tanh": lambda n, x: torch.tanh(x),
    "LeakyRelu": lambda n, x: F.leaky_relu(x, float(_attr(n, "alpha", 0.01))),
    "Softmax": _softmax, "GlobalAveragePool": lambda n, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "AveragePool": _avg_pool, "MaxPool": _max_pool, "Flatten": _flatten, "Reshape": _reshape,
    "Concat": lambda n, *xs: torch.cat(xs, dim=int(_attr(n, "axis"))), "BatchNormalization": _batch_norm,
    "Transpose": lambda n, x: x.permute(*(_int_list(_attr(n, "perm")) if n.attributes.get("perm") is not None
                                          else reversed(range(x.dim())))),
    "ReduceMean": _reduce_mean, "Pad": _pad, "Identity": lambda n, x: x, "Dropout": lambda n, x, *_: x,
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Shape": _shape, "Gather": _gather, "Slice": _slice,
    "Cast": _cast, "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
}
#: Ops whose function takes the model's opset (their attributes moved to inputs across opsets).
OPSET_DEPENDENT = ("Softmax", "ReduceMean", "Squeeze", "Unsqueeze", "Pad")
SUPPORTED: tuple[str, ...] = tuple(sorted(OPS)) + ("Constant",)
#: Ops whose extra outputs (MaxPool indices, BatchNormalization's training statistics, Dropout's
#: mask) the interpreter does not compute: refused when the graph reads them.
SINGLE_OUTPUT = ("MaxPool", "BatchNormalization", "Dropout")


def check_supported(model: ir.Model) -> None:
    """One-line ``UserError`` for the first node the interpreter cannot run (op and node named)."""
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            raise UserError(f"op {op} (node '{node.name}') is not supported by the ONNX-to-torch interpreter")
        if node.op_type in SINGLE_OUTPUT and any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            raise UserError(f"op {node.op_type} (node '{node.name}'): only its first output is supported by the "
                            f"ONNX-to-torch interpreter")


def _constant_node(node: ir.Node) -> np.ndarray:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        attr = node.attributes.get(key)
        if attr is not None:
            if key == "value":
                return np.asarray(attr.value.numpy())
            return np.asarray(attr.value, dtype=np.float32 if "float" in key else np.int64)
    raise UserError(f"op Constant (node '{node.name}'): only value, value_float(s) and value_int(s) are "
                    f"supported by the ONNX-to-torch interpreter")


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype in (np.float16, np.float64) or array.dtype.kind == "V":  # bfloat16 comes as void
        array = array.astype(np.float32)
    return torch.from_numpy(np.array(array, copy=True))


class OnnxModule(nn.Module):
    """Runs an ONNX graph (single or multiple inputs, first output returned) with torch ops.

    ``capture``: names of intermediate tensors kept in ``self.captured`` after each forward
    (feature matching reads them). Inputs are passed positionally in the graph's input order.
    """

    def __init__(self, model: ir.Model, capture: Iterable[str] = ()):
        super().__init__()
        check_supported(model)
        graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.input_names = [v.name for v in graph.inputs if v.name not in graph.initializers]
        self.output_names = [v.name for v in graph.outputs]
        self.trainable = trainable_initializers(model)
        self.params = nn.ParameterList()
        self._slot: dict[str, tuple[str, int]] = {}  # tensor name -> ("param"|"buffer", index)
        self._dtypes: dict[str, np.dtype] = {}
        buffers: list[torch.Tensor] = []
        #: quantized weight name -> (scale, zero point, q_min, q_max), shaped like the weight.
        self.quantized: dict[str, tuple[torch.Tensor, torch.Tensor, float, float]] = {}
        readers = quantized_weights(model)
        for name in self.trainable:
            array = graph.initializers[name].const_value.numpy()
            self._dtypes[name] = array.dtype
            self._slot[name] = ("param", len(self.params))
            if name in readers:
                self.quantized[name] = _quantization_of(readers[name], array)
                scale, zero, _, _ = self.quantized[name]
                self.params.append(nn.Parameter((_as_tensor(array).float() - zero) * scale))
            else:
                self.params.append(nn.Parameter(_as_tensor(array)))
        for name, value in graph.initializers.items():
            if name not in self._slot and value.const_value is not None:
                self._slot[name] = ("buffer", len(buffers))
                buffers.append(_as_tensor(value.const_value.numpy()))
        self._plan: list[tuple[ir.Node, list[str | None], list[str]]] = []
        for node in graph:
            if node.op_type == "Constant":
                self._slot[node.outputs[0].name] = ("buffer", len(buffers))
                buffers.append(_as_tensor(_constant_node(node)))
                continue
            self._plan.append((node, [None if v is None else v.name for v in node.inputs], [node.outputs[0].name]))
        for i, buffer in enumerate(buffers):
            self.register_buffer(f"const_{i}", buffer, persistent=False)
        self._buffer_count = len(buffers)
        known = set(self._slot) | set(self.input_names) | {o for _, _, outs in self._plan for o in outs}
        missing = [c for c in capture if c not in known]
        if missing:
            raise UserError(f"features: tensor '{missing[0]}' is not in the model")
        self.capture = list(capture)
        self.captured: dict[str, torch.Tensor] = {}
        # Values dropped after the step that reads them last: without it, evaluation in no_grad
        # mode holds every activation of the batch at once (EfficientNet-Lite0 on 440 crops at
        # 224x224 took 24 GB). Training is unchanged: autograd keeps what backward needs.
        kept = {self.output_names[0], *self.capture}
        last_read = {name: step for step, (_, ins, _) in enumerate(self._plan) for name in ins if name}
        self._release: list[list[str]] = [[] for _ in self._plan]
        for name, step in last_read.items():
            if name not in kept and name not in self._slot:
                self._release[step].append(name)

    def parameter(self, name: str) -> nn.Parameter:
        kind, index = self._slot[name]
        if kind != "param":
            raise KeyError(name)
        return self.params[index]

    def _constant(self, name: str) -> torch.Tensor:
        kind, index = self._slot[name]
        return self.params[index] if kind == "param" else getattr(self, f"const_{index}")

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs))
        for (node, in_names, out_names), release in zip(self._plan, self._release):
            args = [None if n is None or n == "" else (env[n] if n in env else self._constant(n)) for n in in_names]
            while args and args[-1] is None:  # trailing optional inputs left out
                args.pop()
            fn = OPS[node.op_type]
            if node.op_type == "DequantizeLinear" and in_names[0] in self.quantized:
                scale, zero, low, high = self.quantized[in_names[0]]
                out = (fake_quantize(args[0], scale, zero, low, high) - zero) * scale
            elif node.op_type in OPSET_DEPENDENT:
                out = fn(node, *args, opset=self.opset)
            else:
                out = fn(node, *args)
            env[out_names[0]] = out
            for name in release:
                del env[name]
        self.captured = {name: (env[name] if name in env else self._constant(name)) for name in self.capture}
        return env[self.output_names[0]] if self.output_names[0] in env else self._constant(self.output_names[0])

    def trained_arrays(self) -> dict[str, np.ndarray]:
        """Every trainable initializer's current value, in its original dtype and shape (quantized
        weights as their integers, clamp(round(w / s) + z))."""
        arrays = {}
        with torch.no_grad():
            for name in self.trainable:
                value = self.parameter(name).detach()
                if name in self.quantized:
                    scale, zero, low, high = self.quantized[name]
                    value = fake_quantize(value, scale, zero, low, high)
                arrays[name] = value.cpu().numpy().astype(self._dtypes[name], copy=True)
        return arrays


def _quantization_of(reader: ir.Node, array: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Scale, zero point (shaped to broadcast over ``array``) and integer range of a QDQ weight."""
    def constant(i: int) -> torch.Tensor | None:
        if i >= len(reader.inputs) or reader.inputs[i] is None:
            return None
        value = reader.inputs[i]
        if value.const_value is None:
            raise UserError(f"op DequantizeLinear (node '{reader.name}'): a scale or zero point computed at run "
                            f"time is not supported by the ONNX-to-torch interpreter")
        return _as_tensor(value.const_value.numpy())

    rank = array.ndim
    scale = _along(reader, constant(1).float(), rank)
    zero_t = constant(2)
    zero = torch.zeros(()) if zero_t is None else _along(reader, zero_t.float(), rank)
    if array.dtype in (np.int8, np.uint8):
        # The quantizer's own range for this tensor (7 bits with reduce_range): trained weights
        # must not leave it, or the integer kernels it was chosen for would saturate.
        if array.dtype == np.int8:  # symmetric: the larger magnitude bounds both sides
            bound = float(np.abs(array.astype(np.int16)).max())
            low, high = max(-bound, -128.0), min(bound, 127.0)
        else:
            low, high = float(array.min()), float(array.max())
    else:
        low, high = INTEGER_RANGES[_as_tensor(array[:0]).dtype]
    return scale, zero, low, high
