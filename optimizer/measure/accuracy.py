"""Accuracy of a model on a dataset, judged by its task metrics, on a CPU runtime
(onnxruntime by default, or any target of ``deployopt.measure.runtime``).

The model (and an optional reference model) runs over the dataset in batches; every batch's
outputs go to the task metrics of ``deployopt.measure.tasks`` (classification, detection,
segmentation, sequence, regression, user code), each reading its outputs, the reference's
outputs and the batch's labels, accumulating batch by batch so memory stays flat. Without a
metric spec, 2-D logits are judged by classification (top-1/top-5 against the dataset's labels,
agreement/cosine/max |diff|/KL against the reference; formulas in ``deployopt.measure.metrics``)
and any other output by the generic fidelity metric. Rates carry Wilson 95% intervals.

Noise floor (``noise_floor=L``): the same metrics for the reference (the model itself without
one) on its own inputs moved by uniform integer noise in [-L, L] source units per pixel, one grey
level of an 8-bit image being ``scale / std`` after preprocessing, against its outputs on the clean
inputs. Top-1 decisions with a near-tie margin flip under a change smaller than a JPEG re-encode,
so this is the agreement no quantized model can be held to: an int8 model at the floor differs
from the reference no more than the reference differs from itself. With a model and a classifier
output, the floor also gives the model's agreement on the samples whose reference top-1 the draw
leaves unchanged: its agreement on decisions that are not near ties. The draws are seeded
(``NOISE_SEED``), so a run is reproducible. It needs image data with a known preprocessing; on
other data the result says why it was not measured.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from deployopt.core.errors import UserError, WorkFailed, one_line
from deployopt.measure.model_io import (fits_sample, format_shape, input_specs, load_proto,
                                        output_specs)
from deployopt.measure.metrics import wilson_interval
from deployopt.measure.runtime import open_runtime
from deployopt.measure.tasks import (LABEL_KINDS, CocoLabels, MaskLabels, MetricSpec, TextLabels, build_metric,
                                     default_specs, is_logits, metric_specs)

LABEL_READERS = {"detection": CocoLabels, "segmentation": MaskLabels, "sequence": TextLabels}
#: Seed of the noise-floor draws (module doc): the same inputs move the same way on every run.
NOISE_SEED = 0
# The keys ``eval`` has always printed for a classifier; None when no classification metric ran.
CLASSIFICATION_KEYS = ("classes", "top1", "top1_ci", "top5", "top5_ci", "agreement", "agreement_ci", "cosine",
                       "max_abs_diff", "kl")


#: Input bytes fed in one run of a dynamic-batch model. Activations grow with the batch: 32
#: samples of a 640x640 detector in one run hold gigabytes, so large inputs go a few at a time
#: (16 MB: 26 samples at 3x224x224, 3 at 3x640x640), small ones a whole batch at once.
MAX_CHUNK_INPUT_BYTES = 16 * 2**20


def chunk_size(x) -> int:
    """Samples of batch ``x`` (an array or {input: array}) fed in one run: MAX_CHUNK_INPUT_BYTES of input."""
    arrays = list(x.values()) if isinstance(x, dict) else [np.asarray(x)]
    sample_bytes = sum(a[:1].nbytes for a in arrays)
    return max(1, min(len(arrays[0]), MAX_CHUNK_INPUT_BYTES // max(1, sample_bytes)))


# -- running a model over a dataset -------------------------------------------------------------

class _Runner:
    """The model compiled on its target runtime (``deployopt.measure.runtime``), checked against
    the dataset; all outputs by name."""

    def __init__(self, path, dataset, threads: int, role: str, runtime: str = "onnxruntime",
                 ep: str | None = None):
        self.path, self.runtime = str(path), runtime
        proto = load_proto(path)
        specs, self.output_specs = input_specs(proto), output_specs(proto)
        del proto
        self.multi = getattr(dataset, "sample_shapes", None) is not None and len(specs) > 1
        if len(specs) != 1 and not self.multi:
            raise UserError(f"{path}: {role} needs a single-input model, it has {len(specs)} "
                            f"inputs ({', '.join(s.name for s in specs)})")
        self.specs = specs
        self.spec = spec = specs[0]
        if not self.multi:
            sample = tuple(dataset.sample_shape)
            if not fits_sample(spec, sample):
                raise UserError(f"{path}: input '{spec.name}' has shape {spec.shape_text()} but "
                                f"dataset {dataset.name} gives samples of shape "
                                f"{format_shape(sample)}")
            if spec.dtype is None or spec.dtype.kind != "f":
                raise UserError(f"{path}: input '{spec.name}' is {spec.dtype}; datasets give float "
                                f"samples")
        self.fixed_batch = spec.dims[0] if spec.dims and isinstance(spec.dims[0], int) else None
        try:
            self.session = open_runtime(self.path, runtime, ep, threads=threads, what=self.path)
        except WorkFailed as e:  # a model the runtime refuses is bad input here
            raise UserError(str(e)) from e.__cause__
        self.outputs = list(self.session.outputs)

    @property
    def output_dims(self) -> dict[str, tuple]:
        """Output name -> declared dims (symbolic or None where unknown; () when the rank is)."""
        return {s.name: tuple(s.dims) if s.dims is not None else () for s in self.output_specs}

    def run(self, x, step: int | None = None) -> list[tuple[int, int, dict[str, np.ndarray]]]:
        """The outputs of one batch, as (start, stop, {name: array}) per chunk of samples
        start..stop-1 fed at once (``step`` samples, default the model's fixed batch, else as many
        as ``MAX_CHUNK_INPUT_BYTES`` of input allows). A chunk smaller than a fixed-batch model's
        batch is padded by repeating its last sample; padded rows are dropped from every output
        whose first axis is the batch."""
        feeds = x if isinstance(x, dict) else {self.spec.name: np.asarray(x).astype(self.spec.dtype, copy=False)}
        total = len(next(iter(feeds.values())))
        step = step or self.fixed_batch or chunk_size(feeds)
        width = self.fixed_batch or step
        chunks = []
        for start in range(0, total, step):
            chunk = {n: a[start:start + step] for n, a in feeds.items()}
            real = len(next(iter(chunk.values())))
            if real < width:
                chunk = {n: np.concatenate([a, np.repeat(a[-1:], width - real, axis=0)]) for n, a in chunk.items()}
            try:
                out = self.session.run(self.outputs, chunk)
            except Exception as e:
                shape = format_shape(next(iter(chunk.values())).shape)
                raise WorkFailed(f"{self.path}: {self.runtime} failed on a batch of shape {shape} "
                                 f"({one_line(e)})") from e
            chunks.append((start, start + real,
                           {n: (a[:real] if a.ndim and a.shape[0] == width else a) for n, a in zip(self.outputs, out)}))
        return chunks

    def input_hw(self, dataset) -> tuple[int, int] | None:
        """Height and width of the image input, for metrics that work in input pixels."""
        image = next((s for s in self.specs if s.dims is not None and len(s.dims) == 4), self.spec)
        shapes = getattr(dataset, "sample_shapes", None) or {image.name: tuple(dataset.sample_shape)}
        sample = shapes.get(image.name, ())
        return tuple(int(d) for d in sample[-2:]) if len(sample) == 3 else None


def _not_logits(runner: _Runner, name: str, shape) -> UserError:
    return UserError(f"{runner.path}: output '{name}' has shape {format_shape(shape)}; eval needs 2-D logits "
                     f"[batch, classes]")


def _metrics(model: _Runner, dataset, specs: list[MetricSpec], *, reference: bool, labels, charset):
    """[(spec, metric, reads)] with ``reads`` the labels each metric gets: "file", "dataset" or None."""
    dims = model.output_dims
    if not specs:
        first, shape = next(iter(dims.items()))
        if shape and not is_logits(shape) and not reference and dataset.labeled:
            raise _not_logits(model, first, shape)  # class labels to judge, and no classifier output
        specs = default_specs(dims)
        if not reference:
            specs = specs[:1]  # only the classifier can use the dataset's labels
    file_kind = next((s for s in specs if s.kind in LABEL_KINDS), None) if labels is not None else None
    if labels is not None and file_kind is None:
        raise UserError(f"--labels {labels}: no metric reads a labels file; name one with --metric "
                        f"OUTPUT={'|'.join(LABEL_KINDS)}")
    if charset is not None and not any(s.kind == "sequence" for s in specs):
        raise UserError(f"--charset {charset}: only the sequence metric uses a charset; name it with "
                        "--metric OUTPUT=sequence")
    if charset is not None:
        for spec in specs:
            if spec.kind == "sequence":
                spec.options.setdefault("charset", str(charset))
    reader = LABEL_READERS[file_kind.kind](labels, dataset) if file_kind is not None else None
    hw = model.input_hw(dataset)
    built = []
    for spec in specs:
        metric = build_metric(spec, dims, input_hw=hw, labels=reader if spec is file_kind else None)
        reads = "file" if spec is file_kind else ("dataset" if spec.kind == "classification" or spec.custom
                                                  else None)
        built.append((spec, metric, reads))
    return built, reader


def _unit_step(dataset) -> tuple[np.ndarray | None, str | None]:
    """(one source unit in the dataset's sample units, None), or (None, why the noise floor cannot be measured)."""
    preprocess = getattr(dataset, "preprocess", None)
    if getattr(dataset, "sample_shapes", None) is not None:
        return None, f"dataset {dataset.name} feeds several inputs; the noise floor moves one image input"
    if preprocess is None:
        return None, (f"dataset {dataset.name} has no image preprocessing, so one grey level has no size "
                      "in its samples")
    return preprocess.unit_step(), None


class _NoiseFloor:
    """The task metrics of ``runner`` on noisy inputs against its clean outputs (module doc)."""

    def __init__(self, runner: _Runner, dataset, specs: list[MetricSpec], levels: int, charset, of: str):
        self.runner, self.levels, self.of = runner, levels, of
        self.step, self.skipped = _unit_step(dataset)
        if self.step is not None:
            self.built, _ = _metrics(runner, dataset, specs, reference=True, labels=None, charset=charset)
            self.rng = np.random.default_rng(NOISE_SEED)
            self.classifier = next((m for spec, m, _ in self.built if spec.kind == "classification"), None)
            self.stable: list[np.ndarray] = []  # per sample: the draw left the reference's top-1 unchanged
            self.agrees: list[np.ndarray] = []  # per sample: the judged model's top-1 is the reference's

    def add(self, x: np.ndarray, chunk: int, clean: list[dict[str, np.ndarray]],
            judged: list[dict[str, np.ndarray]] | None = None) -> None:
        """One batch: ``clean`` the runner's outputs on ``x`` per chunk, ``judged`` the evaluated
        model's (None when the runner is that model)."""
        if self.step is None:
            return
        noise = self.rng.integers(-self.levels, self.levels + 1, size=np.shape(x)).astype(np.float32)
        noisy = (np.asarray(x, np.float32) + noise * self.step).astype(np.float32)
        for k, ((_, _, outs), clean_outs) in enumerate(zip(self.runner.run(noisy, chunk), clean)):
            for _, metric, _ in self.built:
                metric.accumulate(outs, clean_outs, None)
            if self.classifier is not None and judged is not None:
                reference_top1 = self.classifier.predicted(clean_outs)
                self.stable.append(self.classifier.predicted(outs) == reference_top1)
                self.agrees.append(self.classifier.predicted(judged[k]) == reference_top1)

    def result(self, n: int) -> dict:
        if self.step is None:
            return {"levels": self.levels, "skipped": self.skipped}
        results = [{"outputs": list(m.outputs), "kind": spec.kind, **m.result()} for spec, m, _ in self.built]
        first_class = next((r for r in results if r["kind"] == "classification"), {})
        floor = {"levels": self.levels, "of": self.of, "n": n,
                 **{k: first_class.get(k) for k in ("agreement", "agreement_ci", "kl")},
                 "score": results[0].get("score"), "score_name": results[0].get("score_name"), "metrics": results}
        if self.stable:
            stable, agrees = np.concatenate(self.stable), np.concatenate(self.agrees)
            hits, total = int((agrees & stable).sum()), int(stable.sum())
            floor["stable"] = total
            floor["agreement_on_stable"] = hits / total if total else None
            floor["agreement_on_stable_ci"] = list(wilson_interval(hits, total)) if total else None
        return floor


def noise_floor_text(floor: Mapping[str, Any]) -> str:
    """The noise floor as a line: what the reference scores against itself on inputs moved by L grey levels."""
    head = f"Noise floor (inputs moved by up to {floor['levels']} grey level{'s' if floor['levels'] != 1 else ''})"
    if "skipped" in floor:
        return f"{head}: not measured: {floor['skipped']}"
    if floor.get("agreement") is not None:
        ci = floor["agreement_ci"]
        text = (f"{head}: the {floor['of']} agrees with itself on {floor['agreement']:.2%} [{ci[0]:.2%}, "
                f"{ci[1]:.2%}], KL {floor['kl']:.3g}")
        if floor.get("agreement_on_stable") is not None:
            ci = floor["agreement_on_stable_ci"]
            text += (f"; on the {floor['stable']} samples whose top-1 that noise leaves unchanged the model agrees "
                     f"with it on {floor['agreement_on_stable']:.2%} [{ci[0]:.2%}, {ci[1]:.2%}]")
        return text
    return f"{head}: the {floor['of']} against itself: {floor['score_name']} {floor['score']:.4g}"


def evaluate(model_path, dataset, *, reference_path=None, batch_size: int = 32, threads: int = 1,
             progress: bool = True, metrics: Any = None, labels=None, charset=None,
             runtime: str = "onnxruntime", ep: str | None = None, noise_floor: int = 0) -> dict:
    """The task metrics of ``model_path`` on ``dataset``, against its labels and ``reference_path``.

    ``metrics``: metric specs (``deployopt.measure.tasks.choose``), None for the defaults;
    ``labels``: a label file for the detection/segmentation/sequence metric; ``charset``: the
    sequence metric's charset file; ``runtime``/``ep``: the target both models run on
    (``deployopt.measure.runtime``). Returns {model, dataset, n, classes, top1, top1_ci, top5,
    top5_ci, reference, agreement, agreement_ci, cosine, max_abs_diff, kl, score, score_name,
    metrics, seconds}: the classification keys come from the first classification metric (None
    without one; top1/top5 None on unlabelled data, top5 also with 5 classes or fewer; the
    fidelity keys None without a reference); ``metrics`` lists every metric's result with its
    ``outputs`` and ``kind``; ``score``/``score_name`` are the first metric's. ``noise_floor``: grey
    levels L > 0 add the key ``noise_floor`` (module doc): {levels, of, n, agreement, agreement_ci,
    kl, score, score_name, metrics}, or {levels, skipped: reason}.
    """
    from tqdm import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size: {batch_size!r} is not an integer >= 1")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads: {threads!r} is not an integer >= 1")
    if isinstance(noise_floor, bool) or not isinstance(noise_floor, int) or noise_floor < 0:
        raise UserError(f"noise_floor: {noise_floor!r} is not a whole number of grey levels >= 0")
    n_total = len(dataset)
    if n_total == 0:
        raise UserError(f"dataset {dataset.name}: no samples")
    specs = metric_specs(metrics)
    if labels is None and any(s.kind in LABEL_KINDS for s in specs):  # the data spec's own labels file
        labels = getattr(dataset, "label_file", None)
    model = _Runner(model_path, dataset, threads, "eval", runtime, ep)
    ref = None if reference_path is None else _Runner(reference_path, dataset, threads, "the reference", runtime, ep)
    built, reader = _metrics(model, dataset, specs, reference=ref is not None, labels=labels, charset=charset)
    floor = None if not noise_floor else _NoiseFloor(ref or model, dataset, specs, noise_floor, charset,
                                                      "model" if ref is None else "reference")
    fixed = [r.fixed_batch for r in (model, ref) if r is not None and r.fixed_batch]
    step = math.gcd(*fixed) if fixed else None  # chunks both models take, so their outputs pair up
    t0 = time.perf_counter()
    n = 0
    bar = tqdm(total=n_total, desc="eval", unit="img", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for x, y in dataset.batches(batch_size):
            chunk = step or chunk_size(x)  # the same chunks for both models, so their outputs pair up
            mine = model.run(x, chunk)
            theirs = [None] * len(mine) if ref is None else [outs for _, _, outs in ref.run(x, chunk)]
            for (start, stop, outs), ref_outs in zip(mine, theirs):
                given = {"file": reader.batch(n + start, n + stop) if reader is not None else None,
                         "dataset": None if y is None or not dataset.labeled else np.asarray(y)[start:stop]}
                for _, metric, reads in built:
                    metric.accumulate(outs, ref_outs, given.get(reads))
            if floor is not None:
                mine_outs = [outs for _, _, outs in mine]
                if ref is None:  # the model against itself
                    floor.add(x, chunk, mine_outs)
                else:
                    floor.add(x, chunk, theirs, judged=mine_outs)
            size = len(next(iter(x.values())) if isinstance(x, dict) else x)
            n += size
            bar.update(size)
    finally:
        bar.close()
    result = _result(model_path, dataset, reference_path, n, built, time.perf_counter() - t0)
    if floor is not None:
        result["noise_floor"] = floor.result(n)
    return result


def _result(model_path, dataset, reference_path, n: int, built, seconds: float) -> dict:
    results = []
    for spec, metric, _ in built:
        res = metric.result()
        results.append({"outputs": list(metric.outputs), "kind": spec.kind, **res})
    first_class = next((r for r in results if r["kind"] == "classification"), {})
    result = {"model": str(model_path), "dataset": dataset.name, "n": n,
              **{k: first_class.get(k) for k in CLASSIFICATION_KEYS},
              "reference": None if reference_path is None else str(reference_path),
              "score": results[0].get("score"), "score_name": results[0].get("score_name"),
              "metrics": results, "seconds": seconds}
    return result
