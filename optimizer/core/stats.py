"""Model statistics (``model_stats``) and the ``deployopt inspect`` verb.

Counts, for an ONNX model:

- ``params``: elements of every numeric (float or integer) initializer and Constant-node tensor,
  ``nonzero_params`` the non-zero ones among them (what magnitude pruning changes);
- ``macs``: multiply-accumulates of the compute layers, from shapes found by ONNX shape
  inference. With Y the output, X the input and W the weight:

      Conv           N·C_out·H_out·W_out·(C_in/group)·kH·kW  = |Y| · |W[1:]|
      ConvTranspose  N·C_in·H_in·W_in·(C_out/group)·kH·kW    = |X| · |W[1:]|
      Gemm / MatMul  M·N·K                                   = |Y| · K

  (|S| is the product of the dims of S, any number of spatial dims.) The integer forms
  (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger, QGemm) count the same way, as do
  QDQ models, whose Conv/Gemm/MatMul read their weight through DequantizeLinear. A dynamic
  batch is counted as 1 (MACs per sample); a layer whose shape has any other dynamic dim gets
  ``macs: None`` with a note, and then the total is None too, since a partial sum would
  compare wrongly across models;
- ``bytes``: the serialized size (the file plus its external data when ``path`` is on disk),
  ``bytes_zip``: its raw-deflate size at zlib level 6, i.e. what zipping the file gives; zeros
  and repeated values compress, so this is where unstructured sparsity shows up;
- ``ops``: ``{op_type: count}``, ``domain.op_type`` outside the ONNX domain; ``quantized_ops``:
  quantization nodes by type and how many compute layers run quantized.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import pathlib
import zlib
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from deployopt.core.contain import confined
from deployopt.core.errors import UserError, one_line

_DEFAULT_DOMAINS = ("", "ai.onnx")
_ZLIB_LEVEL = 6
_CHUNK = 1 << 22
_SMALL_TENSOR = 4096  # elements; shape inference gets the data of initializers up to this size
_ZIP_CACHE: dict[str, int] = {}  # content digest -> deflated size, oldest first
_ZIP_CACHE_SIZE = 16

# op -> (kind, input index of the activation, of the weight, of the bias (None: no bias))
_LAYERS: dict[tuple[str, str], tuple[str, int, int, int | None]] = {
    ("", "Conv"): ("conv", 0, 1, 2),
    ("", "ConvTranspose"): ("conv_transpose", 0, 1, 2),
    ("", "Gemm"): ("gemm", 0, 1, 2),
    ("", "MatMul"): ("matmul", 0, 1, None),
    ("", "QLinearConv"): ("conv", 0, 3, 8),
    ("", "ConvInteger"): ("conv", 0, 1, None),
    ("", "QLinearMatMul"): ("matmul", 0, 3, None),
    ("", "MatMulInteger"): ("matmul", 0, 1, None),
    ("com.microsoft", "QGemm"): ("gemm", 0, 3, 6),
}
_INTEGER_LAYER_OPS = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm"}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
              "MatMulInteger", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
              "MatMulNBits"}


# -- helpers shared with the passes ---------------------------------------------------------------
def op_key(domain: str, op_type: str) -> str:
    return op_type if domain in _DEFAULT_DOMAINS else f"{domain}.{op_type}"


def op_histogram(model: ir.Model) -> dict[str, int]:
    """``{op_type: count}`` over the graph and its subgraphs, domain-prefixed when not ONNX."""
    counts = collections.Counter(op_key(n.domain, n.op_type)
                                 for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return dict(sorted(counts.items()))


def is_quantization_op(op_type: str) -> bool:
    """Q/DQ and the integer operator forms (QLinear*, *Integer, QGemm, ...), any domain."""
    return op_type in _QUANT_OPS or op_type.startswith("QLinear")


# -- tensors ------------------------------------------------------------------------------------
def _graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _graphs(attr.as_graph())
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.as_graphs():
                    yield from _graphs(sub)


def _is_numeric(dtype: ir.DataType) -> bool:
    return dtype.is_floating_point() or dtype.is_integer()


def _constant_arrays(node: ir.Node) -> Iterator[np.ndarray]:
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.TENSOR:
            tensor = attr.as_tensor()
            if _is_numeric(tensor.dtype):
                yield tensor.numpy()
        elif attr.type in (ir.AttributeType.FLOAT, ir.AttributeType.INT):
            yield np.asarray([attr.value])
        elif attr.type in (ir.AttributeType.FLOATS, ir.AttributeType.INTS):
            yield np.asarray(list(attr.value))


def _weight_arrays(model: ir.Model) -> Iterator[np.ndarray]:
    for graph in _graphs(model.graph):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None and _is_numeric(tensor.dtype):
                yield tensor.numpy()
        for node in graph:
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                yield from _constant_arrays(node)


# -- bytes --------------------------------------------------------------------------------------
def _external_files(path: pathlib.Path) -> list[pathlib.Path]:
    """Distinct external-data files the model file at ``path`` refers to (read without data)."""
    header = onnx.load(str(path), load_external_data=False)
    files: dict[str, pathlib.Path] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(header):  # onnx's own walker
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if location:
                files.setdefault(location, path.parent / location)
    return [f for f in files.values() if f.is_file()]


def _deflated_size(chunks: Callable[[], Iterable[bytes]]) -> int:
    """Raw-deflate size (wbits -15: the payload a .zip stores, without zlib's wrapper).

    Deflate at level 6 runs at ~15-30 MB/s, seconds for a ResNet; the pipeline asks for the
    stats of the same model twice (after one pass = before the next), so results are cached by
    a content digest (hashing is ~20x faster than deflating).
    """
    digest = hashlib.blake2b(digest_size=20)
    for chunk in chunks():
        digest.update(chunk)
    key = digest.hexdigest()
    if key in _ZIP_CACHE:
        return _ZIP_CACHE[key]
    compressor = zlib.compressobj(_ZLIB_LEVEL, zlib.DEFLATED, -15)
    size = 0
    for chunk in chunks():
        for start in range(0, len(chunk), _CHUNK):
            size += len(compressor.compress(chunk[start:start + _CHUNK]))
    size += len(compressor.flush())
    _ZIP_CACHE[key] = size
    while len(_ZIP_CACHE) > _ZIP_CACHE_SIZE:
        _ZIP_CACHE.pop(next(iter(_ZIP_CACHE)))
    return size


def _file_chunks(files: list[pathlib.Path]) -> Iterator[bytes]:
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk


def _sizes(proto: onnx.ModelProto, model: ir.Model, path: str | None) -> tuple[int, int]:
    if path is not None and os.path.isfile(path):
        files = [pathlib.Path(path), *_external_files(pathlib.Path(path))]
        return sum(f.stat().st_size for f in files), _deflated_size(lambda: _file_chunks(files))
    # In memory: tensors still stored outside (an ir.Model read lazily) count with their bytes.
    external = [v.const_value for g in _graphs(model.graph) for v in g.initializers.values()
                if isinstance(v.const_value, ir.ExternalTensor)]
    try:
        blobs = [t.tobytes() for t in external]
    except OSError as e:
        raise UserError(f"model: cannot read external data: {e}") from e
    data = proto.SerializeToString()
    return len(data) + sum(map(len, blobs)), _deflated_size(lambda: [data, *blobs])


# -- shapes -------------------------------------------------------------------------------------
def _dims(type_proto: onnx.TypeProto) -> list[int | str | None] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in type_proto.tensor_type.shape.dim]


def _dtype_name(type_proto: onnx.TypeProto) -> str:
    if not type_proto.HasField("tensor_type"):
        return type_proto.WhichOneof("value") or "unknown"
    elem = type_proto.tensor_type.elem_type
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem).name
    except (KeyError, ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(elem).lower()


def _io(values: Iterable[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
    return [{"name": v.name, "shape": _dims(v.type), "dtype": _dtype_name(v.type)} for v in values]


def _shape_probe(proto: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """A copy for shape inference: dynamic batch fixed to 1, big weights without their data.

    Inference reads only the dims of big initializers, so they are copied without data
    (copying a ResNet's weights costs more than the inference itself).
    """
    graph = proto.graph
    probe = onnx.ModelProto(ir_version=proto.ir_version, opset_import=proto.opset_import,
                            functions=proto.functions)
    probe.graph.CopyFrom(onnx.GraphProto(name=graph.name, node=graph.node, input=graph.input,
                                         output=graph.output,
                                         sparse_initializer=graph.sparse_initializer))
    for tensor in graph.initializer:
        if math.prod(tensor.dims) <= _SMALL_TENSOR:
            probe.graph.initializer.append(tensor)
        else:
            probe.graph.initializer.append(onnx.TensorProto(
                name=tensor.name, dims=tensor.dims, data_type=tensor.data_type))
    initializers = {t.name for t in graph.initializer}
    for value in probe.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 1 and not dims[0].HasField("dim_value"):
            notes.append(f"input '{value.name}': dynamic batch dim '{dims[0].dim_param or '?'}' "
                         "counted as 1 (MACs per sample)")
            dims[0].Clear()
            dims[0].dim_value = 1
    return probe


def _shapes_of(graph: onnx.GraphProto) -> dict[str, list]:
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        dims = _dims(value.type)
        if dims is not None:
            shapes[value.name] = dims
    return shapes


def _onnx_shapes(probe: onnx.ModelProto, notes: list[str]) -> dict[str, list]:
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception as e:  # inference errors leave shapes unknown; MACs become None per layer
        notes.append(f"ONNX shape inference failed: {' '.join(str(e).split())[:200]}")
        return _shapes_of(probe.graph)
    return _shapes_of(inferred.graph)


def _symbolic_shapes(probe: onnx.ModelProto, notes: list[str]) -> dict[str, list] | None:
    """onnxruntime's symbolic shape inference: it evaluates shape arithmetic (Shape, Slice,
    Concat, ConstantOfShape, Reshape ... feeding Pad or Reshape) that ONNX's data propagation
    leaves unknown, e.g. the pads of PyTorch's dynamic-axes export of ZeroPad2d."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError as e:  # needs sympy (a torch dependency; onnxruntime's "symbolic" extra)
        notes.append(f"onnxruntime symbolic shape inference unavailable: {e}")
        return None
    try:
        # guess_output_rank: an op it does not know (com.microsoft.QGemm,
        # QLinearGlobalAveragePool) gets symbolic dims instead of aborting the whole inference.
        # It saves sym_shape_infer_temp.onnx into the current folder when it gets stuck: run it
        # in a scratch folder of its own so nothing lands in the user's folder.
        with tempfile.TemporaryDirectory(prefix="deployopt-shapes-") as scratch, confined(scratch):
            inferred = SymbolicShapeInference.infer_shapes(probe, auto_merge=True,
                                                           guess_output_rank=True)
    except Exception as e:
        notes.append(f"onnxruntime symbolic shape inference failed: {one_line(e, 200)}")
        return None
    return _shapes_of(inferred.graph) if inferred is not None else None


