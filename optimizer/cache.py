"""A content-addressed cache of pipeline steps and exports, shared by the runs of a sweep.

What a step produces depends only on what goes into it, so its key is

    sha256( input model bytes (deterministic protobuf serialisation) | pass name |
            the pass's settings (dataclasses.asdict, JSON with sorted keys) |
            the data specs a pass may read (calibration, evaluation, training; and the folder
            relative paths resolve against) | the pipeline's input model (the reference a pass
            may compare with) | seed | threads | the step guard's benchmark settings when it is on )

Runs whose recipes share a prefix of passes on the same model therefore share those steps, and a
pass with identical settings on an identical model (a quantize step two trials both reach) is
computed once. An export is keyed on its spec (JSON, sorted), the bytes of its weights file and
the torch and deployopt versions.

An entry is a folder ``<key>/`` holding ``model.onnx`` and ``entry.json``: the sha256 of
model.onnx and the step's record (modified, status, notes, details, failure, seconds). A hit
restores the model and that record, so the run's report is the same as the run that computed it
apart from timings and a note saying where the step came from. An entry is never trusted blindly:
model.onnx must match its stored hash and parse; one that does not (a corrupt or truncated file)
is recomputed and overwritten, and the run's report says so in its warnings.

Entries are written into a temporary folder and renamed into place, and a per-key file lock
(fcntl) makes a run that needs a step another process is computing wait for it instead of
computing it twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import onnx
import onnx_ir as ir

import deployopt
from deployopt.core.errors import one_line
from deployopt.passes.base import StepResult

_ENTRY = "entry.json"
_MODEL = "model.onnx"
_FORMAT = 1
_PROTOBUF_LIMIT = 2**31 - 1
# Data keys a pass may read through its context (fidelity is read by the pipeline only).
_PASS_DATA = ("calibration", "evaluation", "training")

#: What a step computes: (model, result, status, seconds), as the pipeline's step loop records it.
Step = tuple[ir.Model, StepResult, str, float]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_default(value: Any) -> Any:
    """JSON for what records and settings hold beyond plain types (the report turns them into the
    same values: numpy scalars into numbers, anything else into its text)."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    return str(value)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default, separators=(",", ":"))


def model_bytes(model: ir.Model) -> bytes | None:
    """The model's deterministic protobuf bytes; None above protobuf's 2 GB limit (not cached)."""
    proto = ir.to_proto(model)
    if proto.ByteSize() >= _PROTOBUF_LIMIT:
        return None
    return proto.SerializeToString(deterministic=True)


@dataclasses.dataclass
class _Lookup:
    step: Step | None = None
    problem: str | None = None  # why an existing entry was not used


