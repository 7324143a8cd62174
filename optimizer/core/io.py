"""Model input/output: validated loading and atomic saving.

``load`` refuses, with a one-line ``UserError`` naming the file, everything that is not a
well-formed ONNX model: a missing or empty file, bytes that are not an ONNX protobuf, a truncated
or corrupt protobuf, external data that is missing, too short, or whose location escapes the
model's folder (a model must not make us read ``../../etc/passwd``). Then it runs the full
``onnx.checker`` and shape inference.

``save`` writes to a temporary file in the target folder and renames it into place, so a reader
sees the old file or the complete new one, never half a model; it refuses to overwrite the model
it was loaded from. Models under 2 GB are written as one self-contained file.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from deployopt.core.errors import UserError, one_line


def _np_dtype_known(dtype: int) -> bool:
    try:
        onnx.helper.tensor_dtype_to_np_dtype(dtype)
        return True
    except (KeyError, ValueError, TypeError):
        return False


_PROTOBUF_LIMIT = 2**31 - 1  # protobuf cannot serialize a message of 2 GB or more
_ITEM_BITS = {dtype: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype)).itemsize * 8
              for dtype in onnx.TensorProto.DataType.values()
              if dtype not in (0, onnx.TensorProto.STRING) and _np_dtype_known(dtype)}
for _name, _bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)):
    if hasattr(onnx.TensorProto, _name):  # packed sub-byte types (numpy widens them to a byte)
        _ITEM_BITS[getattr(onnx.TensorProto, _name)] = _bits


def _external_tensors(proto: onnx.ModelProto):
    """Every TensorProto in the model that stores its bytes outside the file."""
    for tensor in onnx.external_data_helper._get_all_tensors(proto):  # the helper onnx itself uses
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _check_external_data(proto: onnx.ModelProto, path: pathlib.Path) -> None:
    folder = path.parent.resolve()
    for tensor in _external_tensors(proto):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise UserError(f"{path}: tensor '{tensor.name}' has external data without a location")
        target = (folder / location).resolve()
        if pathlib.Path(location).is_absolute() or not target.is_relative_to(folder):
            raise UserError(
                f"{path}: external data location '{location}' of tensor '{tensor.name}' "
                "escapes the model's folder"
            )
        if not target.is_file():
            raise UserError(f"{path}: external data file '{location}' (tensor '{tensor.name}') is missing")
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        size = target.stat().st_size
        if length is not None and offset + int(length) > size:
            raise UserError(
                f"{path}: external data file '{location}' is truncated "
                f"(tensor '{tensor.name}' needs bytes up to {offset + int(length)}, file has {size})"
            )


def _check_tensor_sizes(proto: onnx.ModelProto, path: pathlib.Path) -> None:
    """Every stored tensor must hold exactly prod(dims) elements: the checker does not verify it."""
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        count = 1
        for d in tensor.dims:
            count *= d
        if tensor.data_type in (0, onnx.TensorProto.STRING) or tensor.data_type not in _ITEM_BITS:
            continue
        if tensor.HasField("raw_data"):
            stored_bits = len(tensor.raw_data) * 8
            if (count * _ITEM_BITS[tensor.data_type] + 7) // 8 * 8 != stored_bits:
                raise UserError(f"{path}: tensor '{tensor.name}' stores {len(tensor.raw_data)} bytes, "
                                f"its shape {list(tensor.dims)} needs {count * _ITEM_BITS[tensor.data_type] // 8}")
        else:
            field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
            stored = len(getattr(tensor, field))
            per_entry = 2 if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
            if _ITEM_BITS[tensor.data_type] < 8:  # packed 4-bit types: two values per entry
                per_entry = 8 // _ITEM_BITS[tensor.data_type]
                expected = (count + per_entry - 1) // per_entry
            else:
                expected = count * per_entry
            if stored != expected:
                raise UserError(f"{path}: tensor '{tensor.name}' stores {stored} values, its shape "
                                f"{list(tensor.dims)} needs {expected}")


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Read, validate (full onnx.checker) and shape-infer a model; external data is loaded."""
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from e
    if not data:
        raise UserError(f"{path}: empty file, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise UserError(f"{path}: not an ONNX model or truncated/corrupt protobuf ({one_line(e)})") from e
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise UserError(f"{path}: not an ONNX model (no graph or IR version in the protobuf)")
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= newest:
            raise UserError(f"{path}: opset {opset.version} is not a released ONNX opset (this onnx knows 1 to {newest})")
    _check_external_data(proto, path)
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read external data: {one_line(e)}") from e
    _check_tensor_sizes(proto, path)
    try:
        if proto.ByteSize() < _PROTOBUF_LIMIT:
            onnx.checker.check_model(proto, full_check=True)
            proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
        else:  # the checker needs a path for models over 2 GB
            onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise UserError(f"{path}: invalid ONNX model: {one_line(e)}") from e
    except Exception as e:  # the checker's C++ core raises plain exceptions on some corruptions
        raise UserError(f"{path}: invalid ONNX model: {one_line(e)}") from e
    return proto


def load(path: str | os.PathLike) -> ir.Model:
    """``load_proto`` then convert to an ``onnx_ir.Model`` (all tensors in memory)."""
    proto = load_proto(path)
    try:
        return ir.from_proto(proto)
    except Exception as e:
        raise UserError(f"{path}: cannot be represented in onnx_ir: {one_line(e)}") from e


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    with contextlib.suppress(OSError):
        return a.exists() and b.exists() and os.path.samefile(a, b)
    return False


def check_output_path(path: str | os.PathLike, *, input_path: str | os.PathLike | None = None,
                      inputs: Iterable[str | os.PathLike] = ()) -> pathlib.Path:
    """Refuse outputs that would destroy the input model (``input_path``) or another file the
    command reads (``inputs``: data, labels, weights), or cannot be written, before any work."""
    path = pathlib.Path(path)
    if input_path is not None and _same_file(path, pathlib.Path(input_path)):
        raise UserError(f"{path}: refusing to overwrite the input model")
    if any(_same_file(path, pathlib.Path(other)) for other in inputs):
        raise UserError(f"{path}: refusing to overwrite a file this command reads")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a file path")
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    if not folder.is_dir():
        raise UserError(f"{path}: folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{path}: folder '{folder}' is not writable")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save(model: ir.Model | onnx.ModelProto, path: str | os.PathLike, *,
         input_path: str | os.PathLike | None = None) -> pathlib.Path:
    """Save atomically as one file (external data ``<name>.data`` only above 2 GB)."""
    path = check_output_path(path, input_path=input_path)
    proto = to_proto(model)
    try:
        if proto.ByteSize() < _PROTOBUF_LIMIT:
            atomic_write_bytes(path, proto.SerializeToString())
            return path
        # Above the protobuf limit: weights go to '<name>.data' beside the model. Both files are
        # written into a private temporary folder in the target folder, then renamed into place.
        data_name = path.name + ".data"
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp_dir:
            tmp_model = pathlib.Path(tmp_dir) / path.name
            onnx.save_model(proto, str(tmp_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            os.replace(pathlib.Path(tmp_dir) / data_name, path.parent / data_name)
            os.replace(tmp_model, path)
        return path
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or one_line(e)}") from e
