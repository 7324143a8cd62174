"""Crash containment: run work in a child process that cannot take the caller down with it.

onnxruntime and the onnx checker are C++: a hostile or broken model can make them abort,
segfault or hang, which no ``try`` in Python can catch. The CLI therefore runs ``optimize``,
``eval`` and ``inspect`` in a spawned child process and watches it:

- the child exits normally: its exit code is the CLI's (it printed its own one-line error);
- the work raises a ``DeployoptError`` (the Python API's ``optimize(isolate=True)``, whose child
  prints nothing): the child hands its type and message back through a small file and the parent
  raises the same error, so the caller gets ``UserError: m.onnx: not an ONNX model ...`` as
  without ``isolate``, not a child's traceback;
- the child dies from a signal: ``WorkFailed("... crashed (SIGSEGV) during <step>")``, exit 1;
- the child runs past ``--timeout``: it is killed, ``WorkFailed("... timed out ...")``, exit 1;
- SIGINT/SIGTERM reach the CLI: the child is asked to stop (it cleans up), the CLI exits 130.

The child's temporary files live under a folder the parent creates (``TMPDIR``) and always
removes, so even a killed child leaves no temporary directories behind; onnxruntime's telemetry
(which writes ``$TMPDIR/.ses`` and a device id under ``~/.cache`` when imported) is off in the
child unless the caller's environment says otherwise. The step in progress is reported through a
small status file (see ``report_status``).

Inside the work, two smaller kinds of containment:

- ``confined(folder)``: library calls that write scratch files into the current folder or the
  temp folder (onnxruntime's shape inference and quantization tools) write them into ``folder``;
- ``best_effort(compute)``: a diagnostic that fails becomes a ``Skipped`` with a one-line reason
  instead of failing the work it describes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from deployopt.core.errors import DeployoptError, UserError, WorkFailed, one_line

_STATUS_ENV = "DEPLOYOPT_STATUS_FILE"
_ERROR_ENV = "DEPLOYOPT_ERROR_FILE"
_TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"
_GRACE_SECONDS = 10.0
#: Hidden folder inside the output folder where ``optimize`` stages its outputs; what a killed
#: child leaves of it is removed by the parent.
STAGING_PREFIX = ".deployopt-staging-"
T = TypeVar("T")


@contextlib.contextmanager
def confined(folder: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Run a library call whose scratch files go to the current folder or the temp folder (both
    relative to the process) with both set to ``folder``, restored afterwards.

    The current folder and ``tempfile.tempdir`` are process-wide. That is safe here: the work runs
    single-threaded in its process (workers are separate processes, the RSS sampler thread reads
    /proc only), and paths passed into the call must be absolute (they are: the pass's files).
    """
    folder = pathlib.Path(folder).resolve()
    cwd, tempdir = os.getcwd(), tempfile.tempdir
    os.chdir(folder)
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = tempdir
        os.chdir(cwd)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A diagnostic that could not be computed, and why (one line)."""

    reason: str

    @classmethod
    def of(cls, error: Exception) -> Skipped:
        """The reason as one line (with the exception type unless it is deployopt's own)."""
        return cls(one_line(error, 200, with_type=not isinstance(error, WorkFailed)))

    def to_json(self) -> dict[str, str]:
        return {"skipped": self.reason}


def best_effort(compute: Callable[..., T], *args, **kwargs) -> T | Skipped:
    """``compute(*args, **kwargs)``, or ``Skipped(reason)`` when it raises: for report-only work
    whose failure must not change the result it describes. Interrupts still propagate."""
    try:
        return compute(*args, **kwargs)
    except Exception as e:  # whatever onnxruntime, onnx or numpy raise on an unusual graph
        return Skipped.of(e)


def report_status(text: str) -> None:
    """Record the step in progress (no-op outside a contained child)."""
    path = os.environ.get(_STATUS_ENV)
    if path:
        with contextlib.suppress(OSError):
            pathlib.Path(path).write_text(text, encoding="utf-8")


def _child(target: Callable[[], int]) -> None:
    try:
        code = target()
    except DeployoptError as e:  # handed back for run_contained to raise in the caller
        with contextlib.suppress(OSError):
            pathlib.Path(os.environ[_ERROR_ENV]).write_text(
                json.dumps({"kind": type(e).__name__, "message": str(e)}), encoding="utf-8")
        sys.exit(e.exit_code)
    sys.exit(int(code or 0))


def _handed_back(path: pathlib.Path) -> DeployoptError | None:
    """The ``DeployoptError`` the child wrote to ``path`` (``_child``), rebuilt; None without one."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = {cls.__name__: cls for cls in (UserError, WorkFailed)}.get(record.get("kind"), DeployoptError)
    return kind(record.get("message", ""))


def _read_status(path: pathlib.Path) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(encoding="utf-8").strip()
        if text:
            return text
    return "startup"


def _stop(process: multiprocessing.Process) -> None:
    """Ask politely (SIGTERM → KeyboardInterrupt in the child), then kill."""
    if process.is_alive():
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGTERM)
        process.join(_GRACE_SECONDS)
    if process.is_alive():
        process.kill()
        process.join()


def run_contained(target: Callable[[], int], *, verb: str, timeout: float | None) -> int:
    """Run ``target()`` (picklable: a module-level function or a ``functools.partial`` of one) in a
    spawned child; return its exit code, or raise the ``DeployoptError`` that ``target`` raised.
    ``verb`` names the work in timeout and crash messages."""
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="deployopt-run-"))
    status = scratch / "status"
    error = scratch / "error"
    child_tmp = scratch / "tmp"
    child_tmp.mkdir()
    saved = {k: os.environ.get(k) for k in ("TMPDIR", _STATUS_ENV, _ERROR_ENV, _TELEMETRY_ENV)}
    os.environ["TMPDIR"] = str(child_tmp)  # the spawned child inherits the environment
    os.environ[_STATUS_ENV] = str(status)
    os.environ[_ERROR_ENV] = str(error)
    os.environ.setdefault(_TELEMETRY_ENV, "1")
    process = multiprocessing.get_context("spawn").Process(target=_child, args=(target,))  # not a daemon: it spawns workers
    try:
        process.start()
        for key, value in saved.items():  # the parent keeps its own environment
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            process.join(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic())))
            if not process.is_alive():
                break
            if deadline is not None and time.monotonic() >= deadline:
                step = _read_status(status)
                _stop(process)
                raise WorkFailed(f"{verb} timed out after {timeout:g} s during {step}")
        code = process.exitcode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            raise WorkFailed(f"{verb} crashed ({name}) during {_read_status(status)}; "
                             "onnxruntime or onnx aborted on this model")
        raised = _handed_back(error)
        if raised is not None:
            raise raised
        return int(code or 0)
    except KeyboardInterrupt:
        _stop(process)
        raise
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if process.is_alive():
            process.kill()
            process.join()
        shutil.rmtree(scratch, ignore_errors=True)