class StepCache:
    """The cache folder and what this process found in it (hits, misses, warnings)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = pathlib.Path(folder)
        self.hits = 0
        self.misses = 0
        self._warnings: list[str] = []
        self._scope: tuple[int, str] | None = None  # (id of the reference model, its digest)

    # -- keys -------------------------------------------------------------------------------------
    def _reference_digest(self, reference: ir.Model | None) -> str:
        if reference is None:
            return ""
        if self._scope is None or self._scope[0] != id(reference):
            data = model_bytes(reference)
            self._scope = (id(reference), _sha256(data) if data is not None else f"large:{id(reference)}")
        return self._scope[1]

    def step_key(self, data: bytes, p: Any, recipe: Any, context: Any, shapes: dict) -> str:
        """The key of pass ``p`` on the model whose bytes are ``data`` (see the module doc)."""
        base_dir = str(recipe.path.parent.resolve()) if getattr(recipe, "path", None) else None
        parts = {
            "format": _FORMAT,
            "deployopt": deployopt.__version__,
            "input": _sha256(data),
            "pass": p.name,
            "settings": dataclasses.asdict(p),
            "data": {k: recipe.data[k] for k in _PASS_DATA if k in recipe.data},
            "data_dir": base_dir if recipe.data else None,
            "reference": self._reference_digest(context.reference),
            "metrics": [dataclasses.asdict(m) for m in getattr(context, "metrics", [])],  # judge the fallback
            "seed": context.seed,
            "threads": context.threads,
        }
        if p.min_step_speedup:  # the guard's benchmark decides whether the step is kept
            bench = recipe.benchmark
            parts["guard"] = {"threads": bench.threads[0], "runs": bench.runs, "timeout": bench.timeout,
                              "seed": recipe.seed, "shapes": {k: list(v) for k, v in shapes.items()}}
        return _sha256(_canonical(parts).encode("utf-8"))

    # -- steps -------------------------------------------------------------------------------------
    def step(self, model: ir.Model, p: Any, where: str, recipe: Any, context: Any, shapes: dict,
             compute: Callable[[], Step]) -> Step:
        """``compute()``'s step, or the cached one with the same key; the computed step is stored.

        Either way the model the run continues with is read back from the stored bytes, so a run
        that computed a step and one that restored it carry on from the same model."""
        data = model_bytes(model)
        if data is None:
            return compute()
        key = self.step_key(data, p, recipe, context, shapes)
        folder = self.folder / "steps" / key[:2] / key
        with self._locked(key):
            start = time.perf_counter()
            found = self._load_step(folder)
            if found.step is not None:
                self.hits += 1
                model, result, status, seconds = found.step
                result.notes.append(f"restored from the step cache (key {key[:12]}; computed in "
                                    f"{seconds:.2f} s by an earlier run with the same input and settings)")
                result.details["cache"] = {"hit": True, "key": key, "computed_seconds": round(seconds, 3)}
                return model, result, status, time.perf_counter() - start  # this run's time: the restore
            self.misses += 1
            model, result, status, seconds = compute()
            out = model_bytes(model)
            record = {"format": _FORMAT, "pass": p.name, "modified": bool(result.modified), "status": status,
                      "notes": list(result.notes), "details": dict(result.details), "failure": result.failure,
                      "seconds": seconds}
            if found.problem:
                message = f"{where}: step cache entry {key[:12]} not used ({found.problem}); recomputed"
                result.notes.append(message)
                self._warnings.append(message)
            result.details["cache"] = {"hit": False, "key": key}
            if out is None:
                return model, result, status, seconds
            self._store(folder, out, record)
            return _model_from(out), result, status, seconds

    def _load_step(self, folder: pathlib.Path) -> _Lookup:
        if not folder.exists():
            return _Lookup()
        try:
            entry = json.loads((folder / _ENTRY).read_text(encoding="utf-8"))
            data = (folder / _MODEL).read_bytes()
            if not isinstance(entry, dict) or entry.get("format") != _FORMAT:
                return _Lookup(problem="entry.json is not an entry of this cache format")
            if _sha256(data) != entry.get("model_sha256"):
                return _Lookup(problem="model.onnx does not match the hash stored in entry.json")
            model = _model_from(data)
            result = StepResult(model, bool(entry["modified"]), notes=list(entry["notes"]),
                                details=dict(entry["details"]), failure=entry["failure"])
            return _Lookup(step=(model, result, str(entry["status"]), float(entry["seconds"])))
        except Exception as e:  # unreadable JSON, a missing file, a protobuf that does not parse
            return _Lookup(problem=one_line(e, 160, with_type=True))

    # -- exports -----------------------------------------------------------------------------------
    def export(self, spec: dict[str, Any], produce: Callable[[], pathlib.Path]) -> tuple[pathlib.Path, bool]:
        """The exported model for ``spec``: (path of a file to copy from, whether it was cached)."""
        parts: dict[str, Any] = {"format": _FORMAT, "deployopt": deployopt.__version__, "spec": spec}
        with contextlib.suppress(ImportError):
            import torch

            parts["torch"] = torch.__version__
        weights = spec.get("weights")
        if weights and pathlib.Path(weights).is_file():
            parts["weights"] = _sha256(pathlib.Path(weights).read_bytes())
        key = _sha256(_canonical(parts).encode("utf-8"))
        folder = self.folder / "exports" / key[:2] / key
        with self._locked(key):
            problem = None
            if folder.exists():
                try:
                    entry = json.loads((folder / _ENTRY).read_text(encoding="utf-8"))
                    if _sha256((folder / _MODEL).read_bytes()) == entry.get("model_sha256"):
                        self.hits += 1
                        return folder / _MODEL, True
                    problem = "model.onnx does not match the hash stored in entry.json"
                except Exception as e:
                    problem = one_line(e, 160, with_type=True)
            self.misses += 1
            path = produce()
            if problem:
                self._warnings.append(f"model: export cache entry {key[:12]} not used ({problem}); exported again")
            self._store(folder, path.read_bytes(), {"format": _FORMAT, "spec": spec})
            return path, False

    # -- storage -----------------------------------------------------------------------------------
    def take_warnings(self) -> list[str]:
        """The warnings since the last call (one run's worth)."""
        warnings, self._warnings = self._warnings, []
        return warnings

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        locks = self.folder / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key[:24]}.lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _store(self, folder: pathlib.Path, data: bytes, record: dict[str, Any]) -> None:
        """Write the entry into a temporary folder beside its place, then rename it into place
        (replacing a corrupt entry); readers never see half an entry."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name[:12]}.", dir=folder.parent))
        try:
            (tmp / _MODEL).write_bytes(data)
            record = {**record, "model_sha256": _sha256(data), "stored": time.time()}
            (tmp / _ENTRY).write_text(json.dumps(record, default=_json_default, indent=1), encoding="utf-8")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _model_from(data: bytes) -> ir.Model:
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    return ir.from_proto(proto)
