"""One worker process per benchmarked model, and the parent's handle on it.

Why a process per model: onnxruntime can abort the whole process on a bad graph, and peak
resident memory is only attributable to a model when nothing else lives in the process. The
parent drives all workers in lock-step (one measured segment at a time), so idle workers sleep
on their pipe and never compete for cores with the one being timed.

Protocol (parent -> worker, over a multiprocessing Pipe; the worker answers each "measure"):
    ("feeds", key, {name: array})              cache input arrays under ``key`` (no answer)
    ("measure", threads, key, warmup, runs[, start_ns])
                                               -> ("ok", samples_ns, wall_ns, rss_mb, load_s,
                                                   start_ns)
                                               or ("error", one-line reason, rss_mb)
    ("stop",)                                  exit
The worker greets with ("ready", rss_mb) once its imports are done. ``start_ns`` is the
perf_counter_ns reading when the timed runs began (a system-wide monotonic clock on Linux, so
the throughput mode can line up the runs of concurrent workers); a ``start_ns`` in the request
holds the timed runs back until that reading, so that concurrent workers start together. The model runs on the target
given as (runtime, ep) (``deployopt.measure.runtime``; default onnxruntime's CPU provider).

multiprocessing's spawn start method is used (no fork: onnxruntime's thread pools do not survive
a fork), so the worker starts from a clean interpreter.
"""

from __future__ import annotations

import multiprocessing
import signal
import time

from deployopt.core.errors import one_line
from deployopt.measure.memory import peak_rss_mb
from deployopt.measure.runtime import open_runtime
from deployopt.measure.timing import time_runs

STARTUP_LIMIT_S = 120.0  # a fresh interpreter importing numpy + onnxruntime on a loaded machine


def main(conn, model_path: str, optimization_level: str, runtime: str = "onnxruntime",
         ep: str | None = None) -> None:
    """Worker loop (runs in the child process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # Import the runtime before the greeting, so that neither the --timeout budget nor the first
    # session's load time pays for it.
    import onnxruntime  # noqa: F401
    if runtime == "openvino":
        import openvino  # noqa: F401

    sessions: dict[int, object] = {}
    feeds: dict[object, dict] = {}
    conn.send(("ready", peak_rss_mb()))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent went away
            return
        kind = message[0]
        if kind == "stop":
            return
        if kind == "feeds":
            feeds[message[1]] = message[2]
            continue
        _, threads, key, warmup, runs, *start_at = message
        load_s = 0.0
        try:
            session = sessions.get(threads)
            if session is None:
                t0 = time.perf_counter()
                session = open_runtime(model_path, runtime, ep, threads=threads,
                                       optimization_level=optimization_level)
                load_s = time.perf_counter() - t0
                sessions[threads] = session
            inputs = feeds[key]
            sess_run = session.run

            def run():
                sess_run(None, inputs)

            # Warm-up before every measured segment: the other models ran in between, so caches
            # and the allocator are cold again (and the first segment also pays lazy init).
            for _ in range(warmup):
                run()
            if start_at:
                time.sleep(max(0, start_at[0] - time.perf_counter_ns()) / 1e9)
            start = time.perf_counter_ns()
            samples, wall = time_runs(run, runs)
        except Exception as e:  # WorkFailed/UserError from open_runtime; the runtime's own types from run
            conn.send(("error", one_line(e), peak_rss_mb()))
            continue
        conn.send(("ok", samples, wall, peak_rss_mb(), load_s, start))


class WorkerFailure(Exception):
    """The worker died, timed out or answered with an error; str() is the one-line reason."""


class Worker:
    """Parent-side handle: start, send, wait for an answer within a time budget, kill.

    ``budget`` (seconds, or None) is the wall time this worker may spend answering requests in
    total; when it runs out mid-request the worker is killed.
    """

    def __init__(self, model_path: str, optimization_level: str, *, budget: float | None = None,
                 entry=main, target: tuple[str, str | None] | None = None):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # ``target`` (runtime, ep) goes to the entry only when given: fault-injection entries in
        # the tests take the original three arguments.
        args = (child, str(model_path), optimization_level, *(target or ()))
        self.process = ctx.Process(target=entry, args=args, daemon=True)
        self.budget = budget
        self.spent = 0.0
        self.peak_rss_mb: float | None = None
        self.dead: str | None = None  # the reason once it can no longer be used
        self.process.start()
        child.close()  # keep only the child's end open there, so a crash reads as EOF here

    def wait_ready(self) -> None:
        reply = self._receive(STARTUP_LIMIT_S, counts=False)
        self.peak_rss_mb = reply[1]

    def send(self, message) -> None:
        if self.dead:
            raise WorkerFailure(self.dead)
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise self._died() from None

    def request(self, message):
        """Send and wait for the answer; raise WorkerFailure when there is none."""
        self.send(message)
        return self.answer()

    def answer(self):
        """Wait for the answer to the last message sent (so that several workers can be sent
        their request first and then answer concurrently)."""
        limit = None if self.budget is None else max(self.budget - self.spent, 0.0)
        return self._receive(limit, counts=True)

    def _receive(self, limit: float | None, *, counts: bool):
        t0 = time.monotonic()
        try:
            ready = self._conn.poll(limit)
        finally:
            if counts:
                self.spent += time.monotonic() - t0
        if not ready:
            self.kill()
            what = f"--timeout {self.budget:g} s" if counts else f"{limit:g} s to start"
            self.dead = f"worker killed: exceeded {what}"
            raise WorkerFailure(self.dead)
        try:
            reply = self._conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            raise self._died() from None
        if reply[0] == "error":
            self.peak_rss_mb = reply[2]
            raise WorkerFailure(reply[1])
        if reply[0] == "ok":
            self.peak_rss_mb = reply[3]
        return reply

    def _died(self) -> WorkerFailure:
        self.process.join(5)
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                how = f"signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        else:
            how = f"exit code {code}"
        self.dead = f"worker crashed ({how})"
        return WorkerFailure(self.dead)

    def stop(self) -> None:
        if self.process.is_alive() and not self.dead:
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
            self.process.join(5)
        self.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self._conn.close()
