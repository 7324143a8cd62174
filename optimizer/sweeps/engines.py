"""Where a sweep's trials run: local worker processes, or Ray tasks on a cluster.

A trial is an ordinary optimize run (``deployopt.pipeline.run``) into its own folder, with the
sweep's step cache. Trials run side by side, but timing is never shared: every latency
measurement of a run (benchmark, profiles, step guards) and every target benchmark holds the
machine's benchmark slot, so two trials on one machine never time their models at once.

- local: a pool of spawned worker processes; the slot is an exclusive file lock (fcntl) in the
  output folder.
- ray: each trial is a Ray task (one CPU). Each node offers one ``bench_slot`` resource; a
  measurement runs as a small task pinned to the trial's node that requires it, so measurements
  on a node take turns while the untimed work of the trials (passes, evaluation) runs in
  parallel. A target benchmark is a task that requires the target's own resources (or labels)
  and ``bench_slot``: it runs on the target's machine, alone. Trial folders and the step cache
  are paths the tasks write, so on a cluster of several machines the output folder must be on a
  filesystem every node mounts at the same path; target benchmarks get the model bytes with the
  task and need no shared files.

Ray is optional (the ``ray`` extra) and imported only for engine ray.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import multiprocessing
import os
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

from deployopt.core.errors import DeployoptError, UserError, one_line

T = TypeVar("T")
SLOT_RESOURCE = "bench_slot"


# -- benchmark slots ------------------------------------------------------------------------------

class FileSlot:
    """The machine's benchmark slot as an exclusive lock on a file; picklable (a path)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)

    def __call__(self, measure: Callable[[], T]) -> T:
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                return measure()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _measure_task(measure: Callable[[], T]) -> T:
    return measure()