# -- layers -------------------------------------------------------------------------------------
def _prod(dims: Iterable[int]) -> int:
    return math.prod(int(d) for d in dims)


def _known(dims: list | None) -> bool:
    return dims is not None and all(isinstance(d, int) and d > 0 for d in dims)


def _layer_macs(kind: str, node: ir.Node, x: list | None, w: list | None,
                y: list | None) -> int | None:
    if kind == "conv":
        return _prod(y) * _prod(w[1:]) if _known(y) and _known(w) else None
    if kind == "conv_transpose":
        return _prod(x) * _prod(w[1:]) if _known(x) and _known(w) else None
    if kind == "gemm":
        if not (_known(x) and _known(w)) or len(x) != 2 or len(w) != 2:
            return None
        trans_a = node.attributes.get_int("transA", 0)
        trans_b = node.attributes.get_int("transB", 0)
        m, k = (x[1], x[0]) if trans_a else (x[0], x[1])
        n = w[0] if trans_b else w[1]
        return m * n * k
    # matmul: every output element is a K-long dot product (also for 1-D operands).
    if not (_known(x) and _known(y)) or not x:
        return None
    return _prod(y) * x[-1]


def _constant_source(value: ir.Value | None) -> tuple[bool, bool]:
    """(is a stored constant, comes through DequantizeLinear)."""
    if value is None:
        return False, False
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        inner, _ = _constant_source(producer.inputs[0])
        return inner, True
    if value.const_value is not None or value.is_initializer():
        return True, False
    return producer is not None and producer.op_type == "Constant", False


