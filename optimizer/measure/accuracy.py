"""Accuracy against labels and fidelity against a reference model, on onnxruntime CPU.

A classifier runs over a dataset in batches; top-1/top-5 against the labels and the fidelity to a
reference model's logits (agreement, cosine, max |diff|, KL) are accumulated batch by batch with
``deployopt.measure.metrics`` (where the formulas are), so memory does not grow with the number of
samples. Rates carry Wilson 95% intervals.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from deployopt.core.errors import UserError, WorkFailed, one_line
from deployopt.core.session import open_session
from deployopt.measure.metrics import FidelitySums, topk_hits, wilson_interval
from deployopt.measure.model_io import (fits_sample, format_shape, input_specs, load_proto,
                                        output_specs)

# -- running a model over a dataset -------------------------------------------------------------

class _Runner:
    """One onnxruntime session over a single-input classifier, checked against the dataset."""

    def __init__(self, path, dataset, threads: int, role: str):
        self.path = str(path)
        proto = load_proto(path)
        specs, out_spec = input_specs(proto), output_specs(proto)[0]
        del proto
        if len(specs) != 1:
            raise UserError(f"{path}: {role} needs a single-input model, it has {len(specs)} "
                            f"inputs ({', '.join(s.name for s in specs)})")
        self.spec = spec = specs[0]
        sample = tuple(dataset.sample_shape)
        if not fits_sample(spec, sample):
            raise UserError(f"{path}: input '{spec.name}' has shape {spec.shape_text()} but "
                            f"dataset {dataset.name} gives samples of shape "
                            f"{format_shape(sample)}")
        if spec.dtype is None or spec.dtype.kind != "f":
            raise UserError(f"{path}: input '{spec.name}' is {spec.dtype}; datasets give float "
                            f"samples")
        out_dims = out_spec.dims
        # Refuse a non-logits output before loading when its rank is known (run time re-checks).
        if out_dims is not None and (len(out_dims) < 2 or any(
                isinstance(d, int) and d != 1 for d in out_dims[2:])):
            raise UserError(f"{path}: output '{out_spec.name}' has shape {out_spec.shape_text()}; "
                            f"eval needs 2-D logits [batch, classes]")
        self.fixed_batch = spec.dims[0] if spec.dims and isinstance(spec.dims[0], int) else None
        try:
            self.session = open_session(self.path, threads=threads, what=self.path)
        except WorkFailed as e:  # a model onnxruntime refuses is bad input here
            raise UserError(str(e)) from e.__cause__
        self.output = self.session.get_outputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits [len(x), classes]; a fixed-batch model is fed in chunks (last one padded)."""
        x = x.astype(self.spec.dtype, copy=False)
        step = self.fixed_batch or len(x)
        parts = []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            real = len(chunk)
            if real < step:  # pad by repeating the last sample; the padded rows are dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - real, axis=0)])
            try:
                out = self.session.run([self.output], {self.spec.name: chunk})[0]
            except Exception as e:
                raise WorkFailed(f"{self.path}: onnxruntime failed on a batch of shape "
                                 f"{format_shape(chunk.shape)} ({one_line(e)})") from e
            parts.append(self._as_logits(out, len(chunk))[:real])
        return np.concatenate(parts)

    def _as_logits(self, out: np.ndarray, rows: int) -> np.ndarray:
        # [N, C, 1, 1] heads (1x1 conv classifiers) are logits with trailing unit dims.
        if out.ndim > 2 and all(d == 1 for d in out.shape[2:]):
            out = out.reshape(out.shape[:2])
        if out.ndim != 2 or out.shape[0] != rows:
            raise UserError(f"{self.path}: output '{self.output}' has shape "
                            f"{format_shape(out.shape)} for a batch of {rows}; eval needs 2-D "
                            f"logits [batch, classes]")
        return out


def evaluate(model_path, dataset, *, reference_path=None, batch_size: int = 32, threads: int = 1,
             progress: bool = True) -> dict:
    """Top-1/top-5 of ``model_path`` on ``dataset`` (labels), and fidelity vs ``reference_path``.

    Returns {model, dataset, n, classes, top1, top1_ci, top5, top5_ci, reference, agreement,
    agreement_ci, cosine, max_abs_diff, kl, seconds}. top1/top5 are None on an unlabeled dataset;
    top5 is also None with 5 classes or fewer (it would be trivially 1.0). The fidelity keys are
    None without a reference. Intervals are Wilson 95% [low, high].
    """
    from tqdm import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size: {batch_size!r} is not an integer >= 1")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads: {threads!r} is not an integer >= 1")
    n_total = len(dataset)
    if n_total == 0:
        raise UserError(f"dataset {dataset.name}: no samples")
    model = _Runner(model_path, dataset, threads, "eval")
    ref = None if reference_path is None else _Runner(reference_path, dataset, threads,
                                                      "the reference")
    t0 = time.perf_counter()
    n = top1 = top5 = 0
    classes = None
    sums = FidelitySums() if ref is not None else None
    bar = tqdm(total=n_total, desc="eval", unit="img", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for x, y in dataset.batches(batch_size):
            z = model.logits(np.asarray(x))
            if classes is None:
                classes = z.shape[1]
            if dataset.labeled and y is not None:
                y = np.asarray(y, dtype=np.int64)
                if y.min() < 0 or y.max() >= classes:
                    raise UserError(f"dataset {dataset.name}: label {int(y.max())} is outside "
                                    f"the {classes} classes of {model_path}'s output")
                top1 += topk_hits(z, y, 1)
                if classes > 5:
                    top5 += topk_hits(z, y, 5)
            if ref is not None:
                r = ref.logits(np.asarray(x))
                if r.shape != z.shape:
                    raise UserError(f"{reference_path}: output shape {format_shape(r.shape)} "
                                    f"differs from {model_path}'s {format_shape(z.shape)}")
                sums.add(z, r)
            n += len(z)
            bar.update(len(z))
    finally:
        bar.close()
    labeled = dataset.labeled
    result = {
        "model": str(model_path), "dataset": dataset.name, "n": n, "classes": classes,
        "top1": top1 / n if labeled else None,
        "top1_ci": list(wilson_interval(top1, n)) if labeled else None,
        "top5": top5 / n if labeled and classes > 5 else None,
        "top5_ci": list(wilson_interval(top5, n)) if labeled and classes > 5 else None,
        "reference": None if reference_path is None else str(reference_path),
        "agreement": None, "agreement_ci": None, "cosine": None, "max_abs_diff": None,
        "kl": None,
    }
    if sums is not None:
        result.update(sums.result())
    result["seconds"] = time.perf_counter() - t0
    return result
