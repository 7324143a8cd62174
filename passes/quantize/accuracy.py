"""How a quantized candidate is judged against the float model.

With ``max_accuracy_drop`` (``Scorer``): top-1 accuracy on data.evaluation when it has labels,
else top-1 agreement with the float model (whose score is then 1); the drop is
``float score - candidate score``, divided by the float score when ``relative``; a candidate
meets the rule when ``drop <= max_accuracy_drop``. The fallback and the latency trials use it.

Without it (``AgreementCheck``, latency trials only): top-1 agreement with the float model on up
to ``AGREEMENT_SAMPLES`` samples may fall at most ``AGREEMENT_SLACK`` below the first
quantization's, so that trading accuracy for speed is never silent.

A model with several outputs is not a classifier: there the score is the fidelity of all its
outputs to the float model's (``output_cosine``: the mean per-sample cosine of the concatenated
outputs, 1 for the float model itself), and both rules read it in place of top-1.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from deployopt.core.data import Dataset
from deployopt.core.session import open_session
from deployopt.measure.metrics import class_agreement, predicted_class, row_cosine
from deployopt.passes.quantize.data import Feed, InputSpec, feeds

#: Without max_accuracy_drop, a trial's top-1 agreement with the float model may fall at most
#: this much below the first quantization's.
AGREEMENT_SLACK = 0.01
#: Samples the agreement check runs (evaluation data, else calibration data).
AGREEMENT_SAMPLES = 256


def _session(path: pathlib.Path, threads: int) -> ort.InferenceSession:
    return open_session(path, threads=threads, what=f"model {pathlib.Path(path).name}")


def predict(sess: ort.InferenceSession, stream: Iterator[tuple[Feed, np.ndarray | None]],
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """Top-1 class of the first output over the stream (the output flattened per sample, so
    ``[N, classes, 1, 1]`` reads as ``[N, classes]``), and the labels when the data has them."""
    preds, labels = [], []
    output = sess.get_outputs()[0].name
    for feed, y in stream:
        logits = np.asarray(sess.run([output], feed)[0])
        preds.append(predicted_class(logits.reshape(len(logits), -1)))
        if y is not None:
            labels.append(y)
    return np.concatenate(preds), (np.concatenate(labels) if labels else None)


def predicted_classes(sess: ort.InferenceSession, stream: Iterable[Feed]) -> np.ndarray:
    """Arg-max over the last axis of the first output, per sample and position: ``[N]`` for
    ``[N, classes]`` logits, ``[N, T]`` for a sequence model's ``[N, T, classes]``."""
    output = sess.get_outputs()[0].name
    parts = [predicted_class(sess.run([output], feed)[0]) for feed in stream]
    return np.concatenate(parts) if parts else np.empty(0)


def is_classifier(sess: ort.InferenceSession) -> bool:
    """One output: read as class scores (top-1); several outputs: compared by ``output_cosine``."""
    return len(sess.get_outputs()) == 1


def output_cosine(sess: ort.InferenceSession, float_sess: ort.InferenceSession, stream: Iterable[Feed]) -> float:
    """Mean per-sample cosine of all of ``sess``'s outputs to ``float_sess``'s, each sample's
    outputs flattened and concatenated, over the stream (both models run batch by batch, so
    nothing of the dataset is held)."""
    total, count = 0.0, 0
    for feed in stream:
        rows = [np.concatenate([np.asarray(o, np.float64).reshape(len(o), -1) for o in s.run(None, feed)], axis=1)
                for s in (sess, float_sess)]
        total += float(row_cosine(*rows).sum())
        count += len(rows[0])
    return total / count if count else float("nan")


class Scorer:
    """``max_accuracy_drop`` on data.evaluation (module doc); the float model runs once, here."""

    def __init__(self, float_path: pathlib.Path, dataset: Dataset, inputs: Sequence[InputSpec], *,
                 tolerance: float, relative: bool, batch_size: int, threads: int):
        self.dataset, self.inputs, self.batch_size, self.threads = dataset, inputs, batch_size, threads
        self.tolerance, self.relative = float(tolerance), relative
        self.float_session = _session(float_path, threads)
        if not is_classifier(self.float_session):
            self.metric, self.target, self.base = "cosine", None, 1.0
            return
        reference, labels = predict(self.float_session, self._stream())
        self.metric = "top1" if labels is not None else "agreement"
        self.target = labels if labels is not None else reference
        self.base = class_agreement(labels, reference) if labels is not None else 1.0

    def _stream(self) -> Iterator[tuple[Feed, np.ndarray | None]]:
        return feeds(self.dataset, self.inputs, None, self.batch_size)

    def score(self, path: pathlib.Path) -> tuple[float, float]:
        """(score, drop) of the model at ``path``."""
        if self.metric == "cosine":
            value = output_cosine(_session(path, self.threads), self.float_session,
                                  (feed for feed, _ in self._stream()))
        else:
            preds, _ = predict(_session(path, self.threads), self._stream())
            value = class_agreement(self.target, preds)
        drop = self.base - value
        return value, (drop / self.base if self.relative and self.base > 0 else drop)

    def met(self, drop: float) -> bool:
        return drop <= self.tolerance + 1e-12

    def __call__(self, path: pathlib.Path) -> dict:
        """The accuracy record of a latency trial."""
        value, drop = self.score(path)
        return {self.metric: round(value, 5), "drop": round(drop, 5), "met": self.met(drop)}


class AgreementCheck:
    """The accuracy rule of a latency trial without ``max_accuracy_drop`` (module doc). The floor
    is set by the first call on ``first`` (the first quantization, scored before any other)."""

    def __init__(self, float_path: pathlib.Path, dataset: Dataset, inputs: Sequence[InputSpec], *,
                 first: pathlib.Path, batch_size: int, threads: int):
        self.dataset, self.inputs, self.batch_size, self.threads = dataset, inputs, batch_size, threads
        self.first = first
        self.floor: float | None = None
        self.float_session = _session(float_path, threads)
        self.metric = "agreement" if is_classifier(self.float_session) else "cosine"
        self.reference = self._classes(self.float_session) if self.metric == "agreement" else None

    def _stream(self) -> Iterator[Feed]:
        return (feed for feed, _ in feeds(self.dataset, self.inputs, AGREEMENT_SAMPLES, self.batch_size))

    def _classes(self, sess: ort.InferenceSession) -> np.ndarray:
        return predicted_classes(sess, self._stream())

    def __call__(self, path: pathlib.Path) -> dict:
        sess = _session(path, self.threads)
        if self.metric == "cosine":
            value = output_cosine(sess, self.float_session, self._stream())
        else:
            value = class_agreement(self.reference, self._classes(sess))
        if path == self.first and self.floor is None:
            self.floor = value - AGREEMENT_SLACK
        return {self.metric: round(value, 5), "data": self.dataset.name,
                "met": bool(value >= self.floor - 1e-12)}