def _layers(model: ir.Model, shapes: dict[str, list]) -> list[dict[str, Any]]:
    layers = []
    for index, node in enumerate(model.graph):
        domain = "" if node.domain in _DEFAULT_DOMAINS else node.domain
        spec = _LAYERS.get((domain, node.op_type))
        if spec is None:
            continue
        kind, xi, wi, bi = spec

        def shape_of(i: int | None) -> list | None:
            if i is None or i >= len(node.inputs) or node.inputs[i] is None:
                return None
            return shapes.get(node.inputs[i].name)

        x, w = shape_of(xi), shape_of(wi)
        y = shapes.get(node.outputs[0].name)
        name = node.name or f"{node.op_type}_{index}"
        macs = _layer_macs(kind, node, x, w, y)
        params = 0
        weight_dq = False
        for i in (wi, bi):
            if i is None or i >= len(node.inputs):
                continue
            constant, through_dq = _constant_source(node.inputs[i])
            weight_dq |= through_dq and i == wi
            dims = shape_of(i)
            if constant and _known(dims):
                params += _prod(dims)
        quantized = ("integer" if node.op_type in _INTEGER_LAYER_OPS
                     else "qdq" if weight_dq else None)
        layers.append({"name": name, "op_type": op_key(node.domain, node.op_type),
                       "macs": macs, "params": params, "quantized": quantized,
                       "why": f"shapes: input {x}, weight {w}, output {y}"})
    return layers


