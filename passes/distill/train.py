"""Training against a teacher's cached logits: the loss, shift/flip augmentation, the loop.

Shared by the distill pass (a new student) and the recover pass (the pruned model itself,
fine-tuned through ``deployopt.passes.recover.interpreter``).

Loss, for student logits s, teacher logits t, labels y, temperature T and weight alpha::

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)
    KL(p || q) = sum_k p_k (log p_k - log q_k)          (averaged over the batch)

The T^2 factor keeps the soft term's gradient on the scale of the hard one when T changes.
Without labels the loss is the KL term alone.

Teacher logits are computed once per training sample on the un-augmented input (onnxruntime, in
batches) and cached; the student then sees randomly shifted/flipped views of a sample against
the teacher's logits for the original. Small shifts and mirror images keep the class (that is
why flips are opt-in: they change digits), so the cached target stays a good one and the
teacher is never re-run.

Augmentation (NCHW images only): a random crop of size H x W from the image padded by ``p``
pixels on each side, i.e. a shift by (dy, dx) in [-p, p]^2; the padding replicates the edge
pixels (not zeros: inputs are normalized, so 0 is grey, not background). Optional horizontal
flip with probability 1/2. All randomness comes from one seeded ``torch.Generator``, so the
same seed and data give the same batches, views and weights.

Optimizer: AdamW with a one-cycle learning-rate schedule (torch's ``OneCycleLR``), which reaches
a good minimum in the few epochs a deployment pipeline can afford. With a time budget
``max_seconds`` the schedule advances by ``max(steps done / total steps, seconds /
max_seconds)``, so a run cut short by the clock still ends at the low end of the cycle. Early
stopping watches the top-1 agreement ``mean[argmax s == argmax t]`` on a held-out set and
restores the best weights (``keep_initial``: the weights before training compete too, for a
model that starts from trained weights). Equal agreement goes to the lower held-out KL(softmax t
|| softmax s): a small held-out set on which every epoch agrees fully (a quantized model
fine-tuned against its float self) still tells the epochs apart. ``select_by: "kl"`` ranks the
epochs by the held-out KL instead (equal KL: the higher agreement), for a model that imitates
its teacher, where KL is the quantity trained and agreement on a few dozen samples moves in
steps of a few percent. ``extra_loss(idx)`` adds a term to each batch's loss (the recover pass's
feature matching), computed after the student's forward on the batch ``idx``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from deployopt.core.data import Dataset
from deployopt.core.errors import UserError, WorkFailed, one_line
from deployopt.core.session import open_session
from deployopt.measure import metrics


class Diverged(WorkFailed):
    """The training loss became NaN or Inf (the message names the epoch)."""


@contextlib.contextmanager
def torch_state(threads: int) -> Iterator[None]:
    """Deterministic, ``threads``-wide torch for the block; the caller's settings and global RNG
    state are restored afterwards (the pass must not change them for the rest of the process)."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(threads)
            # warn_only: an op without a deterministic kernel warns instead of failing the pass
            # (none of the CPU conv/BN/pool/linear ops the students use lacks one).
            torch.use_deterministic_algorithms(True, warn_only=True)
            yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


# -- data and teacher ----------------------------------------------------------------------------

