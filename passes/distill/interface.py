"""The classifier interface the distill pass relies on: one float input, one logits output.

A student, trained here or read from a file, must take every input the teacher takes and give
logits of the same shape: same rank, the same size wherever the teacher's dim is fixed, and a
dynamic dim wherever the teacher's is (a fixed-batch student cannot replace a dynamic-batch
teacher). Shapes print as ``[N, 1, 28, 28]``: N is a dynamic batch, ? any other dynamic dim.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from deployopt.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Interface:
    """The single float input and single output of a classifier; ``None`` marks a dynamic dim."""

    input_name: str
    input_dims: tuple[int | None, ...] | None
    output_name: str
    output_dims: tuple[int | None, ...] | None

    @property
    def fixed_batch(self) -> int | None:
        return self.input_dims[0] if self.input_dims and self.input_dims[0] else None

    @property
    def classes(self) -> int | None:
        return self.output_dims[1] if self.output_dims and len(self.output_dims) == 2 else None


def _dims(value: ir.Value) -> tuple[int | None, ...] | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) and d > 0 else None for d in value.shape)


def dims_text(dims: tuple[int | None, ...] | None) -> str:
    """``[N, 1, 28, 28]``: N for a dynamic batch, ? for any other dynamic dim."""
    if dims is None:
        return "[unknown rank]"
    return "[" + ", ".join(str(d) if d is not None else ("N" if i == 0 else "?")
                           for i, d in enumerate(dims)) + "]"


def interface(model: ir.Model, who: str) -> Interface:
    graph = model.graph
    inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    if len(inputs) != 1:
        raise UserError(f"{who}: distillation needs a single-input classifier, it has {len(inputs)} inputs "
                        f"({', '.join(str(v.name) for v in inputs) or 'none'})")
    if len(graph.outputs) != 1:
        raise UserError(f"{who}: distillation needs a single-output classifier, it has {len(graph.outputs)} "
                        f"outputs ({', '.join(str(v.name) for v in graph.outputs)})")
    x, out = inputs[0], graph.outputs[0]
    if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
        raise UserError(f"{who}: input '{x.name}' is {x.dtype.name}; distillation needs a float32 input")
    result = Interface(str(x.name), _dims(x), str(out.name), _dims(out))
    if result.output_dims is not None and len(result.output_dims) != 2:
        raise UserError(f"{who}: output '{out.name}' has shape {dims_text(result.output_dims)}; "
                        f"distillation needs logits [batch, classes]")
    return result


def dims_fit(student: tuple | None, teacher: tuple | None) -> bool:
    """The student takes every shape the teacher takes: same rank, teacher-fixed dims equal,
    teacher-dynamic dims dynamic in the student too."""
    if student is None or teacher is None:
        return True  # unknown rank: the evaluation run decides
    return len(student) == len(teacher) and all(s is None or s == t for s, t in zip(student, teacher))


def check_samples(shape: tuple[int, ...], teacher: Interface, field: str, name: str) -> None:
    want = teacher.input_dims
    if want is None:
        return
    if len(want) != len(shape) + 1 or any(w is not None and w != s for w, s in zip(want[1:], shape)):
        raise UserError(f"{field}: samples of dataset {name!r} are {list(shape)} but the teacher input "
                        f"'{teacher.input_name}' expects {dims_text(want)}")
