"""Sequences: CTC greedy decoding, exact match and character error rate.

The output is per-step class scores [N, T, C] (``time_axis`` 1, ``axis`` -1 the classes; an
output [T, N, C] has ``time_axis: 0``). Greedy CTC decoding takes the best class at every step,
merges consecutive repeats and drops the blank class (``blank``, default 0). With a charset file
(one character per line), class i is the i-th entry of the charset with the blank inserted at
index ``blank``, so the charset needs at least C - 1 lines. Over all samples:
    exact match = share of samples whose decoded text equals the truth
    CER         = sum edit_distance(decoded, truth) / sum len(truth)
(Levenshtein distance over characters). The truth is the label text, or the reference's
decoding (as class sequences when there is no charset).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deployopt.core.errors import UserError
from deployopt.core.settings import Settings, setting
from deployopt.measure.tasks.base import Metric, class_axis, does_not_fit

NEEDS = "per-step class scores [N, T, C]"


@dataclasses.dataclass
class SequenceSettings(Settings):
    axis: int = -1  # the class axis
    time_axis: int = setting(1, low=0, high=2)
    blank: int = setting(0, low=0)
    charset: str | None = None  # path of the charset file (``--charset``)


def ctc_greedy(steps: np.ndarray, blank: int = 0) -> list[list[int]]:
    """Greedy CTC decoding of [N, T, C] scores: best class per step, repeats merged, blanks dropped."""
    best = steps.argmax(axis=-1)
    out = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        out.append([int(c) for c in row[keep] if c != blank])
    return out


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one element each)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


class SequenceMetric(Metric):
    kind = "sequence"

    def __init__(self, settings: SequenceSettings, outputs: Sequence[str], *, charset: list[str] | None = None,
                 **_):
        super().__init__(outputs[:1])
        self.settings, self.charset = settings, charset
        self.tokens: list[str] | None = None
        self.n = {"labels": 0, "reference": 0}
        self.exact = {"labels": 0, "reference": 0}
        self.edits = {"labels": 0, "reference": 0}
        self.length = {"labels": 0, "reference": 0}

    def _fit(self, name: str, shape: Sequence[Any]) -> None:
        if len(shape) != 3 or self.settings.time_axis >= 3:
            raise does_not_fit(self.kind, name, shape, NEEDS)
        axis = class_axis(self.settings.axis, 3, self.kind, name, shape)
        if axis == self.settings.time_axis:
            raise does_not_fit(self.kind, name, shape, "a class axis other than the time axis")
        classes = shape[axis]
        if self.charset is not None and isinstance(classes, (int, np.integer)):
            if len(self.charset) + 1 < classes:
                where = f"charset {self.settings.charset}" if self.settings.charset else "charset"
                raise UserError(f"{where}: {len(self.charset)} characters + blank cover {len(self.charset) + 1} "
                                f"classes, but output '{name}' has {classes} classes (axis {self.settings.axis})")
            if self.tokens is None:
                self.tokens = list(self.charset)
                self.tokens.insert(min(self.settings.blank, len(self.tokens)), "")

    def check(self, shapes: Mapping[str, Sequence[Any]]) -> None:
        name = self.outputs[0] if self.outputs else next(iter(shapes))
        self._fit(name, tuple(shapes[name]))

    def decode(self, outputs: Mapping[str, np.ndarray]) -> list:
        """Texts (with a charset) or class sequences of one batch."""
        x = self.selected(outputs)[0]
        name = self.outputs[0] if self.outputs else next(iter(outputs))
        self._fit(name, x.shape)
        axis = self.settings.axis % 3
        batch_axis = ({0, 1, 2} - {axis, self.settings.time_axis}).pop()
        steps = np.transpose(x, (batch_axis, self.settings.time_axis, axis))
        seqs = ctc_greedy(steps, self.settings.blank)
        if self.tokens is None:
            return [tuple(s) for s in seqs]
        return ["".join(self.tokens[c] for c in s) for s in seqs]

    def _add(self, against: str, found: list, truth: list) -> None:
        for f, t in zip(found, truth):
            self.n[against] += 1
            self.exact[against] += f == t
            self.edits[against] += edit_distance(f, t)
            self.length[against] += len(t)

    def accumulate(self, outputs, reference_outputs=None, labels=None) -> None:
        found = self.decode(outputs)
        if reference_outputs is not None:
            self._add("reference", found, self.decode(reference_outputs))
        if labels is not None:
            if self.tokens is None:
                raise UserError("metric sequence: text labels need a charset (--charset FILE, or charset: in the "
                                "metric's settings)")
            if len(labels) != len(found):
                raise UserError(f"metric sequence: {len(labels)} labels for a batch of {len(found)}")
            self._add("labels", found, list(labels))

    def _rates(self, against: str) -> tuple[float, float] | None:
        n = self.n[against]
        if not n:
            return None
        return self.exact[against] / n, self.edits[against] / max(self.length[against], 1)

    def result(self) -> dict[str, Any]:
        res: dict[str, Any] = {}
        ref, lab = self._rates("reference"), self._rates("labels")
        if ref is not None:
            res.update(exact_match_vs_reference=ref[0], cer_vs_reference=ref[1])
        if lab is not None:
            res.update(exact_match=lab[0], cer=lab[1], score=lab[0], score_name="exact_match")
        else:
            res.update(score=None if ref is None else ref[0], score_name="exact_match_vs_reference")
        return res