def load_arrays(dataset: Dataset, field: str, batch_size: int = 256,
                limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole dataset (its first ``limit`` samples) as float32 ``x`` [n, ...] and int64 ``y``
    [n] (None when unlabelled).

    Shuffled mini-batches need random access, and the Dataset contract only streams, so the
    training set is held in memory (bound large sets with the spec's ``limit``).
    """
    xs, ys = [], []
    held = 0
    for x, y in dataset.batches(batch_size):
        if limit is not None and held >= limit:
            break
        keep = len(x) if limit is None else min(len(x), limit - held)
        held += keep
        xs.append(np.asarray(x[:keep], dtype=np.float32))
        if dataset.labeled:
            if y is None:
                raise UserError(f"{field}: dataset {dataset.name!r} is labelled but a batch came without labels")
            ys.append(np.asarray(y[:keep], dtype=np.int64))
    if not xs or sum(len(x) for x in xs) == 0:
        raise UserError(f"{field}: dataset {dataset.name!r} is empty (no samples to train on)")
    x = np.concatenate(xs)
    if not np.isfinite(x).all():
        raise UserError(f"{field}: dataset {dataset.name!r} contains NaN or Inf")
    return x, (np.concatenate(ys) if ys else None)


def session(model_bytes: bytes, threads: int):
    """An onnxruntime session over the serialized teacher (full graph optimizations); a teacher
    onnxruntime cannot load is bad input."""
    try:
        return open_session(model_bytes, threads=threads, what="the teacher")
    except WorkFailed as e:
        raise UserError(f"model: {e}") from e


def teacher_outputs(sess, input_name: str, output_names: list[str], x: np.ndarray,
                    fixed_batch: int | None, batch_size: int = 256) -> list[np.ndarray]:
    """The teacher's ``output_names`` for ``x`` (float32, one array [n, ...] each), one
    onnxruntime run per chunk.

    A model exported with a fixed batch b is fed chunks of b, the last one padded by repeating
    its final sample (the padded rows are dropped).
    """
    step = fixed_batch or batch_size
    parts: list[list[np.ndarray]] = [[] for _ in output_names]
    for start in range(0, len(x), step):
        chunk = x[start:start + step]
        real = len(chunk)
        if real < step and fixed_batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - real, axis=0)])
        try:
            outs = sess.run(list(output_names), {input_name: chunk})
        except Exception as e:
            raise WorkFailed(f"teacher: onnxruntime failed on a batch of shape {list(chunk.shape)} "
                             f"({one_line(e, 240, with_type=True)})") from e
        for kept, out in zip(parts, outs):
            kept.append(np.asarray(out, dtype=np.float32)[:real])
    return [np.concatenate(kept) for kept in parts]


def teacher_logits(sess, input_name: str, output_name: str, x: np.ndarray,
                   fixed_batch: int | None, batch_size: int = 256) -> np.ndarray:
    """Teacher logits [n, classes] for ``x`` (``teacher_outputs`` of the one output), checked."""
    logits = teacher_outputs(sess, input_name, [output_name], x, fixed_batch, batch_size)[0]
    if logits.ndim != 2 or len(logits) != len(x):
        raise UserError(f"model: teacher output '{output_name}' has shape {list(logits.shape)} for "
                        f"{len(x)} samples; distillation needs logits [batch, classes]")
    if not np.isfinite(logits).all():
        raise WorkFailed("teacher: onnxruntime produced NaN or Inf logits on the training data")
    return logits


# -- augmentation and loss -----------------------------------------------------------------------

def augment(x: torch.Tensor, generator: torch.Generator, padding: int, flip: bool) -> torch.Tensor:
    """Random shift by up to ``padding`` pixels (edge-replicated) and optional mirror, per sample."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding), mode="replicate")
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
        # Gather every sample's window at once: rows[i] = dy_i + 0..h-1, cols[i] = dx_i + 0..w-1.
        rows = (offsets[:, 0:1] + torch.arange(h))[:, None, :, None]
        cols = (offsets[:, 1:2] + torch.arange(w))[:, None, None, :]
        batch = torch.arange(n)[:, None, None, None]
        channels = torch.arange(x.shape[1])[None, :, None, None]
        x = padded[batch, channels, rows, cols]
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


def distill_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, temperature: float,
                 alpha: float) -> torch.Tensor:
    """``alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) CE(s, y)``; KL alone without y."""
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                  reduction="batchmean", log_target=True) * temperature ** 2
    if y is None or alpha >= 1.0:
        return kl
    ce = F.cross_entropy(s, y)
    return ce if alpha <= 0.0 else alpha * kl + (1.0 - alpha) * ce


# -- the loop ------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    temperature: float
    alpha: float
    seed: int
    padding: int  # 0: no shifts
    flip: bool
    patience: int | None
    progress: bool = True
    max_seconds: float | None = None  # time budget of the loop (None: epochs alone bound it)
    keep_initial: bool = False  # the untrained weights compete with the epochs' for the best
    # which held-out score picks the best epoch: "agreement" (ties: lower KL) or "kl" (ties: higher
    # agreement). KL is continuous, so a small held-out set ranks epochs by it with less noise
    select_by: str = "agreement"
    label: str = "distill"  # names the run in the progress bar and in errors


@dataclasses.dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int | None  # None without a held-out set
    best_agreement: float | None
    stopped_early: bool
    history: list[dict]  # per epoch: {epoch, loss, holdout_agreement, holdout_kl, holdout_top1}; 0 = untrained
    seconds: float
    out_of_time: bool = False  # max_seconds ended the run


