"""One rule for every accuracy decision: a model judged against a reference model by task metrics.

Gates, the per-step accuracy of the report, quantize's ``max_accuracy_drop`` fallback and
latency-aware acceptance, and distillation's swap all ask the same question, "how much worse is
this model than the reference?", and answer it here, on top of ``deployopt.measure.accuracy``
(the task metrics themselves live in ``deployopt.measure.tasks``; nothing is measured twice).

For each metric i (the specs given, else ``tasks.default_specs`` of the reference's outputs:
classification for logits, the fidelity metric for anything else):

    base_i  = the reference's own score against labels, when metric i reads labels (class labels
              of a labelled dataset for top-1 classification and custom metrics, the dataset's label
              file for detection / segmentation / sequence); else 1.0 (a model agrees with itself)
    score_i = the model's score (against the labels when read, else agreement with the reference)
    drop_i  = base_i - score_i                  (/ base_i when ``relative`` and base_i > 0)

The verdict's ``drop`` is max_i drop_i and names that metric (the first one on ties). A single
logits classifier therefore keeps its classic numbers: top-1 drop on labelled data, 1 - top-1
agreement on unlabelled data.

The noise floor of a metric that compares with the reference is ``1 - score`` of the reference
against itself when its inputs move by one grey level (``deployopt.measure.accuracy``): a drop
tolerance below it asks a quantized model to be more faithful than the reference is to itself.
A missed tolerance says so.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from deployopt.core.data import Dataset
from deployopt.core.errors import UserError
from deployopt.measure.accuracy import evaluate
from deployopt.measure.model_io import load_proto, output_specs
from deployopt.measure.tasks import LABEL_KINDS, MetricSpec, build_metric, default_specs, metric_specs


#: Grey levels the noise floor moves the inputs by.
NOISE_LEVELS = 1


def noise_floor_note(floor: dict[str, Any], tolerance: float) -> str:
    """``; the tolerance is below the noise floor: ...`` when ``tolerance`` is below the measured
    floor ``noise_floor()``, else ''."""
    if "skipped" in floor or floor["drop"] <= tolerance:
        return ""
    return (f"; the tolerance is below the noise floor: the reference against itself with its inputs moved by "
            f"{floor['levels']} grey level scores {floor['metric']} {floor['score']:.4f} (drop {floor['drop']:.4f})")


def output_shapes(path) -> dict[str, tuple]:
    """Output name -> declared dims (None where unknown, () when the rank is) of the model at ``path``."""
    return {s.name: tuple(s.dims) if s.dims is not None else () for s in output_specs(load_proto(path))}


def spec_key(spec: MetricSpec, where: str = "metrics") -> str:
    """The recipe key a spec came from: ``metrics.OUTPUT`` (``metrics`` when it names no output)."""
    return f"{where}.{','.join(spec.outputs)}" if spec.outputs else where


def check_metrics(specs: Sequence[MetricSpec], shapes: Mapping[str, Sequence[Any]], *,
                  where: str = "metrics") -> None:
    """Refuse, before any work, a spec naming an output the model lacks or a metric that cannot
    read its output (one line naming ``metrics.<output>``, the output and its shape)."""
    for spec in specs:
        key = spec_key(spec, where)
        unknown = [n for n in spec.outputs if n not in shapes]
        if unknown:
            raise UserError(f"{key}: the model has no output '{unknown[0]}' (outputs: {', '.join(shapes)})")
        try:
            build_metric(spec, shapes, where=key)
        except UserError as e:
            raise UserError(str(e) if str(e).startswith(key) else f"{key}: {e}") from e


@dataclasses.dataclass
class Verdict:
    """How a model compares with the reference (module doc)."""

    score: float | None  # the named metric's score
    drop: float | None  # max over the metrics of base - score (relative when asked)
    metric: str  # score_name of the metric with that drop
    per_metric: list[dict[str, Any]]  # {outputs, kind, metric, base, score, drop} per metric
    result: dict[str, Any]  # evaluate's result for the model (every metric's numbers)

    @property
    def base(self) -> float | None:
        """The reference's value of the named metric."""
        return next((m["base"] for m in self.per_metric if m["metric"] == self.metric), None)

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "score": self.score, "drop": self.drop, "metrics": self.per_metric}


class _View(Dataset):
    """The first ``limit`` samples of a dataset, without its labels (agreement with the reference only)."""

    def __init__(self, dataset: Dataset, limit: int | None):
        self._data, self._limit = dataset, limit
        self.name, self.labeled = dataset.name, False
        self.sample_shape, self.sample_shapes = dataset.sample_shape, dataset.sample_shapes
        self.preprocess = getattr(dataset, "preprocess", None)  # the noise floor's grey level

    def __len__(self) -> int:
        n = len(self._data)
        return n if self._limit is None else min(n, self._limit)

    def batches(self, batch_size: int = 32) -> Iterator[tuple[Any, np.ndarray | None]]:
        left = len(self)
        for x, _ in self._data.batches(batch_size):
            if left <= 0:
                return
            size = len(next(iter(x.values())) if isinstance(x, dict) else x)
            if size > left:
                x = {k: v[:left] for k, v in x.items()} if isinstance(x, dict) else x[:left]
                size = left
            left -= size
            yield x, None