def _quantized_summary(ops: dict[str, int], layers: list[dict[str, Any]]) -> dict[str, Any]:
    by_op = {k: n for k, n in ops.items() if is_quantization_op(k.rpartition(".")[2])}
    return {
        "by_op": by_op,
        "nodes": sum(by_op.values()),
        "integer_layers": sum(1 for layer in layers if layer["quantized"] == "integer"),
        "qdq_layers": sum(1 for layer in layers if layer["quantized"] == "qdq"),
        "float_layers": sum(1 for layer in layers if layer["quantized"] is None),
    }


# -- public -------------------------------------------------------------------------------------
def model_stats(model: ir.Model | onnx.ModelProto, path: str | None = None) -> dict[str, Any]:
    """Statistics of ``model`` with report.json's stats keys (path, bytes, bytes_zip, params,
    nonzero_params, macs, ops, opset) plus ir_version, opset_imports, inputs, outputs, nodes,
    layers, quantized_ops and notes. ``path``: the file the model was read from, if any."""
    if isinstance(model, onnx.ModelProto):
        proto, ir_model = model, ir.from_proto(model)
    else:
        proto, ir_model = ir.to_proto(model), model
    notes: list[str] = []

    params = nonzero = 0
    for array in _weight_arrays(ir_model):
        params += int(array.size)
        nonzero += int(np.count_nonzero(array))

    probe = _shape_probe(proto, notes)
    shapes = _onnx_shapes(probe, notes)
    layers = _layers(ir_model, shapes)
    if any(layer["macs"] is None for layer in layers):
        symbolic = _symbolic_shapes(probe, notes)
        if symbolic is not None:
            for name, dims in symbolic.items():  # keep whichever source knows the value
                if _known(dims) or not _known(shapes.get(name)):
                    shapes[name] = dims
            layers = _layers(ir_model, shapes)
    for layer in layers:
        if layer["macs"] is None:
            notes.append(f"{layer['op_type']} '{layer['name']}': MACs unknown ({layer['why']})")
        del layer["why"]
    layer_macs = [layer["macs"] for layer in layers]
    macs = None if any(m is None for m in layer_macs) else int(sum(layer_macs))
    ops = op_histogram(ir_model)
    size, size_zip = _sizes(proto, ir_model, path)
    initializers = {t.name for t in proto.graph.initializer}
    opsets = {op.domain or "ai.onnx": op.version for op in proto.opset_import}
    return {
        "path": None if path is None else str(path),
        "bytes": size,
        "bytes_zip": size_zip,
        "params": params,
        "nonzero_params": nonzero,
        "macs": macs,
        "ops": ops,
        "opset": opsets.get("ai.onnx"),
        "ir_version": proto.ir_version,
        "opset_imports": opsets,
        "inputs": _io(v for v in proto.graph.input if v.name not in initializers),
        "outputs": _io(proto.graph.output),
        "nodes": sum(ops.values()),
        "layers": layers,
        "quantized_ops": _quantized_summary(ops, layers),
        "notes": notes,
    }


# -- metric suggestion --------------------------------------------------------------------------
# Which task metric (``deployopt.measure.tasks``) fits an output, from its shape alone: what
# ``inspect`` suggests, and the rules the detection metric uses to recognise its layout.

def is_logits(shape: Sequence[Any]) -> bool:
    """[N, C], or [N, C, 1, ...] (a 1x1-conv classifier head)."""
    return len(shape) == 2 or (len(shape) > 2 and all(d == 1 for d in shape[2:]))


def detect_layout(shapes: Sequence[Sequence[int]]) -> str | None:
    """The detection layout concrete output shapes imply (yolov5, yolov8, gfl, decoded; the
    layouts are described in ``deployopt.measure.tasks.boxes``), or None when ambiguous."""
    if len(shapes) >= 2 and len(shapes) % 2 == 0 and all(len(s) == 3 for s in shapes) and \
            len({s[-1] for s in shapes}) == 2:
        return "gfl"
    if len(shapes) == 3 and len(shapes[0]) in (2, 3) and shapes[0][-1] == 4:
        return "decoded"  # boxes, scores, classes
    if len(shapes) != 1 or len(shapes[0]) not in (2, 3):
        return None
    if len(shapes[0]) == 2:
        return "decoded" if shapes[0][-1] == 6 else None
    rows, cols = shapes[0][1], shapes[0][2]
    if cols == 6 and rows < 1000:
        return None  # a few decoded (box, score, class) rows or a one-class YOLO head: say which
    if rows > cols >= 6:
        return "yolov5"
    if cols > rows >= 5:
        return "yolov8"
    return None


