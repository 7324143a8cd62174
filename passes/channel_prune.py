"""Structured channel pruning: remove whole channels so Conv/Gemm layers get physically smaller.

Zeroed weights do not make onnxruntime's dense kernels faster; fewer channels do. A Conv
``W [C_out, C_in, kh, kw]`` costs ``N·C_out·H·W·C_in·kh·kw`` MACs, so keeping a fraction ``k`` of
the channels between two convolutions cuts the second one's cost by ``k`` (input side) and the
first one's by ``k`` (output side): interior layers cost about ``k²``.

Steps (``passes.channel_groups`` finds what is tied to what):

1. Channel groups: every set of tensors sharing one channel axis, through BatchNorm,
   activations, depthwise convolutions, residual Adds and Concats, with the layers that produce
   (sources) and consume (sinks) its channels. Groups containing anything that cannot be mapped
   stay whole and are reported with the reason.
2. Ranking, per group of ``C`` channels:
   ``l1``/``l2``: ``s_c = Σ_sources ‖W_s[c]‖_p · |γ_c|/√(σ²_c + ε) / mean_c(…)`` — each source's
   output-filter norm, scaled by the BatchNorm that follows it (what the channel really outputs),
   normalised per source so residual groups weigh every producer equally;
   ``activation``: ``s_c = Σ_sinks E[x_c²]·‖W_sink[:, c]‖²`` on calibration data, the energy the
   channel carries into the layers that read it.
3. Counts: ``n = min(C, max(min(C, min_channels), ⌈k·C / round_to⌉·round_to))``: never zero, never
   more than ``C``; multiples of ``round_to`` keep the SIMD kernels' channel blocks full.
   ``scope: layer`` applies it to each group; ``scope: global`` ranks the mean-normalised scores
   of all groups together, keeps the top ``k·ΣC``, then rounds each group's count the same way.
   ``scope: sensitivity`` keeps the MACs of ``scope: layer`` but chooses each group's count
   from measured damage: every group alone is pruned to a few counts on ``sensitivity_samples``
   calibration samples (same ranking, compensation and reconstruction as below), its output
   error measured on the next ``sensitivity_samples`` (held out from the fit), and the counts
   allocated greedily by error per MAC saved (``passes.channel_budget``). Cost: one pruned copy,
   refit and run per group and rung (about 4 per group): EfficientNet-Lite0 at batch 1 has 89
   trials, 340 s on 2 cores.
   The top-``n`` channels by score are kept (ties: lower index).
4. Slicing: source output rows (and biases), BN parameters, depthwise filters (and ``group``),
   per-channel constants, sink input columns (blocks of ``H·W`` columns after a Flatten), Concat
   offsets, constant Reshape targets; then shapes are re-inferred. The model's inputs and outputs
   keep their shapes.
5. Mean compensation (with calibration data, ``passes.channel_reconstruct``): each layer reading
   removed channels adds their mean contribution ``Σ_c Σ_k W[o, c, k]·E[x_c]`` to its bias, so
   a removed channel takes away only its variations, not its average.
6. Reconstruction (``passes.channel_reconstruct`` on the engine of ``passes.reconstruct``): each
   sink layer's weights and bias are re-solved by ridge least squares so that, on calibration
   data, its output on the pruned model's inputs matches the dense model's output.

``exclude`` (fnmatch patterns on node names or weight names of Conv/Gemm/MatMul layers) keeps the
output channels of matching layers: a group whose producers match stays whole. Their inputs may
still shrink when their producers are pruned.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import math
import time
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from deployopt.core.data import ArrayDataset
from deployopt.core.errors import UserError
from deployopt.core.session import run_outputs
from deployopt.core.settings import setting
from deployopt.core.stats import model_stats
from deployopt.passes import channel_budget as budget
from deployopt.passes import channel_reconstruct as recon
from deployopt.passes.base import DeployInPlacePass
from deployopt.passes.channel_groups import ChannelGroup, attr_int, const_array, find_channel_groups
from deployopt.passes.reconstruct import model_input

LAYER_OPS = ("Conv", "Gemm", "MatMul")


def _output_axis(node: ir.Node) -> int:
    """Axis of the weight (input 1) that indexes the layer's output channels."""
    if node.op_type == "Gemm":
        return 0 if attr_int(node, "transB", 0) else 1
    return 1 if node.op_type == "MatMul" else 0


