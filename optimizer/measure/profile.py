"""Per-node profile of an ONNX model on onnxruntime, mapped back to the saved model's nodes.

The profile is onnxruntime's (its profiler is what names the kernels it ran): on the CPU execution
provider by default, or on another built-in provider (``ep``). Other targets of
``deployopt.measure.runtime`` (OpenVINO) have no profile here and are refused.

Method
  * One worker process (``deployopt.measure.worker.Worker`` with this module's entry point, so a crash
    or a hang in onnxruntime cannot take the caller down) opens two sessions with the settings
    every latency number is recorded with (``deployopt.core.session``: intra-op threads as given,
    inter-op 1, sequential, the graph optimization level as given):
      - a plain one, timed exactly like ``deployopt bench`` times a model (perf_counter around
        ``session.run``);
      - one with onnxruntime's profiler on (``SessionOptions.enable_profiling``) that also saves
        the graph it executes (``SessionOptions.optimized_model_filepath``), both files in a
        private temporary folder that is always removed.
    ``isolated=False`` runs the same code in the calling process.
  * Each session gets ``warmup`` untimed runs, then ``runs`` runs; the two alternate in blocks so
    that drift of a shared host hits both alike.
  * The trace (Chrome trace JSON) holds, per run, one ``Session`` event ``model_run`` and one
    ``Node`` event ``<node name>_kernel_time`` per executed kernel (``args.op_name``,
    ``args.provider``, ``dur`` in µs). Node events are assigned to the ``model_run`` whose interval
    holds them and those of the first ``warmup`` runs are dropped. Then, over the measured runs R:

        mean_ms(node)  = sum(dur(node)) / |R| / 1000
        share(node)    = mean_ms(node) / total_node_ms,   total_node_ms = sum over nodes
        by_op_type[op] = sum of mean_ms over the nodes executed as ``op``
        end_to_end_ms  = mean wall time of the plain session's ``session.run``
        coverage       = total_node_ms / end_to_end_ms

    coverage < 1 is time spent outside kernels (binding inputs, allocating outputs, the executor's
    per-node bookkeeping, the Python call); on tiny models that overhead dominates. coverage > 1
    is the profiler's own cost: onnxruntime starts a kernel's clock before it sums the input
    sizes and stops it after it has built the event's arguments, so each kernel_time also holds
    a few µs of bookkeeping, and models with many small nodes read high.

Mapping executed nodes back to the saved model
  onnxruntime renames and fuses nodes (FusedConv keeps the Conv's name and produces the Relu's
  output; NCHWc kernels are named ``<output tensor>_nchwc``; layout-transformed QDQ groups become
  QLinearConv named ``<Conv name>_token_<k>``; inserted Transpose/Reorder nodes are new). No
  library records this provenance, so it is reconstructed by hand from the optimized graph
  onnxruntime saved:
    1. claims of an executed node N on original nodes, strongest first: N's name is an original
       node's name (3); N's name without onnxruntime's suffixes names an original node or an
       original tensor, whose producer it then claims (2); N produces an original tensor (1).
       Each original node is owned by its strongest claimant.
       Layout nodes onnxruntime inserts (Reorder*, Transpose) own nothing they only claim by
       tensor: they convert the layout of a value another kernel computed.
    2. nodes no executed node owns were fused or folded away. Such a node joins, until nothing
       changes, either the owner of the inputs it is the only consumer of (the producer side:
       epilogue ops such as Relu, Clip, Add, BatchNormalization, QuantizeLinear; with several
       such owners, the one executed last, the only one that can hold it), or the owner of all
       its consumers (the consumer side: DequantizeLinear, a Conv whose fused kernel is named
       after its Relu's output, constant subgraphs). Each op type tries its own side first and
       the other side only when the first found nothing anywhere in the graph.
  A row's ``original_nodes`` are its claims plus the nodes that joined it, in graph order with
  QuantizeLinear/DequantizeLinear last; inserted layout nodes have none. Original nodes nothing
  accounts for (dead or removed) are listed in ``unmapped_original``. Nodes inside If/Loop/Scan
  bodies are mapped by name alone, and their time is also part of their parent node's row.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import pathlib
import re
import signal
import tempfile

import numpy as np

from deployopt.core.errors import UserError, WorkFailed, one_line
from deployopt.core.session import CPU, OPT_LEVELS, open_session, session_options
from deployopt.measure import machine as machine_mod
from deployopt.measure.inputs import check_settings, plan_feeds
from deployopt.measure.memory import peak_rss_mb
from deployopt.measure.model_io import input_specs, load_proto
from deployopt.measure.runtime import DEFAULT_EP, check_target
from deployopt.measure.timing import time_runs
from deployopt.measure.worker import Worker, WorkerFailure

DEFAULT_TIMEOUT_S = 600.0
#: Suffixes (and a prefix) onnxruntime appends when it creates a node in place of another one:
#: Graph::GenerateNodeName's "_token_<k>", the NCHWc transformer's "_nchwc", and the spellings
#: other quantization/fusion tools use.
_ORT_SUFFIX = re.compile(r"(_token_\d+|_nchwc|_quant|_fused)$")
_ORT_PREFIX = re.compile(r"^fused ")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
#: Ops onnxruntime fuses into the kernel that produces their input (activation and Add/Mul
#: epilogues, BatchNormalization into Conv, a QuantizeLinear into its producer's node unit) or
#: removes; every other vanished op (DequantizeLinear, a Conv named after its Relu's output,
#: constant and shape subgraphs) went into the kernel that consumes its output.
_EPILOGUE = frozenset({
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Elu", "Selu",
    "Softplus", "PRelu", "Gelu", "Add", "Sum", "Mul", "Sub", "Div", "BatchNormalization",
    "QuantizeLinear", "Identity", "Dropout", "Cast"})
#: Data-layout ops onnxruntime inserts (NCHWc reorders, NHWC transposes).
_LAYOUT = frozenset({"ReorderInput", "ReorderOutput", "Transpose"})
_KERNEL_SUFFIX = "_kernel_time"


# -- result -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NodeTime:
    """One executed node: mean time per run and the saved model's nodes it stands for."""

    node: str  # onnxruntime's name for the node it executed
    op_type: str  # as executed (FusedConv, QLinearConv, Conv of the NCHWc domain is "Conv", ...)
    original_nodes: list[str]
    mean_ms: float
    share: float  # of total_node_ms
    provider: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Profile:
    model: str
    rows: list[NodeTime]  # most expensive first
    by_op_type: dict[str, float]  # op_type -> ms per run, most expensive first
    total_node_ms: float
    end_to_end_ms: float
    coverage: float
    machine: dict
    settings: dict
    profiled_run_ms: float = 0.0  # mean ``model_run`` in the trace (profiler on)
    unmapped_original: list[str] = dataclasses.field(default_factory=list)
    label: str = ""  # display name (default: the file name)

    @property
    def title(self) -> str:
        return self.label or pathlib.Path(self.model).name

    def top(self, n: int = 10) -> list[NodeTime]:
        return self.rows[:n]

    def top_op_types(self, n: int = 10) -> list[tuple[str, float]]:
        return list(self.by_op_type.items())[:n]

    def to_dict(self) -> dict:
        return {"model": self.model, "label": self.title, "machine": self.machine,
                "settings": self.settings, "end_to_end_ms": self.end_to_end_ms,
                "total_node_ms": self.total_node_ms, "coverage": self.coverage,
                "profiled_run_ms": self.profiled_run_ms, "by_op_type": dict(self.by_op_type),
                "rows": [r.to_dict() for r in self.rows],
                "unmapped_original": list(self.unmapped_original)}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    def _summary(self) -> str:
        s = self.settings
        return (f"threads {s['threads']}, batch {s['batch']}, {s['graph_optimization_level']}, "
                f"{s['runs']} runs after {s['warmup']} warm-up: kernels "
                f"{self.total_node_ms:.3f} ms per run, end-to-end {self.end_to_end_ms:.3f} ms, "
                f"coverage {self.coverage:.2f}")

    def _tables(self, n: int) -> tuple[list[list[str]], list[list[str]]]:
        count = {}
        for r in self.rows:
            count[r.op_type] = count.get(r.op_type, 0) + 1
        nodes = [[r.node, r.op_type, f"{r.mean_ms:.3f}", f"{r.share:.1%}",
                  _originals_text(r.original_nodes)] for r in self.top(n)]
        ops = [[op, f"{ms:.3f}", f"{ms / self.total_node_ms if self.total_node_ms else 0:.1%}",
                str(count[op])] for op, ms in self.top_op_types(n)]
        return nodes, ops

    def to_text(self, n: int = 10) -> str:
        nodes, ops = self._tables(n)
        lines = [f"profile of {self.title} ({self._summary()})", "",
                 *_aligned([["node", "op type", "ms", "share", "original nodes"], *nodes],
                           right=(2, 3)), "",
                 *_aligned([["op type", "ms", "share", "nodes"], *ops], right=(1, 2, 3))]
        return "\n".join(lines) + "\n"

    def to_markdown(self, n: int = 10) -> str:
        nodes, ops = self._tables(n)
        esc = [[c.replace("|", "\\|") for c in row] for row in nodes]
        lines = [f"**{self.title}**: {self._summary()}", "",
                 "| node | op type | ms | share | original nodes |", "|---|---|---:|---:|---|",
                 *("| " + " | ".join(row) + " |" for row in esc), "",
                 "| op type | ms | share | nodes |", "|---|---:|---:|---:|",
                 *("| " + " | ".join(row) + " |" for row in ops), "",
                 f"- machine: {machine_mod.stamp_line(self.machine)}"]
        if self.unmapped_original:
            lines.append(f"- original nodes with no executed counterpart: "
                         f"{_originals_text(self.unmapped_original, limit=8)}")
        return "\n".join(lines) + "\n"


