"""Typed settings: one mechanism that validates every recipe section and every pass.

A settings class is a dataclass whose field annotations are the allowed types and whose
``setting(...)`` metadata holds the bounds; ``check_settings`` derives the validation and the
messages from them, so a new setting needs one line and no hand-written check:

```python
@dataclasses.dataclass
class Gates(Settings):
    max_accuracy_drop: float | None = setting(None, low=0, high=1)
    scope: Literal["layer", "global"] = "layer"
```

Rules, applied recursively through ``list[...]``, ``tuple[...]``, ``dict[...]`` and ``X | None``:
``bool`` accepts only true/false; ``int`` refuses booleans; ``float`` accepts integers; a
``Literal`` lists the allowed values; ``low``/``high`` (with ``low_open``/``high_open``) bound
every number, ``choices`` every string, and ``min_len`` the length of a list or mapping.
Messages name the field and what is allowed: ``sparsity: 1.2 is outside [0, 1)``,
``scope: 'lyer' is not one of layer, global``, ``fold_batchnorm: expected bool, got 'yes'``.
Rules that tie several fields together stay in the class's ``validate()``, run afterwards.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

from deployopt.core.errors import UserError

_META = "deployopt"


@dataclasses.dataclass(frozen=True)
class Bounds:
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    min_len: int | None = None


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False, choices: Sequence[Any] | None = None, min_len: int | None = None,
            **field_kwargs: Any) -> Any:
    """A dataclass field with bounds that ``check_settings`` enforces."""
    bounds = Bounds(low, high, low_open, high_open, None if choices is None else tuple(choices), min_len)
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_META: bounds}, **field_kwargs)


def type_name(hint: Any) -> str:
    """How a type reads in an error message: ``float or null``, ``list[int]``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(hint) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def matches(value: Any, hint: Any) -> bool:
    """Whether a plain (YAML/JSON) value fits the annotation ``hint``."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        inner = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(matches(v, inner) for v in value)
    if origin is dict:
        key_t, val_t = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(matches(k, key_t) and matches(v, val_t) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _interval(b: Bounds) -> str:
    lo = "-inf" if b.low is None else f"{b.low:g}"
    hi = "inf" if b.high is None else f"{b.high:g}"
    return f"{'(' if b.low_open or b.low is None else '['}{lo}, {hi}{')' if b.high_open or b.high is None else ']'}"


def check_bounds(field: str, value: Any, bounds: Bounds) -> None:
    """Apply ``bounds`` to a value that already has the right type (recursing into containers)."""
    if isinstance(value, dict):
        if bounds.min_len is not None and len(value) < bounds.min_len:
            raise UserError(f"{field}: needs at least {bounds.min_len} entries, got {value!r}")
        for key, item in value.items():
            check_bounds(f"{field}[{key!r}]", item, dataclasses.replace(bounds, min_len=None))
        return
    if isinstance(value, (list, tuple)):
        if bounds.min_len is not None and len(value) < bounds.min_len:
            raise UserError(f"{field}: needs at least {bounds.min_len} values, got {list(value)!r}")
        for item in value:
            check_bounds(field, item, dataclasses.replace(bounds, min_len=None))
        return
    if bounds.choices is not None and value is not None and value not in bounds.choices:
        raise UserError(f"{field}: {value!r} is not one of {', '.join(map(str, bounds.choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low_ok = bounds.low is None or (value > bounds.low if bounds.low_open else value >= bounds.low)
        high_ok = bounds.high is None or (value < bounds.high if bounds.high_open else value <= bounds.high)
        if not (low_ok and high_ok):
            raise UserError(f"{field}: {value!r} is outside {_interval(bounds)}")


def check_value(field: str, value: Any, hint: Any, bounds: Bounds | None = None) -> None:
    """Type first (``expected float, got 'x'``), then bounds; ``Literal`` reads as choices."""
    if typing.get_origin(hint) is typing.Literal and not matches(value, hint):
        raise UserError(f"{field}: {value!r} is not one of {', '.join(map(str, typing.get_args(hint)))}")
    if not matches(value, hint):
        raise UserError(f"{field}: expected {type_name(hint)}, got {value!r}")
    if bounds is not None:
        check_bounds(field, value, bounds)


def setting_fields(cls_or_obj: Any) -> list[dataclasses.Field]:
    """The user-settable fields (init fields) of a settings dataclass."""
    return [f for f in dataclasses.fields(cls_or_obj) if f.init]


def check_settings(obj: Any) -> None:
    """Validate every init field of the dataclass instance ``obj`` against its type and bounds."""
    hints = typing.get_type_hints(type(obj))
    for f in setting_fields(obj):
        check_value(f.name, getattr(obj, f.name), hints.get(f.name, Any), f.metadata.get(_META))


class Settings:
    """Mixin for settings dataclasses: ``__post_init__`` checks types and bounds, then ``validate()``."""

    def __post_init__(self) -> None:
        check_settings(self)
        self.validate()

    def validate(self) -> None:
        """Rules that involve several fields; raise ``UserError('field: why')``."""


def build_settings(cls: type, values: Any, where: str) -> Any:
    """Instantiate the settings class ``cls`` from a YAML mapping; errors name ``where.key``."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    names = [f.name for f in setting_fields(cls)]
    for key in values:
        if key not in names:
            raise UserError(f"{where}.{key}: unknown key (allowed: {', '.join(names) or 'no settings'})")
    try:
        return cls(**values)
    except UserError as e:
        message = str(e)
        raise UserError(message if message.startswith(where) else f"{where}.{message}") from e
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from e