def _input_axis(node: ir.Node) -> int:
    """Axis of the weight (input 1) that indexes the layer's input channels/columns."""
    if node.op_type == "Gemm":
        return 1 if attr_int(node, "transB", 0) else 0
    return 0 if node.op_type == "MatMul" else 1


def _rows(array: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1).astype(np.float64)


def _expand(index: np.ndarray, block: int) -> np.ndarray:
    return (index[:, None] * block + np.arange(block)[None, :]).reshape(-1)


@dataclasses.dataclass
class ChannelPrunePass(DeployInPlacePass):
    """Remove a ``keep`` complement of the channels of every prunable channel group."""

    name: ClassVar[str] = "channel_prune"

    keep: float = setting(0.5, low=0, high=1, low_open=True)  # fraction of channels kept
    # "layer": each group keeps `keep`; "global": ranked across groups; "sensitivity": the MACs
    # of "layer", spent where measured damage is least (needs calibration data)
    scope: Literal["layer", "global", "sensitivity"] = "layer"
    # "l1" | "l2" (weight norms) | "activation" (calibration energy). With scope sensitivity and
    # then recover, activation reached the lower held-out KL on both real-weight networks:
    # MobileNetV2 keep 0.75 0.513 against l1's 0.646 (agreement 69.8% / 68.6%), EfficientNet-Lite0
    # keep 0.9 0.054 against 0.077 (90.9% / 88.0%; 88.6% / 85.0% already before recover); on
    # resnet_mnist it ties or beats l1 at every keep. l1 stays the default: it needs no data.
    criterion: Literal["l1", "l2", "activation"] = "l1"
    round_to: int = setting(8, low=1)  # kept counts are multiples of this (or the whole group)
    min_channels: int = setting(8, low=1)  # never fewer in a group (or the whole group)
    compensate: bool | None = None  # removed channels' means into the readers' biases; None: with calibration data
    reconstruct: bool | None = None  # None: when calibration data exists
    ridge: float = setting(1e-3, low=0)  # least-squares damping, relative to the mean input energy
    samples: int = setting(256, low=1)  # calibration samples for activation energy and reconstruction
    exclude: list[str] = setting(default_factory=list)  # name patterns of layers to keep whole
    sensitivity_samples: int = setting(64, low=1)  # calibration samples per sensitivity trial

    # -- the pass --------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        data = self.context.calibration
        if self.criterion == "activation" and data is None:
            raise UserError("criterion: 'activation' ranks channels on calibration data, and "
                            "there is none (set data.calibration in the recipe)")
        if self.scope == "sensitivity" and data is None:
            raise UserError("scope: 'sensitivity' measures each group's damage on calibration data, "
                            "and there is none (set data.calibration in the recipe)")
        if self.reconstruct is True and data is None:
            raise UserError("reconstruct: true needs calibration data, and there is none "
                            "(set data.calibration in the recipe)")
        if self.compensate is True and data is None:
            raise UserError("compensate: true needs calibration data, and there is none "
                            "(set data.calibration in the recipe)")
        reconstruct = data is not None if self.reconstruct is None else self.reconstruct
        compensate = data is not None if self.compensate is None else self.compensate
        self._check_patterns(model.graph)
        if data is not None and (reconstruct or compensate or self.criterion == "activation"):
            recon.check_data(model, data, "data.calibration")

        ir_common.NameFixPass()(model)  # every value needs a name to be captured in onnxruntime
        ir_common.TopologicalSortPass()(model)
        ir_common.ShapeInferencePass()(model)
        groups = find_channel_groups(model.graph)
        excluded = self._excluded(groups)
        candidates = [g for g in groups if not g.whole and not g.derived and g not in excluded]
        for g in groups:
            if g.whole:
                self.note(f"group '{g.label}' ({g.channels} channels) left whole: {g.reasons[0]}")
            elif g in excluded:
                self.note(f"group '{g.label}' ({g.channels} channels) left whole: excluded by "
                          f"pattern '{excluded[g]}'")
        details = self.details
        details["groups"] = []
        if not candidates:
            self.note("nothing prunable: no channel group can lose channels "
                      f"({len(groups)} group(s) found, all left whole); the model is unchanged")
            details["groups"] = [self._group_record(g, None, excluded) for g in groups]
            return ir.passes.PassResult(model, modified=False)

        moments = self._sink_moments(model, candidates, data) if (
            compensate or self.criterion == "activation") else {}
        scores = self._scores(candidates, moments)
        if self.scope == "sensitivity":
            counts = self._sensitivity_counts(model, groups, candidates, scores, moments, data,
                                              compensate=compensate, reconstruct=reconstruct)
        else:
            counts = self._counts(candidates, scores, self.scope)
        kept = self._with_concats(groups, self._select(candidates, scores, counts))
        details["groups"] = [self._group_record(g, kept.get(g), excluded) for g in groups]
        if not kept:
            self.note(f"no channel removed: keep={self.keep} rounded to multiples of "
                      f"{self.round_to} (min {self.min_channels}) keeps every group whole")
            return ir.passes.PassResult(model, modified=False)

        original = model.clone() if reconstruct else None
        details["macs_before"] = model_stats(model)["macs"]
        shifts = self._mean_shifts(kept, moments) if compensate else {}
        self._slice(model, kept)
        if compensate:
            done, skipped = self._apply_shifts(model, kept, shifts)
            details["mean_compensated"] = done
            note = f"mean compensation: {done} layer(s) took the removed channels' means into their bias"
            if skipped:
                note += f"; not {', '.join(skipped)} (no per-output bias to take it)"
            self.note(note)
        removed = sum(g.channels - len(i) for g, i in kept.items() if not g.derived)
        total = sum(g.channels for g in candidates)
        self.note(f"removed {removed} of {total} channels in {sum(not g.derived for g in kept)} "
                  f"group(s) (keep={self.keep}, scope={self.scope}, criterion={self.criterion}, "
                  f"round_to={self.round_to})")
        if reconstruct:
            self._reconstruct(original, model, kept, data)
        elif data is None:
            self.note("no reconstruction: layers reading pruned channels keep their sliced "
                      "weights (reconstruction needs data.calibration)")
        details["macs_after"] = model_stats(model)["macs"]
        return ir.passes.PassResult(model, modified=True)

    # -- exclusion -----------------------------------------------------------------------------
    @staticmethod
    def _names(node: ir.Node) -> list[str]:
        names = [node.name] if node.name else []
        if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
            names.append(node.inputs[1].name)
        return names

    def _check_patterns(self, graph: ir.Graph) -> None:
        names = [n for node in graph if node.op_type in LAYER_OPS for n in self._names(node)]
        for pattern in self.exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise UserError(f"exclude: pattern '{pattern}' matches no Conv/Gemm/MatMul layer "
                                "(by node or weight name)")

    def _excluded(self, groups: list[ChannelGroup]) -> dict[ChannelGroup, str]:
        found = {}
        for g in groups:
            for node in g.sources:
                hit = next((p for p in self.exclude for n in self._names(node)
                            if fnmatch.fnmatchcase(n, p)), None)
                if hit is not None:
                    found[g] = hit
                    break
        return found

    # -- ranking ---------------------------------------------------------------------------------
    def _scores(self, groups: list[ChannelGroup], moments: dict) -> dict[ChannelGroup, np.ndarray]:
        if self.criterion == "activation":
            return self._activation_scores(groups, moments)
        p = 1 if self.criterion == "l1" else 2
        scores = {}
        for g in groups:
            total = np.zeros(g.channels)
            for node in g.sources:
                rows = _rows(const_array(node.inputs[1]), _output_axis(node))
                norm = np.abs(rows).sum(1) if p == 1 else np.sqrt((rows * rows).sum(1))
                norm = norm * self._bn_scale(node, g.channels)
                mean = norm.mean()
                total += norm / mean if mean > 0 else norm
            scores[g] = total
        return scores

    @staticmethod
    def _bn_scale(node: ir.Node, channels: int) -> np.ndarray:
        """|γ|/√(σ² + ε) of a BatchNormalization reading only this layer's output, else 1."""
        uses = node.outputs[0].uses()
        if len(uses) != 1 or uses[0].node.op_type != "BatchNormalization" or uses[0].idx != 0:
            return np.ones(channels)
        bn = uses[0].node
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        gamma, var = const_array(bn.inputs[1]), const_array(bn.inputs[4])
        return np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)

    @staticmethod
    def _involved(groups: list[ChannelGroup]) -> list[ChannelGroup]:
        """The groups and the Concat outputs they feed."""
        involved: list[ChannelGroup] = []
        todo = list(groups)
        while todo:
            g = todo.pop()
            if g not in involved:
                involved.append(g)
                todo += [d for d, _ in g.concat_users]
        return involved

    def _sink_moments(self, model: ir.Model, groups: list[ChannelGroup], data) -> dict:
        """``(E[x], E[x²])`` of every sink input of these groups, one run over the calibration data."""
        names = sorted({s.node.inputs[0].name for g in self._involved(groups) for s in g.sinks})
        return recon.channel_moments(model, names, data, self.samples, self.context.threads) if names else {}

    def _activation_scores(self, groups: list[ChannelGroup], moments: dict) -> dict[ChannelGroup, np.ndarray]:
        energy = {name: squares for name, (_, squares) in moments.items()}

        cache: dict[ChannelGroup, np.ndarray] = {}

        def raw(g: ChannelGroup) -> np.ndarray:
            if g not in cache:
                total = np.zeros(g.channels)
                for sink in g.sinks:
                    cols = _rows(const_array(sink.node.inputs[1]), _input_axis(sink.node))
                    contribution = energy[sink.node.inputs[0].name] * (cols * cols).sum(1)
                    total += contribution.reshape(g.channels, sink.block).sum(1)
                for derived, offset in g.concat_users:
                    total += raw(derived)[offset: offset + g.channels]
                cache[g] = total
            return cache[g]

        return {g: raw(g) for g in groups}

    # -- counts ------------------------------------------------------------------------------------
    def _round(self, n: float, channels: int) -> int:
        n = math.ceil(n - 1e-9)
        n = -(-n // self.round_to) * self.round_to
        return int(min(channels, max(n, min(channels, self.min_channels), 1)))

    def _counts(self, groups: list[ChannelGroup], scores: dict, scope: str) -> dict[ChannelGroup, int]:
        """Channels kept per group, for ``scope`` layer or global."""
        if scope == "layer":
            return {g: self._round(self.keep * g.channels, g.channels) for g in groups}
        normed = {g: s / s.mean() if s.mean() > 0 else np.ones_like(s) for g, s in scores.items()}
        pooled = np.sort(np.concatenate(list(normed.values())))[::-1]
        target = max(1, math.ceil(self.keep * len(pooled) - 1e-9))
        threshold = pooled[target - 1]
        return {g: self._round(int((normed[g] >= threshold).sum()), g.channels) for g in groups}

    @staticmethod
    def _select(groups: list[ChannelGroup], scores: dict, counts: dict) -> dict[ChannelGroup, np.ndarray]:
        """The top-``counts[g]`` channels of each group that loses any (ties: lower index)."""
        kept = {}
        for g in groups:
            n = counts.get(g, g.channels)
            if n < g.channels:
                order = np.argsort(-scores[g], kind="stable")
                kept[g] = np.sort(order[:n])
        return kept

    @staticmethod
    def _with_concats(groups: list[ChannelGroup], kept: dict) -> dict[ChannelGroup, np.ndarray]:
        """``kept`` plus the Concat outputs, which follow their inputs."""
        for g in groups:
            if g.derived and not g.whole and any(p.group in kept for p in g.parts):
                kept[g] = np.concatenate([
                    p.offset + (kept[p.group] if p.group in kept else np.arange(p.channels))
                    for p in g.parts])
        return kept

    # -- sensitivity scope -------------------------------------------------------------------------
    def _sensitivity_counts(self, model: ir.Model, groups: list[ChannelGroup], candidates: list[ChannelGroup],
                            scores: dict, moments: dict, data, *, compensate: bool,
                            reconstruct: bool) -> dict[ChannelGroup, int]:
        """Counts from measured damage under the MACs of ``scope: layer`` (``passes.channel_budget``)."""
        start = time.perf_counter()
        layer_macs = {layer["name"]: layer["macs"] for layer in model_stats(model)["layers"]}
        unknown = [name for name, m in layer_macs.items() if m is None]
        if unknown:
            self.note(f"sensitivity: no MACs budget: layer '{unknown[0]}' has no static shape to count "
                      "its MACs from (fix the input shape, e.g. input_shape in the recipe); the "
                      "counts of scope layer are used")
            return self._counts(candidates, scores, "layer")
        macs = budget.ChannelMacs(groups, layer_macs)
        target = macs(self._counts(candidates, scores, "layer"))
        # Reconstruction fits on the first sensitivity_samples; the damage is measured on the
        # next ones: fitted samples would hide an overfitted layer (a Gemm after pooling
        # reproduces its own few samples exactly).
        fitted = self.sensitivity_samples
        batches, served = [], 0
        for x in recon.batches(model, data, 2 * fitted):
            batches.append((served, x))
            served += len(x)
        inputs = [x for first, x in batches if first >= fitted] or [x for _, x in batches]
        in_sample = not any(first >= fitted for first, _ in batches)
        # Decoded once: every trial refits on the same samples (reading images was a fifth of
        # the trials' time on EfficientNet-Lite0).
        fit_data = ArrayDataset(np.concatenate([x for first, x in batches if first < fitted]), name=data.name)
        measured = sum(len(x) for x in inputs)
        reference = self._outputs(model, inputs)
        errors: dict[ChannelGroup, dict[int, float]] = {}
        for g in candidates:
            errors[g] = {}
            for n in budget.ladder(g.channels, self.keep, self._round):
                index = np.sort(np.argsort(-scores[g], kind="stable")[:n])
                trial = self._pruned_copy(model, g.index, index, moments, fit_data,
                                          compensate=compensate, reconstruct=reconstruct)
                errors[g][n] = self._relative_error(self._outputs(trial, inputs), reference)
        counts = budget.allocate(errors, macs, target)
        self.details["sensitivity"] = {
            "samples_fitted": min(fitted, served), "samples_measured": measured,
            "in_sample": in_sample, "seconds": round(time.perf_counter() - start, 1),
            "macs_budget": int(target), "macs_planned": int(macs(counts)),
            "groups": [{"layers": [n.name for n in g.sources], "channels": g.channels,
                        "kept": counts.get(g, g.channels),
                        "error": {str(n): round(e, 6) for n, e in errors[g].items()}} for g in candidates]}
        self.note(f"sensitivity: {sum(len(e) for e in errors.values())} trial(s) of {len(candidates)} "
                  f"group(s), fitted on {min(fitted, served)} and measured on {measured} "
                  f"{'(the same: no more data) ' if in_sample else 'other '}calibration samples in "
                  f"{self.details['sensitivity']['seconds']} s; MACs {macs(counts) / 1e6:.1f} M planned "
                  f"for a budget of {target / 1e6:.1f} M (scope layer at keep={self.keep}); "
                  f"{sum(1 for g in candidates if counts.get(g, g.channels) < g.channels)} group(s) pruned")
        return counts

    def _pruned_copy(self, model: ir.Model, group_index: int, index: np.ndarray, moments: dict, data, *,
                     compensate: bool, reconstruct: bool) -> ir.Model:
        """A copy of ``model`` with one group pruned to ``index``, compensated and reconstructed
        as the real pruning would be."""
        trial = model.clone()
        groups = find_channel_groups(trial.graph)
        g = next(g for g in groups if g.index == group_index)
        kept = self._with_concats(groups, {g: index})
        shifts = self._mean_shifts(kept, moments) if compensate else {}
        self._slice(trial, kept)
        if compensate:
            self._apply_shifts(trial, kept, shifts)
        if reconstruct:
            layers, _ = self._refit_layers(kept)
            recon.reconstruct(model, trial, layers, data, samples=self.sensitivity_samples,
                              ridge=self.ridge, seed=self.context.seed, threads=self.context.threads)
        return trial

    def _outputs(self, model: ir.Model, inputs: list[np.ndarray]) -> list[np.ndarray]:
        name = str(model_input(model).name)
        return run_outputs(model, [{name: x} for x in inputs], threads=self.context.threads,
                           what="channel_prune's sensitivity trial")

    @staticmethod
    def _relative_error(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
        """Σ over outputs of E(y − y_ref)² / Var(y_ref): the damage in units of the output's spread."""
        total = 0.0
        for y, r in zip(outputs, reference):
            spread = float(np.var(r)) or 1.0
            total += float(np.mean((y - r) ** 2)) / spread
        return total if np.isfinite(total) else float("inf")

    # -- slicing -----------------------------------------------------------------------------------
    @staticmethod
    def _slice(model: ir.Model, kept: dict[ChannelGroup, np.ndarray]) -> None:
        graph = model.graph
        cuts: dict[tuple[ir.Node, int], list[tuple[int, np.ndarray]]] = collections.defaultdict(list)
        targets: dict[ir.Node, list[tuple[int, int]]] = collections.defaultdict(list)
        for g, index in kept.items():
            for s in g.slices:
                cuts[(s.node, s.input_index)].append((s.axis, _expand(index, s.block)))
            for fix in g.shape_fixes:
                targets[fix.node].append((fix.position, len(index) * fix.block))
            for node in g.depthwise:
                node.attributes["group"] = ir.AttrInt64("group", len(index))
        for (node, i), ops in cuts.items():
            array = const_array(node.inputs[i])
            for axis, index in ops:
                array = np.take(array, index, axis=axis)
            recon.set_input(graph, node, i, np.ascontiguousarray(array))
        for node, fixes in targets.items():
            array = const_array(node.inputs[1]).copy()
            for position, size in fixes:
                array[position] = size
            recon.set_input(graph, node, 1, array)
        # Shapes along the changed channel axes are stale: forget and re-infer them.
        for g in kept:
            for v in g.values + g.reshaped:
                if not (v.is_graph_input() or v.is_graph_output()):
                    v.shape = None
        ir_common.ShapeInferencePass()(model)

    # -- mean compensation ------------------------------------------------------------------------
    @staticmethod
    def _mean_shifts(kept: dict[ChannelGroup, np.ndarray], moments: dict) -> dict[ir.Node, np.ndarray | None]:
        """Per sink, the mean its removed inputs contributed to each (unsliced) output; from the
        weights before slicing."""
        shifts: dict[ir.Node, np.ndarray | None] = {}
        for g, index in kept.items():
            removed = np.setdiff1d(np.arange(g.channels), index)
            for sink in g.sinks:
                means = moments[sink.node.inputs[0].name][0]
                shift = recon.mean_shift(sink.node, _expand(removed, sink.block), means)
                previous = shifts.get(sink.node, 0.0)
                shifts[sink.node] = None if shift is None or previous is None else previous + shift
        return shifts

    @staticmethod
    def _apply_shifts(model: ir.Model, kept: dict[ChannelGroup, np.ndarray], shifts: dict) -> tuple[int, list[str]]:
        """Add each sink's mean shift to its bias; (layers done, names of those without a bias)."""
        out_index = {node: index for g, index in kept.items() for node in g.sources}
        done, skipped = 0, []
        for node, shift in shifts.items():
            if shift is None:
                skipped.append(node.name)
                continue
            recon.add_to_bias(model.graph, node, shift if node not in out_index else shift[out_index[node]])
            done += 1
        return done, skipped

    # -- reconstruction ----------------------------------------------------------------------------
    @staticmethod
    def _refit_layers(kept: dict[ChannelGroup, np.ndarray]) -> tuple[list, list[str]]:
        """The sink layers to re-solve, and a note for each that cannot be."""
        out_index = {node: index for g, index in kept.items() for node in g.sources}
        layers, notes, seen = [], [], set()
        for g in kept:
            for sink in g.sinks:
                node = sink.node
                if node in seen:
                    continue
                seen.add(node)
                reason = recon.unsupported(node)
                if reason:
                    notes.append(f"layer '{node.name}' not reconstructed: {reason}")
                    continue
                layers.append(recon.Layer(node, out_index.get(node)))
        return layers, notes

    def _reconstruct(self, original, model: ir.Model, kept: dict[ChannelGroup, np.ndarray], data) -> None:
        layers, notes = self._refit_layers(kept)
        for note in notes:
            self.note(note)
        records = recon.reconstruct(original, model, layers, data, samples=self.samples,
                                    ridge=self.ridge, seed=self.context.seed,
                                    threads=self.context.threads)
        self.details["reconstruction"] = records
        for r in records:
            if r.get("kept_sliced"):
                self.note(f"layer '{r['layer']}' kept its sliced weights: {r['kept_sliced']}")
        if records:
            before = np.mean([r["rel_error_sliced"] for r in records])
            after = np.mean([min(r["rel_error_sliced"], r["rel_error_reconstructed"]) for r in records])
            self.note(f"reconstructed {len(records)} layer(s) on {min(self.samples, len(data))} "
                      f"calibration samples: mean relative output error {before:.3g} -> {after:.3g}")

    @staticmethod
    def _group_record(g: ChannelGroup, index: np.ndarray | None, excluded: dict) -> dict:
        record = {"layers": [n.name for n in g.sources], "kind": g.kinds, "channels": g.channels,
                  "kept": g.channels if index is None else int(len(index))}
        if g.whole:
            record.update(status="whole", reason=g.reasons[0])
        elif g in excluded:
            record.update(status="excluded", reason=f"pattern '{excluded[g]}'")
        elif g.derived:
            record.update(status="concat", parts=[p.group.label if p.group else "constant" for p in g.parts])
        else:
            record["status"] = "pruned" if index is not None else "kept"
        return record