def _originals_text(names: list[str], limit: int = 3) -> str:
    if not names:
        return "(inserted by onnxruntime)"
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _aligned(rows: list[list[str]], right=()) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    out.insert(1, "-" * len(out[0]))
    return out


# -- trace --------------------------------------------------------------------------------------

def parse_trace(events: list[dict], skip_runs: int) -> dict:
    """Per-node kernel time of the runs after the first ``skip_runs`` (see module doc).

    Returns {"runs": measured runs, "nodes": {name: {op_type, provider, total_us}},
    "run_us": [model_run durations of the measured runs]}. Raises ValueError when the trace
    holds no more runs than ``skip_runs``.
    """
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) <= skip_runs:
        raise ValueError(f"the trace holds {len(runs)} runs, {skip_runs} of them warm-up")
    starts = [start for start, _ in runs]
    nodes: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith(_KERNEL_SUFFIX):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < skip_runs or e["ts"] > runs[i][1]:  # a warm-up run (or outside every run)
            continue
        args = e.get("args", {})
        name = e["name"][: -len(_KERNEL_SUFFIX)]
        entry = nodes.setdefault(name, {"op_type": args.get("op_name", "?"),
                                        "provider": args.get("provider", "?"), "total_us": 0.0})
        entry["total_us"] += float(e["dur"])
    return {"runs": len(runs) - skip_runs, "nodes": nodes,
            "run_us": [end - start for start, end in runs[skip_runs:]]}