class RaySlot:
    """Inside a Ray task: run the measurement as a task on this node that holds its ``bench_slot``.
    Waiting for it releases the trial's CPU, so other trials' untimed work goes on meanwhile."""

    def __call__(self, measure: Callable[[], T]) -> T:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        task = ray.remote(_measure_task).options(
            num_cpus=0, resources={SLOT_RESOURCE: 1}, max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
        return ray.get(task.remote(measure))


# -- the work of one trial and of one target benchmark ---------------------------------------------

def run_trial(task: dict[str, Any]) -> dict[str, Any]:
    """One optimize run into ``task['out_dir']``; its log goes to run.log there. Returns the exit
    code, the error (one line) when it raised, cache hits and misses, seconds and the node."""
    from deployopt import pipeline
    from deployopt.cache import StepCache
    from deployopt.recipe import from_mapping

    out = pathlib.Path(task["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cache = StepCache(task["cache"]) if task["cache"] else None
    outcome: dict[str, Any] = {"error": None, "node": os.uname().nodename, "pid": os.getpid()}
    with open(out / "run.log", "w", encoding="utf-8") as log, contextlib.redirect_stderr(log):
        try:
            base_path = pathlib.Path(task["base_path"]) if task["base_path"] else None
            result = pipeline.run(from_mapping(task["recipe"], base_path), out, cache=cache, bench_slot=task["slot"])
            outcome["exit_code"] = result.exit_code
        except DeployoptError as e:
            outcome.update(exit_code=e.exit_code, error=one_line(e))
        except Exception as e:  # a bug or a library failure: this trial fails, the sweep goes on
            outcome.update(exit_code=1, error=one_line(e, with_type=True))
        print(f"trial finished: exit {outcome['exit_code']}" + (f": {outcome['error']}" if outcome["error"] else ""),
              file=log)
    outcome.update(seconds=time.perf_counter() - start, cache_hits=cache.hits if cache else 0,
                   cache_misses=cache.misses if cache else 0)
    return outcome


def bench_target(task: dict[str, Any]) -> dict[str, Any]:
    """Latency of a candidate vs its input on this machine (the task's target): the models come
    as bytes, so the target needs no shared files. Returns the output row at the target's first
    threads and batch setting, or the error."""
    from deployopt.measure import latency
    from deployopt.measure.machine import stamp

    with tempfile.TemporaryDirectory(prefix="deployopt-target-") as tmp:
        paths = []
        for label in ("input", "output"):
            path = pathlib.Path(tmp) / f"{label}.onnx"
            path.write_bytes(task[label])
            paths.append(path)

        def measure():
            return latency.compare(paths, labels=["input", "output"], threads=task["threads"], batch=task["batch"],
                                   warmup=task["warmup"], runs=task["runs"], rounds=task["rounds"],
                                   timeout=task["timeout"], seed=task["seed"], shapes=task["shapes"], progress=False)
        try:
            result = task["slot"](measure) if task["slot"] is not None else measure()
        except Exception as e:
            return {"error": one_line(e, with_type=not isinstance(e, DeployoptError))}
    rows = [{k: v for k, v in row.items() if k != "samples_ms"} for row in result.rows]
    failed = [row for row in rows if row.get("error")]
    if failed:
        return {"error": f"{failed[0]['model']}: {one_line(failed[0]['error'])}", "rows": rows}
    node_id = None
    with contextlib.suppress(ImportError):
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    return {"error": None, "rows": rows, "node": os.uname().nodename, "node_id": node_id, "cpu": stamp().get("cpu")}


# -- engines --------------------------------------------------------------------------------------

class LocalEngine:
    """A pool of ``workers`` spawned processes (spawn: onnxruntime's threads do not survive fork)."""

    name = "local"

    def __init__(self, workers: int, out_dir: pathlib.Path) -> None:
        self.workers = workers
        self.slot = FileSlot(out_dir / ".bench-slot.lock")
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def submit_trial(self, task: dict[str, Any]):
        return self._pool.submit(run_trial, {**task, "slot": self.slot})

    def submit_target(self, target, task: dict[str, Any]):
        return self._pool.submit(bench_target, {**task, "slot": self.slot})

    def wait(self, handles: list) -> tuple[Any, Any]:
        """The first finished handle and its result (an exception becomes a failed outcome)."""
        done, _ = concurrent.futures.wait(handles, return_when=concurrent.futures.FIRST_COMPLETED)
        handle = next(iter(done))
        try:
            return handle, handle.result()
        except Exception as e:  # the worker died (a crash in onnxruntime): this work fails
            return handle, {"exit_code": 1, "error": f"worker process failed: {one_line(e, with_type=True)}"}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(OSError):
            os.unlink(self.slot.path)


def require_ray():
    try:
        import ray
    except ImportError as e:
        raise UserError("engine ray needs Ray, which is not installed: pip install 'deployopt[ray]'") from e
    return ray


#: Seconds to wait for a Ray cluster's address to accept a connection: ray.init itself retries an
#: unreachable address without end.
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str) -> None:
    """Refuse (one line, exit 2) a ``host:port`` or ``ray://host:port`` address that does not accept
    a TCP connection within CONNECT_TIMEOUT_S; ``auto`` and other forms are left to Ray."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"--address {address}: cannot connect to a Ray cluster there "
                        f"({e.strerror or type(e).__name__}, waited up to {CONNECT_TIMEOUT_S:g} s)") from e


class RayEngine:
    """Trials as Ray tasks on the cluster at ``address`` (None: a local instance with one
    ``bench_slot``). Every node that runs trials must offer ``bench_slot`` (start it with
    ``--resources '{"bench_slot": 1}'``): checked before any work."""

    name = "ray"

    def __init__(self, workers: int, address: str | None) -> None:
        ray = require_ray()
        self._ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            if address:
                _check_reachable(address)
            try:
                if address:
                    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
                else:
                    ray.init(num_cpus=workers, resources={SLOT_RESOURCE: 1}, include_dashboard=False,
                             log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, ValueError, RuntimeError) as e:
                if address:
                    raise UserError(f"--address {address}: cannot connect to a Ray cluster: {one_line(e)}") from e
                raise UserError(f"engine ray: cannot start a local Ray instance: {one_line(e)}") from e
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        lacking = [n.get("NodeManagerAddress", "?") for n in nodes
                   if n["Resources"].get("CPU") and not n["Resources"].get(SLOT_RESOURCE)]
        if lacking:
            self.close()
            raise UserError(f"--address {address}: node {lacking[0]} offers no '{SLOT_RESOURCE}' resource; start "
                            f"every node with --resources '{{\"{SLOT_RESOURCE}\": 1}}' (one benchmark at a time)")
        self.workers = workers
        self.slot = RaySlot()
        self._trial = ray.remote(run_trial).options(num_cpus=1, max_retries=0)
        self._bench = ray.remote(bench_target)

    def check_targets(self, targets) -> None:
        """Every target's resources must exist somewhere in the cluster (a task asking for
        resources no node has would wait forever)."""
        total = self._ray.cluster_resources()
        for i, target in enumerate(targets):
            for name, amount in target.resources.items():
                if total.get(name, 0) < amount:
                    raise UserError(f"targets[{i}].resources.{name}: no node of the cluster offers {amount:g} "
                                    f"(the cluster has {total.get(name, 0):g})")

    def submit_trial(self, task: dict[str, Any]):
        return self._trial.remote({**task, "slot": self.slot})

    def submit_target(self, target, task: dict[str, Any]):
        options: dict[str, Any] = {"num_cpus": 0, "max_retries": 0,
                                   "resources": {**target.resources, SLOT_RESOURCE: 1}}
        if target.labels:
            options["label_selector"] = dict(target.labels)
        return self._bench.options(**options).remote({**task, "slot": None})

    def wait(self, handles: list) -> tuple[Any, Any]:
        ready, _ = self._ray.wait(handles, num_returns=1)
        handle = ready[0]
        try:
            return handle, self._ray.get(handle)
        except Exception as e:  # the task's worker died
            return handle, {"exit_code": 1, "error": f"Ray task failed: {one_line(e, with_type=True)}"}

    def close(self) -> None:
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
