"""Model facts the harnesses need before any session exists: loading, I/O signatures, shapes.

The harnesses read a model's graph inputs (name, element type, dims) in the parent process to
resolve concrete input shapes (``--batch``, ``--shape``, a dataset's sample shape) and to refuse
bad input before a worker starts. Sessions themselves are opened by ``session_options`` with the
settings every latency number is recorded with.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from deployopt.core.errors import UserError

#: --opt-level names -> onnxruntime GraphOptimizationLevel member names.
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

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


def open_data(spec: str, inputs: list[TensorSpec], shapes: dict | None = None):
    """``deployopt.core.data.open_dataset`` sized for the model's (single) input; errors name --data."""
    from deployopt.core.data import open_dataset

    if len(inputs) != 1:
        raise UserError(f"--data {spec}: the model has {len(inputs)} inputs "
                        f"({', '.join(s.name for s in inputs)}); a dataset feeds exactly one")
    first = inputs[0]
    dims = (shapes or {}).get(first.name, first.dims)
    input_shape = None if dims is None else [d if isinstance(d, int) else None for d in dims]
    try:
        return open_dataset(spec, input_shape=input_shape, input_name=first.name)
    except UserError as e:
        raise UserError(f"--data {spec}: {e}") from None


def session_options(threads: int, optimization_level: str = "all"):
    """The session settings every measurement uses (and records).

    intra-op threads as given, one inter-op thread and sequential execution: with parallel
    execution or inter-op threads the thread count a row is labeled with would not be the number
    of cores the model used.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                               OPT_LEVELS[optimization_level])
    options.log_severity_level = 3  # errors only: warnings would interleave with the table
    return options


def recorded_options(threads, optimization_level: str) -> dict:
    """session_options() as plain data for results."""
    return {
        "intra_op_num_threads": list(threads),
        "inter_op_num_threads": 1,
        "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": OPT_LEVELS[optimization_level],
        "providers": ["CPUExecutionProvider"],
    }


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """First non-empty line of an error message, shortened: result rows and stderr stay one line."""
    text = str(error).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        line = type(error).__name__ if isinstance(error, BaseException) else "unknown error"
    return line if len(line) <= limit else line[: limit - 3] + "..."
