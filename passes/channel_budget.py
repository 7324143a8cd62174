"""Per-group channel counts under a compute budget, from measured sensitivity.

``channel_prune``'s ``scope: sensitivity`` keeps the compute of ``scope: layer`` (every group keeps
``keep`` of its channels) but spends it where the model needs it. On MobileNetV2 with its ImageNet
weights, pruning half of one group's channels (with reconstruction) moves the output anywhere from
KL 0.03 (an expansion layer inside a block) to KL 4.9 (the residual stream of a stage, read by
every block after it): uniform keeps spend most of the damage on a few groups.

The maths:

- **Compute.** A layer's MACs scale with the fraction of its output channels kept (its producing
  group) times the fraction of its input channels kept (the group it reads); a depthwise
  convolution's with its one group's fraction. A Concat output's fraction is its parts' kept
  channels over their total. So for counts ``n``, ``MACs(n) = Σ_layers MACs_l · f_out(l)·f_in(l)``,
  exact for the pruned graph (``ChannelMacs``).
- **Damage.** ``e_g(n)``: the output error when group ``g`` alone keeps ``n`` channels (measured by
  the caller on calibration data, with the same ranking, mean compensation and reconstruction
  as the real pruning), relative to the dense model's output variance. Errors of separately
  pruned groups are treated as additive, the usual first-order assumption (independent noise).
- **Allocation** (``allocate``): minimise ``Σ_g e_g(n_g)`` subject to ``MACs(n) ≤ budget``, with
  each ``n_g`` from a small ladder of counts. Greedy on the price of compute: from the dense
  model, repeatedly take the step ``n_g → n'`` (any lower rung) with the least added error per
  MAC saved, ``(e_g(n') − e_g(n_g)) / (MACs(n) − MACs(n with n_g = n'))``, until the budget holds;
  when one step alone reaches the budget with less added error than the cheapest-price step,
  take it instead (the last step need not overshoot). Then give back: while some group can move
  up a rung (or to whole) within the budget, the move that removes the most error is made.

Written by hand: the pruning libraries that allocate per layer (Torch-Pruning's global ranking,
NNCF's filter pruning) work on torch modules, not on an ONNX graph's channel groups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from deployopt.passes.channel_groups import ChannelGroup

#: Fractions of a group's channels tried when measuring its sensitivity (with ``keep`` itself).
LEVELS = (0.25, 0.5, 0.75)


class ChannelMacs:
    """The MACs of the model for any per-group channel counts (module docstring, Compute)."""

    def __init__(self, groups: Sequence[ChannelGroup], layer_macs: Mapping[str, int]):
        self.groups = list(groups)
        out_of: dict[str, ChannelGroup] = {}
        in_of: dict[str, ChannelGroup] = {}
        depthwise_of: dict[str, ChannelGroup] = {}
        for g in self.groups:
            for node in g.sources:
                out_of[node.name] = g
            for sink in g.sinks:
                in_of[sink.node.name] = g
            for node in g.depthwise:
                depthwise_of[node.name] = g
        #: (MACs, output group, input group) per layer; a depthwise layer has its group as output.
        self.layers = []
        for name, macs in layer_macs.items():
            if name in depthwise_of:
                self.layers.append((macs, depthwise_of[name], None))
            else:
                self.layers.append((macs, out_of.get(name), in_of.get(name)))

    def _fraction(self, g: ChannelGroup | None, counts: Mapping[ChannelGroup, int]) -> float:
        if g is None or not g.channels:
            return 1.0
        if g.derived:
            kept = sum(counts.get(p.group, p.channels) if p.group is not None else p.channels
                       for p in g.parts)
            return kept / g.channels
        return counts.get(g, g.channels) / g.channels

    def __call__(self, counts: Mapping[ChannelGroup, int]) -> float:
        return sum(macs * self._fraction(out, counts) * self._fraction(inp, counts)
                   for macs, out, inp in self.layers)


def ladder(channels: int, keep: float, round_count: Callable[[float, int], int]) -> list[int]:
    """The counts tried for a group of ``channels``: ``LEVELS`` and ``keep``, rounded, below whole."""
    counts = {round_count(f * channels, channels) for f in (*LEVELS, keep)}
    return sorted(n for n in counts if n < channels)


def allocate(errors: Mapping[ChannelGroup, Mapping[int, float]], macs: ChannelMacs,
             budget: float) -> dict[ChannelGroup, int]:
    """Counts per group (module docstring, Allocation); a group missing from the result stays
    whole. ``errors[g][n]`` is group ``g``'s error at ``n`` channels (whole: no error)."""
    counts: dict[ChannelGroup, int] = {}

    def error(g: ChannelGroup, n: int) -> float:
        return 0.0 if n >= g.channels else errors[g][n]

    current = macs(counts)
    while current > budget:
        best = finish = None  # (price or added error, group, count, macs after)
        for g, by_count in errors.items():
            now = counts.get(g, g.channels)
            for n in by_count:
                if n >= now:
                    continue
                after = macs({**counts, g: n})
                saved = current - after
                if saved <= 0:
                    continue
                added = error(g, n) - error(g, now)
                if best is None or added / saved < best[0]:
                    best = (added / saved, g, n, after)
                if after <= budget and (finish is None or added < finish[0]):
                    finish = (added, g, n, after)
        if best is None:
            break  # no rung saves anything more: the budget cannot be met
        g, n = best[1], best[2]
        if finish is not None and finish[0] <= error(g, n) - error(g, counts.get(g, g.channels)):
            g, n = finish[1], finish[2]
        counts[g] = n
        current = macs(counts)
    # Give back: a jump to a low rung can overshoot the budget; raise counts again, the largest
    # error reduction first, while the budget still holds.
    while True:
        best = None  # (error removed, group, count)
        for g, by_count in errors.items():
            now = counts.get(g, g.channels)
            for n in [*by_count, g.channels]:
                if n > now and macs({**counts, g: n}) <= budget:
                    removed = error(g, now) - error(g, n)
                    if removed > 0 and (best is None or removed > best[0]):
                        best = (removed, g, n)
        if best is None:
            return counts
        _, g, n = best
        if n >= g.channels:
            del counts[g]
        else:
            counts[g] = n