# -- mapping ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GraphNode:
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def graph_nodes(graph) -> list[GraphNode]:
    """The nodes of an onnx.GraphProto as GraphNode (empty input names dropped)."""
    return [GraphNode(n.name, n.op_type, tuple(i for i in n.input if i),
                      tuple(o for o in n.output if o)) for n in graph.node]


def _stripped(name: str) -> list[str]:
    """``name`` without onnxruntime's suffixes, shortest-strip first: a_token_3_nchwc ->
    [a_token_3, a]."""
    out = []
    current = _ORT_PREFIX.sub("", name)
    if current != name:
        out.append(current)
    while (m := _ORT_SUFFIX.search(current)) is not None and m.start() > 0:
        current = current[: m.start()]
        out.append(current)
    return out


def map_nodes(original: list[GraphNode], executed: list[GraphNode],
              graph_outputs: tuple[str, ...] = ()) -> tuple[dict[str, list[str]], list[str]]:
    """{executed node name: original node names} and the original nodes nothing accounts for.

    The algorithm is in the module doc. ``executed`` may contain nodes that only have a name
    (no inputs/outputs): they are mapped by name alone.
    """
    index = {n.name: i for i, n in enumerate(original) if n.name}
    producer = {t: i for i, n in enumerate(original) for t in n.outputs}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(original):
        for t in set(n.inputs):
            consumers.setdefault(t, []).append(i)
    outputs = set(graph_outputs)

    claims: dict[int, dict[int, int]] = {}  # executed index -> {original index: rank}
    for j, node in enumerate(executed):
        mine: dict[int, int] = {}
        if node.name in index:
            mine[index[node.name]] = 3
        else:
            for base in _stripped(node.name):
                hit = index.get(base, producer.get(base))
                if hit is not None:
                    mine[hit] = 2
                    break
        for t in node.outputs:
            if t in producer:
                mine.setdefault(producer[t], 1)
        claims[j] = mine
    owner: dict[int, int] = {}
    best: dict[int, int] = {}
    for j, mine in claims.items():
        if executed[j].op_type in _LAYOUT and max(mine.values(), default=0) < 2:
            continue  # a layout conversion onnxruntime inserted: it computes none of its claims
        for i, rank in mine.items():
            if rank > best.get(i, 0):  # ties keep the first claimant
                owner[i], best[i] = j, rank

    def consumers_owner(i: int) -> int | None:
        node = original[i]
        if any(t in outputs for t in node.outputs):
            return None
        users = {c for t in node.outputs for c in consumers.get(t, [])}
        owners = {owner.get(c) for c in users}
        return owners.pop() if len(owners) == 1 and None not in owners and users else None

    def inputs_owner(i: int) -> int | None:
        owners = {owner.get(producer[t]) for t in original[i].inputs
                  if t in producer and t not in outputs and consumers.get(t) == [i]}
        if not owners or None in owners:
            return None
        # Two fused kernels feeding an Add only they use (ResNet's downsample branch): the Add
        # can only have been fused into the one that runs last, since it needs both inputs
        # (``executed`` is in the topological order onnxruntime saves its graph in).
        return max(owners)

    def preferred(i: int) -> int | None:
        return (inputs_owner if original[i].op_type in _EPILOGUE else consumers_owner)(i)

    def fallback(i: int) -> int | None:
        return (consumers_owner if original[i].op_type in _EPILOGUE else inputs_owner)(i)

    def sweep(rule) -> bool:
        # Decide on a snapshot, so that the result does not depend on the node order.
        found = {i: j for i in range(len(original)) if i not in owner
                 and (j := rule(i)) is not None}
        owner.update(found)
        return bool(found)

    # The preferred direction to a fixpoint first: relu(add(conv)) must reach the conv's kernel
    # through the Add before the Relu may fall back to the kernel consuming it.
    while True:
        while sweep(preferred):
            pass
        if not sweep(fallback):
            break

    members: dict[int, set[int]] = {j: set(mine) for j, mine in claims.items()}
    for i, j in owner.items():
        members[j].add(i)

    def order(i: int) -> tuple[bool, int]:
        return original[i].op_type in _QDQ, i

    mapping = {node.name: [_label(original, i) for i in sorted(members[j], key=order)]
               for j, node in enumerate(executed)}
    claimed = {i for mine in claims.values() for i in mine}
    unmapped = [_label(original, i) for i in range(len(original))
                if i not in owner and i not in claimed]
    return mapping, unmapped