@torch.no_grad()
def holdout_scores(student: nn.Module, x: torch.Tensor, teacher_logits: np.ndarray,
                   labels: np.ndarray | None, batch_size: int = 32) -> tuple[float, float, float | None]:
    """Agreement ``mean[argmax student(x) == argmax teacher(x)]``, mean KL(teacher || student) and
    top-1 vs the labels (None without labels), with the student in eval mode
    (``deployopt.measure.metrics``)."""
    was_training = student.training
    student.eval()
    logits = torch.cat([student(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()
    student.train(was_training)
    fidelity = metrics.fidelity(logits, teacher_logits)
    return (fidelity["agreement"], fidelity["kl"],
            None if labels is None else metrics.topk_accuracy(logits, labels))


def _better(select_by: str, agree: float, kl: float, best_agree: float, best_kl: float) -> bool:
    """Whether an epoch's held-out (agreement, KL) beats the best so far under ``select_by``."""
    if select_by == "kl":
        return kl < best_kl or (kl == best_kl and agree > best_agree)
    return agree > best_agree or (agree == best_agree and kl < best_kl)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Mini-batches per epoch: a last batch of one sample is dropped (see ``batches``)."""
    return math.ceil(n / batch_size) - (1 if n % batch_size == 1 else 0)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) >= 2:  # BatchNorm in training mode cannot normalize a batch of one
            yield idx


def train(student: nn.Module, x: np.ndarray, t: np.ndarray, y: np.ndarray | None,
          holdout: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None, cfg: TrainConfig,
          extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
          redraw: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None) -> TrainResult:
    """Train ``student`` in place on (x, teacher logits t, labels y); returns the history.

    ``holdout``: (x, teacher logits, labels or None) for early stopping on agreement; the weights
    with the best held-out agreement are restored at the end (ties go to the lower held-out KL).
    Held-out top-1 vs the labels is reported alongside when there are labels.
    ``redraw(epoch)``: called before every epoch after the first, returns that epoch's (x, t) in
    place of the previous ones (same number of samples; the recover pass's fresh views). Its time
    counts against ``max_seconds``.
    """
    start = time.perf_counter()
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    yt = None if y is None else torch.from_numpy(y)
    hx = ht = hy = None
    if holdout is not None:
        hx, ht, hy = torch.from_numpy(holdout[0]), holdout[1], holdout[2]
    generator = torch.Generator().manual_seed(cfg.seed)
    steps = steps_per_epoch(len(x), cfg.batch_size)
    if steps < 1:
        raise UserError(f"data.training: {len(x)} training sample(s) cannot fill a batch of 2 "
                        f"(BatchNorm needs at least 2 per batch)")
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps)

    def scores() -> dict:
        agree, kl, top1 = (None, None, None) if hx is None else holdout_scores(student, hx, ht, hy)
        return {"holdout_agreement": agree, "holdout_kl": kl, "holdout_top1": top1}

    history = [{"epoch": 0, "loss": None, **scores()}]
    best_epoch, best_agree, best_state, since_best = None, -1.0, None, 0
    best_kl = math.inf
    if cfg.keep_initial and history[0]["holdout_agreement"] is not None:
        best_epoch, best_agree, best_kl = 0, history[0]["holdout_agreement"], history[0]["holdout_kl"]
        best_state = copy.deepcopy(student.state_dict())
    stopped = out_of_time = False
    total_steps = cfg.epochs * steps
    bar = tqdm(total=total_steps, desc=cfg.label, unit="step", file=sys.stderr,
               disable=not cfg.progress, dynamic_ncols=True, mininterval=1.0)
    student.train()
    steps_run = 0
    try:
        for epoch in range(1, cfg.epochs + 1):
            if redraw is not None and epoch > 1:
                x_next, t_next = redraw(epoch)
                if len(x_next) != len(x) or len(t_next) != len(x):
                    raise ValueError(f"redraw gave {len(x_next)} samples for {len(x)}")  # a caller bug
                xt, tt = torch.from_numpy(x_next), torch.from_numpy(t_next)
            total, count = 0.0, 0
            for idx in batches(len(x), cfg.batch_size, generator):
                xb = xt[idx]
                if cfg.padding or cfg.flip:
                    xb = augment(xb, generator, cfg.padding, cfg.flip)
                loss = distill_loss(student(xb), tt[idx], None if yt is None else yt[idx],
                                    cfg.temperature, cfg.alpha)
                if extra_loss is not None:
                    loss = loss + extra_loss(idx)
                if not torch.isfinite(loss):
                    raise Diverged(f"{cfg.label}: the training loss became {loss.item()} in epoch {epoch}; "
                                     f"lower lr (now {cfg.lr:g})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps_run += 1
                done = steps_run
                if cfg.max_seconds is not None:
                    # The clock may be ahead of the step count: move the schedule to the larger.
                    done = max(done, int((time.perf_counter() - start) / cfg.max_seconds * total_steps))
                total += loss.item() * len(idx)
                count += len(idx)
                bar.update()
                bar.set_postfix_str(f"epoch {epoch}/{cfg.epochs} loss {total / count:.4f}", refresh=False)
                if done >= total_steps:
                    out_of_time = steps_run < total_steps
                    break
                schedule.last_epoch = done - 1
                schedule.step()
            history.append({"epoch": epoch, "loss": total / count, **scores()})
            agree, top1 = history[-1]["holdout_agreement"], history[-1]["holdout_top1"]
            bar.set_postfix_str(f"epoch {epoch}/{cfg.epochs} loss {total / count:.4f}"
                                + ("" if agree is None else f" held-out agreement {agree:.4f}")
                                + ("" if top1 is None else f" top-1 {top1:.4f}"))
            if agree is not None:
                kl = history[-1]["holdout_kl"]
                if _better(cfg.select_by, agree, kl, best_agree, best_kl):
                    since_best = 0
                    best_epoch, best_agree, best_kl = epoch, agree, kl
                    best_state = copy.deepcopy(student.state_dict())
                else:
                    since_best += 1
            if out_of_time:
                break
            if agree is not None and cfg.patience is not None and since_best >= cfg.patience and epoch < cfg.epochs:
                stopped = True
                break
    finally:
        bar.close()
    if best_state is not None:
        student.load_state_dict(best_state)
    student.eval()
    return TrainResult(epochs_run=len(history) - 1, best_epoch=best_epoch,
                       best_agreement=None if best_epoch is None else best_agree,
                       stopped_early=stopped, history=history, seconds=time.perf_counter() - start,
                       out_of_time=out_of_time)