def suggest_metrics(outputs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A metric per output from the shapes alone (``inspect``): [{outputs, metric, why}]."""
    shapes = [tuple(1 if not isinstance(d, int) else d for d in (o["shape"] or ())) for o in outputs]
    names = [o["name"] for o in outputs]
    if len(shapes) > 1 and detect_layout(shapes) == "gfl":
        return [{"outputs": names, "metric": "detection",
                 "why": "pairs of score and box-distribution maps (layout gfl: PicoDet/GFL heads)"}]
    found = []
    for name, shape in zip(names, shapes):
        layout = detect_layout([shape]) if len(shape) == 3 and max(shape[1:]) >= 1000 else None
        if not shape:
            metric, why = "regression", "rank unknown: generic fidelity to the reference"
        elif is_logits(shape):
            metric, why = "classification", "logits [batch, classes]"
        elif layout in ("yolov5", "yolov8"):
            metric, why = "detection", f"{'x'.join(map(str, shape))} looks like a YOLO head (layout {layout})"
        elif len(shape) == 3:
            metric, why = "sequence", "per-step class scores [N, T, C]: CTC greedy decoding (needs --charset for text)"
        elif len(shape) == 4 and shape[1] == 1:
            metric, why = "segmentation", "a 1-channel probability map (threshold 0.5)"
        elif len(shape) == 4:
            metric, why = "segmentation", f"class maps [N, C, H, W] with {shape[1]} classes"
        else:
            metric, why = "regression", "generic fidelity to the reference (cosine, relative MAE)"
        found.append({"outputs": [name], "metric": metric, "why": why})
    return found


# -- text ---------------------------------------------------------------------------------------
def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "unknown"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()


def _shape_text(shape: list | None) -> str:
    return "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def format_stats(stats: dict[str, Any]) -> str:
    """The human-readable form ``deployopt inspect`` prints."""
    lines = [f"model        {stats['path'] or '(in memory)'}",
             f"IR version   {stats['ir_version']}",
             "opsets       " + ", ".join(f"{d} {v}" for d, v in stats["opset_imports"].items())]
    for label in ("inputs", "outputs"):
        for i, v in enumerate(stats[label]):
            head = f"{label:<13}" if i == 0 else " " * 13
            lines.append(f"{head}{v['name']}: {v['dtype']} {_shape_text(v['shape'])}")
    for i, suggestion in enumerate(suggest_metrics(stats["outputs"])):
        head = f"{'metric':<13}" if i == 0 else " " * 13
        lines.append(f"{head}{', '.join(suggestion['outputs'])}: {suggestion['metric']} ({suggestion['why']})")
    params, nonzero = stats["params"], stats["nonzero_params"]
    sparsity = f" ({1 - nonzero / params:.1%} zeros)" if params else ""
    lines += [
        f"size         {stats['bytes']:,} bytes ({_si(stats['bytes'], 'B')}), "
        f"zipped {stats['bytes_zip']:,} bytes ({_si(stats['bytes_zip'], 'B')})",
        f"params       {params:,}, nonzero {nonzero:,}{sparsity}",
        f"MACs         {_si(stats['macs'])}" + ("" if stats["macs"] is None else f" ({stats['macs']:,})"),
    ]
    q = stats["quantized_ops"]
    lines.append(f"quantized    {q['nodes']} quantization nodes; layers: {q['integer_layers']} integer, "
                 f"{q['qdq_layers']} QDQ, {q['float_layers']} float")
    if q["by_op"]:
        lines.append(" " * 13 + ", ".join(f"{op} {n}" for op, n in q["by_op"].items()))
    lines.append(f"\nops ({stats['nodes']} nodes)")
    width = max((len(op) for op in stats["ops"]), default=0)
    for op, n in sorted(stats["ops"].items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {op:<{width}}  {n}")
    if stats["layers"]:
        lines.append(f"\nlayers ({len(stats['layers'])})")
        rows = [(layer["name"], layer["op_type"],
                 "?" if layer["macs"] is None else f"{layer['macs']:,}", f"{layer['params']:,}",
                 layer["quantized"] or "") for layer in stats["layers"]]
        header = ("name", "op", "MACs", "params", "quant")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for row in (header, *rows):
            cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  " + "  ".join(cells).rstrip())
    for note in stats["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