def _label(nodes: list[GraphNode], i: int) -> str:
    return nodes[i].name or f"<unnamed {nodes[i].op_type} #{i}>"


# -- measurement (runs in the worker, or in-process with isolated=False) -------------------------

def run_blocks(runs: int, count: int = 5) -> list[int]:
    """``runs`` split into at most ``count`` nearly equal blocks."""
    count = min(count, runs)
    return [runs // count + (1 if k < runs % count else 0) for k in range(count)]


def measure(model_path: str, optimization_level: str, threads: int, feeds: dict, warmup: int,
            runs: int, folder: str, ep: str | None = None) -> dict:
    """Time a plain session and profile an identical one (see module doc); plain data out."""
    import onnx

    folder = pathlib.Path(folder)
    providers = None if ep is None else [ep, *CPU]  # nodes the EP cannot run go to the CPU provider
    plain = open_session(model_path, threads=threads, optimization_level=optimization_level, providers=providers)
    options = session_options(threads, optimization_level, optimized_path=folder / "optimized.onnx")
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "trace")
    profiled = open_session(model_path, options=options, providers=providers)
    for _ in range(warmup):
        plain.run(None, feeds)
        profiled.run(None, feeds)
    plain_ns, profiled_ns = [], []
    for size in run_blocks(runs):
        plain_ns.append(time_runs(lambda: plain.run(None, feeds), size)[0])
        profiled_ns.append(time_runs(lambda: profiled.run(None, feeds), size)[0])
    trace_path = profiled.end_profiling()
    with open(trace_path, encoding="utf-8") as f:
        trace = parse_trace(json.load(f), skip_runs=warmup)
    if trace["runs"] != runs:
        raise RuntimeError(f"the profiler recorded {trace['runs'] + warmup} runs, "
                           f"expected {runs + warmup}")
    optimized = onnx.load(str(folder / "optimized.onnx"), load_external_data=False)
    return {"trace": trace, "executed": graph_nodes(optimized.graph),
            "plain_ms": np.concatenate(plain_ns) / 1e6,
            "profiled_ms": np.concatenate(profiled_ns) / 1e6}


