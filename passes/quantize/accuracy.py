"""How a quantized candidate is judged against the float model.

With ``max_accuracy_drop`` (``Scorer``): top-1 accuracy on data.evaluation when it has labels,
else top-1 agreement with the float model (whose score is then 1); the drop is
``float score - candidate score``, divided by the float score when ``relative``; a candidate
meets the rule when ``drop <= max_accuracy_drop``. The fallback and the latency trials use it.

Without it (``AgreementCheck``, latency trials only): top-1 agreement with the float model on up
to ``AGREEMENT_SAMPLES`` samples may fall at most ``AGREEMENT_SLACK`` below the first
quantization's, so that trading accuracy for speed is never silent.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from deployopt.core.data import Dataset
from deployopt.core.session import open_session
from deployopt.measure.metrics import class_agreement, predicted_class
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


class Scorer:
    """``max_accuracy_drop`` on data.evaluation (module doc); the float model runs once, here."""

    def __init__(self, float_path: pathlib.Path, dataset: Dataset, inputs: Sequence[InputSpec], *,
                 tolerance: float, relative: bool, batch_size: int, threads: int):
        self.dataset, self.inputs, self.batch_size, self.threads = dataset, inputs, batch_size, threads
        self.tolerance, self.relative = float(tolerance), relative
        reference, labels = predict(_session(float_path, threads), self._stream())
        self.metric = "top1" if labels is not None else "agreement"
        self.target = labels if labels is not None else reference
        self.base = class_agreement(labels, reference) if labels is not None else 1.0

    def _stream(self) -> Iterator[tuple[Feed, np.ndarray | None]]:
        return feeds(self.dataset, self.inputs, None, self.batch_size)

    def score(self, path: pathlib.Path) -> tuple[float, float]:
        """(score, drop) of the model at ``path``."""
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
        self.reference = self._classes(float_path)

    def _classes(self, path: pathlib.Path) -> np.ndarray:
        stream = feeds(self.dataset, self.inputs, AGREEMENT_SAMPLES, self.batch_size)
        return predicted_classes(_session(path, self.threads), (feed for feed, _ in stream))

    def __call__(self, path: pathlib.Path) -> dict:
        value = class_agreement(self.reference, self._classes(path))
        if path == self.first and self.floor is None:
            self.floor = value - AGREEMENT_SLACK
        return {"agreement": round(value, 5), "data": self.dataset.name,
                "met": bool(value >= self.floor - 1e-12)}
