"""Model facts the harnesses need before any session exists: loading, I/O signatures, shapes.

The harnesses read a model's graph inputs (name, element type, dims) and outputs in the parent
process to resolve concrete input shapes (``--batch``, ``--shape``, a dataset's sample shapes) and
to refuse bad input before a worker starts. Sessions themselves are opened by ``deployopt.core.session``.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from deployopt.core.errors import UserError

Dim = int | str | None  # a static size, a symbolic name, or unknown


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype | None  # None for element types numpy cannot hold (e.g. float8)
    dims: tuple[Dim, ...] | None  # None when the rank itself is unknown

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.dims) and not isinstance(self.dims[0], int)

    def shape_text(self) -> str:
        return format_shape(self.dims) if self.dims is not None else "?"


def format_shape(dims) -> str:
    """1x3x224x224; symbolic dims by name, unknown dims as '?'."""
    if not dims:
        return "scalar"
    return "x".join("?" if d is None else str(d) for d in dims)


def parse_shape(text: str, what: str) -> tuple[int, ...]:
    """'1x3x224x224' (or '1,3,224,224') -> (1, 3, 224, 224); UserError naming ``what``."""
    parts = text.replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(f"{what}: {text!r} is not a shape like 1x3x224x224") from None
    if any(d < 1 for d in dims):
        raise UserError(f"{what}: {text!r} has a dimension below 1")
    return dims


def load_proto(path: str | pathlib.Path):
    """The validated onnx.ModelProto at ``path`` (UserError naming the file when it is not one).

    One place to change if the harnesses ever need a lighter loader than the project's.
    """
    from deployopt.core.io import load_proto as project_load_proto

    return project_load_proto(path)


def _spec(value_info, elem_to_np) -> TensorSpec:
    tensor_type = value_info.type.tensor_type
    try:
        dtype = np.dtype(elem_to_np(tensor_type.elem_type))
    except Exception:  # element types with no numpy equivalent
        dtype = None
    dims = None
    if tensor_type.HasField("shape"):
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
    return TensorSpec(value_info.name, dtype, dims)


def input_specs(proto) -> list[TensorSpec]:
    """Graph inputs that must be fed (initializers listed as inputs, IR < 4, are excluded)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    initializers = {t.name for t in proto.graph.initializer}
    return [_spec(v, tensor_dtype_to_np_dtype) for v in proto.graph.input
            if v.name not in initializers]


def output_specs(proto) -> list[TensorSpec]:
    from onnx.helper import tensor_dtype_to_np_dtype

    return [_spec(v, tensor_dtype_to_np_dtype) for v in proto.graph.output]


def fits_sample(spec: TensorSpec, sample_shape: tuple) -> bool:
    """True when samples of ``sample_shape`` fit ``spec`` after its batch dimension."""
    if spec.dims is None:
        return True
    if len(spec.dims) != len(sample_shape) + 1:
        return False
    return all(not isinstance(want, int) or want == got
               for want, got in zip(spec.dims[1:], sample_shape))


def with_shapes(inputs: list[TensorSpec], shapes: dict | None) -> list[TensorSpec]:
    """The inputs with the full shapes given by name (``--shape``, a recipe's ``shapes``) as dims."""
    shapes = shapes or {}
    return [dataclasses.replace(s, dims=tuple(shapes[s.name])) if s.name in shapes else s for s in inputs]


def open_data(spec, inputs: list[TensorSpec], shapes: dict | None = None):
    """``deployopt.core.data.open_model_data`` for the model's inputs (all of them fed: see that
    module); errors name --data, and dims the data leaves open name --shape."""
    from deployopt.core.data import UnfixedDims, open_model_data

    try:
        return open_model_data(spec, with_shapes(inputs, shapes))
    except UnfixedDims as e:
        raise UserError(f"--data {spec}: {e}; pass --shape {e.input_name}={format_shape(e.example())}") from None
    except UserError as e:
        raise UserError(f"--data {spec}: {e}") from None