def worker_main(conn, model_path: str, optimization_level: str) -> None:
    """Worker entry (deployopt.measure.worker protocol): ("profile", threads, feeds, warmup, runs,
    folder, ep) -> ("ok", measure(...), None, rss_mb) or ("error", one-line reason, rss_mb)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn.send(("ready", peak_rss_mb()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        _, threads, feeds, warmup, runs, folder, ep = message
        try:
            result = measure(model_path, optimization_level, threads, feeds, warmup, runs, folder, ep)
        except Exception as e:  # onnxruntime raises plain RuntimeError subclasses
            conn.send(("error", one_line(e), peak_rss_mb()))
            continue
        conn.send(("ok", result, None, peak_rss_mb()))


# -- public entry -------------------------------------------------------------------------------

def profile_model(path: str | os.PathLike, *, threads: int = 1, runs: int = 50, warmup: int = 10,
                  shapes: dict[str, tuple] | None = None, seed: int = 0,
                  optimization_level: str = "all", batch: int | None = None, data=None,
                  isolated: bool = True, timeout: float | None = DEFAULT_TIMEOUT_S,
                  label: str | None = None, runtime: str = "onnxruntime", ep: str | None = None) -> Profile:
    """Profile ``path`` on onnxruntime (see module doc), on the execution provider ``ep``.

    Inputs are random (seeded, ``deployopt.measure.inputs``) unless ``data`` (a Dataset) is
    given; ``shapes`` {input name: full shape} resolves dynamic dims, and ``batch`` (default: the
    first dim of a given shape, else 1) fills a dynamic batch dimension. ``isolated`` runs the
    sessions in a worker process that is killed after ``timeout`` seconds (None: no limit).
    UserError for bad settings, a file that is not a model or a target with no profile here;
    WorkFailed when onnxruntime fails, crashes or times out.
    """
    target = check_target(runtime, ep, key="runtime", ep_key="ep")
    if target.runtime != "onnxruntime" or "=" in (target.ep or ""):
        raise UserError(f"profile: per-node profiles are onnxruntime's built-in providers' only, not "
                        f"{target.label}")
    ep = None if target.ep_name == DEFAULT_EP else target.ep_name
    shapes = {k: tuple(v) for k, v in (shapes or {}).items()}
    if batch is None:
        batch = next((s[0] for s in shapes.values() if s), 1)
    check_settings(threads=(threads,), batch=(batch,), warmup=warmup, runs=runs, rounds=1,
                   timeout=timeout, optimization_level=optimization_level)
    path = str(path)
    proto = load_proto(path)
    specs = input_specs(proto)
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise UserError(f"shapes: {path} has no input named {unknown[0]!r} "
                        f"(inputs: {', '.join(s.name for s in specs)})")
    feeds = plan_feeds(path, specs, (batch,), shapes, data, seed)[batch]
    original = graph_nodes(proto.graph)
    graph_outputs = tuple(o.name for o in proto.graph.output)
    del proto

    with tempfile.TemporaryDirectory(prefix="deployopt-profile-") as folder:
        if isolated:
            raw = _isolated(path, optimization_level, threads, feeds, warmup, runs, folder,
                            timeout, ep)
        else:
            try:
                raw = measure(path, optimization_level, threads, feeds, warmup, runs, folder, ep)
            except Exception as e:
                raise WorkFailed(f"{path}: profiling failed: {one_line(e)}") from e

    trace = raw["trace"]
    node_rows, unmapped = _rows(trace, original, raw["executed"], graph_outputs)
    total = float(sum(r.mean_ms for r in node_rows))
    by_op: dict[str, float] = {}
    for r in node_rows:
        by_op[r.op_type] = by_op.get(r.op_type, 0.0) + r.mean_ms
    end_to_end = float(np.mean(raw["plain_ms"]))
    settings = {"threads": threads, "batch": batch, "runs": runs, "warmup": warmup, "seed": seed,
                "graph_optimization_level": OPT_LEVELS[optimization_level],
                "inputs": {k: list(v.shape) for k, v in feeds.items()},
                "data": None if data is None else data.name,
                "session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                                    "execution_mode": "ORT_SEQUENTIAL"},
                **target.stamp(),
                "profiled_wall_ms": float(np.mean(raw["profiled_ms"]))}
    return Profile(model=path, rows=node_rows,
                   by_op_type=dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
                   total_node_ms=total, end_to_end_ms=end_to_end,
                   coverage=total / end_to_end if end_to_end > 0 else 0.0,
                   machine=machine_mod.stamp(), settings=settings,
                   profiled_run_ms=float(np.mean(trace["run_us"])) / 1000.0,
                   unmapped_original=unmapped, label=label or pathlib.Path(path).name)


def _rows(trace: dict, original: list[GraphNode], executed: list[GraphNode],
          graph_outputs: tuple[str, ...]) -> tuple[list[NodeTime], list[str]]:
    """NodeTime rows, most expensive first, and the original nodes nothing accounts for."""
    mapping, unmapped = map_nodes(original, executed, graph_outputs)
    timed = []
    for name, entry in trace["nodes"].items():
        if name not in mapping:  # not in the saved main graph (a subgraph's node): by name alone
            mapping.update(map_nodes(original, [GraphNode(name, entry["op_type"], (), ())])[0])
        timed.append((name, entry, entry["total_us"] / trace["runs"] / 1000.0))
    total = float(sum(ms for _, _, ms in timed))
    timed.sort(key=lambda r: -r[2])
    rows = [NodeTime(node=name, op_type=entry["op_type"], original_nodes=mapping[name],
                     mean_ms=ms, share=ms / total if total > 0 else 0.0,
                     provider=entry["provider"]) for name, entry, ms in timed]
    return rows, unmapped


def _isolated(path, optimization_level, threads, feeds, warmup, runs, folder, timeout, ep) -> dict:
    worker = Worker(path, optimization_level, budget=timeout, entry=worker_main)
    try:
        worker.wait_ready()
        reply = worker.request(("profile", threads, feeds, warmup, runs, folder, ep))
    except WorkerFailure as e:
        raise WorkFailed(f"{path}: profiling failed: {e}") from None
    finally:
        worker.stop()
    return reply[1]