def _top1(spec: MetricSpec) -> bool:
    """Whether ``spec`` is a classification metric scored by top-1 (``score: kl`` reads no labels)."""
    return spec.kind == "classification" and spec.options.get("score", "top1") == "top1"


class Judge:
    """Scores models against ``reference_path`` on ``dataset`` by the rule of the module doc.

    ``metrics``: metric specs (anything ``tasks.metric_specs`` reads), None for the defaults;
    ``labels``: the task label file (default: the dataset's ``label_file``); ``use_labels=False``
    judges agreement with the reference only (labels ignored, every base 1.0); ``limit``: at most
    that many samples (only with ``use_labels=False``: label files cover the whole dataset). The
    reference's own scores are measured once, on first use.
    """

    def __init__(self, reference_path, dataset: Dataset, *, metrics: Any = None, labels=None, threads: int = 1,
                 batch_size: int = 32, relative: bool = False, limit: int | None = None, use_labels: bool = True):
        if limit is not None and use_labels:
            raise ValueError("Judge: limit needs use_labels=False (label files cover the whole dataset)")
        self.reference_path = pathlib.Path(reference_path)
        self.dataset = dataset if use_labels and limit is None else _View(dataset, limit)
        self.threads, self.batch_size, self.relative = threads, batch_size, relative
        self.shapes = output_shapes(reference_path)
        self.specs = metric_specs(metrics) or default_specs(self.shapes)
        label_file = labels if labels is not None else getattr(dataset, "label_file", None)
        self.labels = label_file if use_labels and any(s.kind in LABEL_KINDS for s in self.specs) else None
        self._reference: dict[str, Any] | None = None
        self._noise_floor: dict[str, Any] | None = None

    @property
    def reads(self) -> list[bool]:
        """Per metric, whether it scores against labels: classification and custom metrics on a
        labelled dataset, the first detection/segmentation/sequence metric when there is a label
        file (the one ``evaluate`` gives it to)."""
        file_spec = next((s for s in self.specs if s.kind in LABEL_KINDS), None) if self.labels else None
        return [s is file_spec if s.kind in LABEL_KINDS
                else bool(self.dataset.labeled) and (_top1(s) or s.custom) for s in self.specs]

    def _evaluate(self, path, reference_path=None, progress: bool = False) -> dict[str, Any]:
        return evaluate(path, self.dataset, reference_path=reference_path, batch_size=self.batch_size,
                        threads=self.threads, progress=progress, metrics=self.specs, labels=self.labels)

    def reference_result(self, *, progress: bool = False) -> dict[str, Any]:
        """evaluate's result for the reference alone (measured once)."""
        if self._reference is None:
            self._reference = self._evaluate(self.reference_path, progress=progress)
        return self._reference

    def noise_floor(self) -> dict[str, Any]:
        """The worst noise floor over the metrics that compare with the reference (module doc):
        {levels, metric, score, drop}, or {levels, skipped: reason} (also when every metric reads
        labels: their drop under noise is not a floor). Measured once, on first use."""
        if self._noise_floor is None:
            reads = self.reads
            if all(reads):
                floor = {"levels": NOISE_LEVELS, "skipped": "every metric scores against labels"}
            else:
                floor = evaluate(self.reference_path, self.dataset, batch_size=self.batch_size, threads=self.threads,
                                 progress=False, metrics=self.specs, noise_floor=NOISE_LEVELS)["noise_floor"]
            if "skipped" not in floor:
                scored = [(1.0 - r["score"], r.get("score_name")) for r, read in zip(floor["metrics"], reads)
                          if not read and r.get("score") is not None]
                if scored:
                    drop, metric = max(scored, key=lambda d: d[0])
                    floor = {"levels": NOISE_LEVELS, "metric": metric, "score": 1.0 - drop, "drop": drop}
                else:
                    floor = {"levels": NOISE_LEVELS, "skipped": "no metric gave a score"}
            self._noise_floor = floor
        return self._noise_floor

    def bases(self) -> list[float]:
        """Per metric, the reference's own score against labels when it reads labels, else 1.0."""
        reads = self.reads
        if not any(reads):
            return [1.0] * len(self.specs)
        scores = [r.get("score") for r in self.reference_result()["metrics"]]
        return [float(v) if read and v is not None else 1.0 for read, v in zip(reads, scores)]

    def score(self, path, *, progress: bool = False, with_reference: bool = False) -> Verdict:
        """The verdict on the model at ``path``. The reference runs beside it when some metric
        compares with it, or always with ``with_reference`` (for agreement figures in a report).
        The model runs first, so that data that does not fit it is refused naming it."""
        compare = with_reference or not all(self.reads)
        result = self._evaluate(path, self.reference_path if compare else None, progress)
        bases = self.bases()
        per_metric = []
        for base, res in zip(bases, result["metrics"]):
            value = res.get("score")
            drop = None if value is None else base - value
            if drop is not None and self.relative and base > 0:
                drop /= base
            per_metric.append({"outputs": res["outputs"], "kind": res["kind"], "metric": res.get("score_name"),
                               "base": base, "score": value, "drop": drop})
        worst = max((m for m in per_metric if m["drop"] is not None), key=lambda m: m["drop"], default=None)
        if worst is None:
            first = per_metric[0]
            return Verdict(None, None, first["metric"], per_metric, result)
        return Verdict(worst["score"], worst["drop"], worst["metric"], per_metric, result)
