"""Distilled-student swap: train a smaller model to imitate the current one, swap it in if it holds up.

The current ONNX model is the teacher, run in onnxruntime (no PyTorch source needed). A student
(a ``models/`` name, ``package.module:callable``, or ``{onnx: path}`` for one trained elsewhere)
learns from the teacher's softened outputs and the labels when there are any
(``deployopt.passes.distill.train`` gives the loss and the loop), is exported through
``deployopt.models.export.export_model`` with its torch-vs-onnxruntime parity check, keeping the
teacher's input/output names and dynamic batch, and is scored against the teacher on
``data.evaluation``:

    metric   the task metrics of the recipe (default: top-1 vs the labels when the evaluation
             set is labelled, else agreement mean[argmax student == argmax teacher])
    drop     = metric(teacher) - metric(student)      (/ metric(teacher) with relative: true),
             the teacher's metric being its own score against labels, else 1 (it agrees with
             itself); the largest drop over the metrics (``deployopt.measure.judge``)
    swap     when drop <= max_accuracy_drop

A rejected student is not a failure: the pass returns (a copy of) the teacher and notes
``student rejected: drop X > Y``; later passes work on whichever model won. Either way the step
records both models' MACs, params and latency (deployopt.measure.latency.compare, interleaved, short).

Determinism: the student's init, the held-out split, the batch order and the augmentations all
draw from ``seed`` (torch generators, no global RNG; the caller's torch RNG state is restored),
torch runs with deterministic algorithms and ``context.threads`` intra-op threads, so the same
seed, data and thread count give the same student weights on CPU.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from deployopt.core.errors import UserError, one_line
from deployopt.core.settings import setting
from deployopt.models import EXPORTERS
from deployopt.passes.distill.interface import Interface, check_samples, dims_fit, dims_text, interface
from deployopt.passes.base import DeployFunctionalPass

LATENCY_ROUNDS = 3
LATENCY_WARMUP = 5


# -- the pass ------------------------------------------------------------------------------------

@dataclasses.dataclass
class DistillPass(DeployFunctionalPass):
    """Train ``student`` on the current model's logits; swap it in when within ``max_accuracy_drop``."""

    name: ClassVar[str] = "distill"
    needs_evaluation: ClassVar[bool] = True
    #: Needs ``context.training`` (the recipe's data.training, else data.calibration).
    needs_training: ClassVar[bool] = True

    student: str | dict[str, str] | None = None  # models/ name | package.module:callable | {onnx: path}
    student_kwargs: dict[str, Any] = setting(default_factory=dict)
    temperature: float = setting(4.0, low=0, low_open=True)
    alpha: float = setting(0.9, low=0, high=1)  # weight of the soft (teacher) term; 0 = labels only
    epochs: int = setting(10, low=1)
    # >= 2: BatchNorm cannot normalize a batch of one sample in training mode.
    batch_size: int = setting(64, low=2)
    lr: float = setting(0.01, low=0, high=10, low_open=True)  # peak of the one-cycle schedule (AdamW)
    weight_decay: float = setting(1e-4, low=0)
    seed: int | None = setting(None, low=0)  # None: the recipe's seed
    augment: bool = True  # random shifts by up to crop_padding pixels (NCHW images)
    crop_padding: int = setting(2, low=0)
    flip: bool = False  # horizontal flips: off by default, they change digits and text
    max_accuracy_drop: float = setting(0.01, low=0, high=1)
    relative: bool = False  # max_accuracy_drop relative to the teacher's score
    patience: int | None = setting(3, low=1)  # epochs without better held-out agreement before stopping
    # fraction of the training set held out for agreement / early stopping
    holdout: float = setting(0.1, low=0, high=0.5)
    exporter: str = setting("auto", choices=EXPORTERS)
    export_tolerance: float = setting(1e-4, low=0)  # max |torch - onnxruntime| of the exported student
    latency_runs: int = setting(50, low=0)  # timed runs per round for the teacher/student latency (0: skip)

    # -- settings -----------------------------------------------------------------------------
    def validate(self) -> None:
        """The student spec, and student_kwargs only with a student built here."""
        spec = self.student
        if isinstance(spec, dict):
            if set(spec) != {"onnx"} or not spec["onnx"]:
                raise UserError(f"student: expected a model name, package.module:callable or {{onnx: PATH}}, "
                                f"got {spec!r}")
            if self.student_kwargs:
                raise UserError("student_kwargs: not used with an ONNX student ({onnx: PATH})")
            return
        if not isinstance(spec, str) or not spec:
            raise UserError("student: required (a models/ name, package.module:callable or {onnx: PATH})")
        if ":" in spec:
            module, _, attr = spec.partition(":")
            if not module or not attr:
                raise UserError(f"student: '{spec}' is not package.module:callable")
            return  # imported (user code runs) when the pass runs, not when the recipe is read
        from deployopt import models  # torch: only when a recipe names a distill step

        if spec not in models.REGISTRY:
            raise UserError(f"student: unknown model '{spec}' (valid: {', '.join(models.NAMES)}, "
                            f"or package.module:callable, or {{onnx: PATH}})")

    @property
    def student_label(self) -> str:
        return f"{{onnx: {self.student['onnx']}}}" if isinstance(self.student, dict) else str(self.student)

    # -- the pass -------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from deployopt.passes.distill import train as dt

        start = time.perf_counter()
        ctx = self.context
        seed = ctx.seed if self.seed is None else self.seed
        teacher = interface(model, "model")
        evaluation = ctx.evaluation
        if evaluation is None:
            raise UserError("data.evaluation: the distill pass needs an evaluation dataset to decide the swap")
        if len(evaluation) == 0:
            raise UserError(f"data.evaluation: dataset {evaluation.name!r} is empty")
        check_samples(tuple(evaluation.sample_shape), teacher, "data.evaluation", evaluation.name)
        teacher_bytes = ir.to_proto(model).SerializeToString()
        timings: dict[str, float] = {}

        with self.private_folder() as tmp:
            teacher_path = tmp / "teacher.onnx"
            teacher_path.write_bytes(teacher_bytes)
            if isinstance(self.student, dict):
                student_model = self._onnx_student(teacher)
                student_path = tmp / "student.onnx"
                student_path.write_bytes(ir.to_proto(student_model).SerializeToString())
            else:
                sess = dt.session(teacher_bytes, ctx.threads)
                student_path = self._train_student(dt, sess, teacher, seed, tmp, timings)
                from deployopt.core import io

                student_model = io.load(student_path)
            t0 = time.perf_counter()
            decision = self._decide(teacher_path, student_path)
            timings["evaluate_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            latency = self._latency(teacher_path, student_path, seed)
            timings["latency_s"] = time.perf_counter() - t0

        self._record(model, student_model, decision, latency, timings, time.perf_counter() - start)
        if decision["swapped"]:
            return ir.passes.PassResult(student_model, True)
        return ir.passes.PassResult(model.clone(), False)

    # -- student from an ONNX file --------------------------------------------------------------
    def _onnx_student(self, teacher: Interface) -> ir.Model:
        from deployopt.core import io

        path = pathlib.Path(self.student["onnx"]).expanduser()
        try:
            student = io.load(path)
        except UserError as e:
            raise UserError(f"student.onnx: {e}") from e
        label = f"student {path}"
        own = interface(student, label)
        for what, s_dims, t_dims in (("input", own.input_dims, teacher.input_dims),
                                     ("output", own.output_dims, teacher.output_dims)):
            if not dims_fit(s_dims, t_dims):
                raise UserError(f"{label}: {what} {dims_text(s_dims)} does not match the teacher's "
                                f"{what} {dims_text(t_dims)}")
        graph = student.graph
        inputs = [v for v in graph.inputs if v.name not in graph.initializers]
        for value, want in ((inputs[0], teacher.input_name), (graph.outputs[0], teacher.output_name)):
            if value.name != want:
                self._rename(student, value, want)
        self.note(f"student from {path}: evaluated as given (not trained here)")
        self.details["training"] = None
        return student

    def _rename(self, model: ir.Model, value: ir.Value, name: str) -> None:
        """Give ``value`` the teacher's name, moving aside any other value that holds it."""
        for other in ir.traversal.RecursiveGraphIterator(model.graph):
            for out in other.outputs:
                if out is not value and out.name == name:
                    out.name = f"{name}__student"
        for other in model.graph.inputs:
            if other is not value and other.name == name:
                other.name = f"{name}__student"
        old = value.name
        value.name = name
        self.note(f"student {'input' if value.producer() is None else 'output'} '{old}' renamed to "
                  f"the teacher's '{name}'")

    # -- student trained here -------------------------------------------------------------------
    def _build(self, teacher: Interface, sample_shape: tuple[int, ...], classes: int, seed: int):
        import torch

        from deployopt import models

        kwargs = dict(self.student_kwargs)
        auto = {}
        if self.student in models.REGISTRY:
            # Reference models default to 10 classes / their own channels: fit them to the teacher.
            if "num_classes" not in kwargs and models.accepts(self.student, "num_classes"):
                auto["num_classes"] = classes
            if len(sample_shape) == 3 and "in_channels" not in kwargs and models.accepts(self.student, "in_channels"):
                auto["in_channels"] = sample_shape[0]
        try:
            module = models.resolve(self.student, seed=seed, **kwargs, **auto)
        except UserError as e:
            raise UserError(f"student: {e}") from e
        label = f"student '{self.student}'"
        shape = (teacher.fixed_batch or 1, *sample_shape)
        teacher_in = dims_text(teacher.input_dims or (None, *sample_shape))
        own = getattr(module, "default_input_shape", None)
        expects = f"; it expects {dims_text(tuple(own))}" if own else ""
        module.eval()
        try:
            with torch.no_grad():
                out = module(torch.zeros(shape))
        except Exception as e:  # user code: any exception means the input does not fit
            raise UserError(f"{label}: does not accept the teacher's input {teacher_in}{expects} "
                            f"({one_line(e, 160, with_type=True)})") from e
        if not isinstance(out, torch.Tensor):
            raise UserError(f"{label}: returns {type(out).__name__}; the teacher's output is one tensor "
                            f"{dims_text(teacher.output_dims)}")
        if tuple(out.shape[1:]) != (classes,):
            batch = (teacher.fixed_batch,)
            raise UserError(f"{label}: output {dims_text(batch + tuple(out.shape[1:]))} does not match the "
                            f"teacher's output {dims_text(batch + (classes,))}")
        if auto:
            self.note(f"student {self.student} built with "
                      + ", ".join(f"{k}={v}" for k, v in auto.items()) + " (from the teacher)")
        return module

    def _train_student(self, dt, sess, teacher: Interface, seed: int, tmp: pathlib.Path,
                       timings: dict[str, float]) -> pathlib.Path:
        from deployopt.models.export import export_model

        ctx = self.context
        training = ctx.training
        if training is None:
            raise UserError("data.training: the distill pass needs training data "
                            "(data.training, or data.calibration as the fallback)")
        if len(training) == 0:
            raise UserError(f"data.training: dataset {training.name!r} is empty (no samples to train on)")
        check_samples(tuple(training.sample_shape), teacher, "data.training", training.name)
        if self.alpha == 0 and not training.labeled:
            raise UserError(f"alpha: 0 trains on labels alone but data.training {training.name!r} has no labels")
        x, y = dt.load_arrays(training, "data.training")
        check_samples(tuple(x.shape[1:]), teacher, "data.training", training.name)
        sample_shape = tuple(int(d) for d in x.shape[1:])

        classes = teacher.classes
        if classes is None:  # dynamic class dim: ask the teacher
            classes = int(dt.teacher_logits(sess, teacher.input_name, teacher.output_name, x[:2],
                                            teacher.fixed_batch).shape[1])
        with dt.torch_state(ctx.threads):
            module = self._build(teacher, sample_shape, classes, seed)
        if y is not None and (y.min() < 0 or y.max() >= classes):
            bad = int(y.max()) if y.max() >= classes else int(y.min())
            raise UserError(f"data.training: label {bad} is outside the teacher's {classes} classes")

        t0 = time.perf_counter()
        logits = dt.teacher_logits(sess, teacher.input_name, teacher.output_name, x, teacher.fixed_batch)
        timings["teacher_logits_s"] = time.perf_counter() - t0
        self.note(f"teacher logits cached for {len(x)} training samples of {training.name!r} in "
                  f"{timings['teacher_logits_s']:.1f} s (onnxruntime, {ctx.threads} thread(s))")

        order = np.random.default_rng(seed).permutation(len(x))
        n_hold = int(round(self.holdout * len(x)))
        n_hold = min(n_hold, len(x) - 2) if self.holdout > 0 else 0
        if self.holdout > 0 and n_hold < 1:
            self.note(f"holdout: {len(x)} training samples are too few to hold any out; no early stopping")
            n_hold = 0
        if self.holdout == 0:
            self.note("holdout: 0, no held-out set: every epoch runs and the last weights are kept")
        hold, fit = order[:n_hold], order[n_hold:]
        holdout = (x[hold], logits[hold], None if y is None else y[hold]) if n_hold else None
        if y is None:
            self.note("data.training has no labels: pure KL to the teacher (alpha not used)")

        padding = self.crop_padding if self.augment else 0
        flip = self.flip and self.augment
        if (padding or flip) and not (len(sample_shape) == 3 and sample_shape[0] in (1, 3, 4)
                                      and min(sample_shape[1:]) > 2 * padding):
            self.note(f"augment: skipped, samples {list(sample_shape)} are not C x H x W images "
                      f"larger than the padding")
            padding, flip = 0, False
        cfg = dt.TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             weight_decay=self.weight_decay, temperature=self.temperature,
                             alpha=self.alpha, seed=seed, padding=padding, flip=flip,
                             patience=self.patience if n_hold else None)
        with dt.torch_state(ctx.threads):
            result = dt.train(module, x[fit], logits[fit], None if y is None else y[fit], holdout, cfg)
        timings["train_s"] = result.seconds
        stop = (f"stopped early after {result.epochs_run} of {self.epochs} epochs" if result.stopped_early
                else f"{result.epochs_run} epochs")
        best = ("" if result.best_epoch is None else
                f", best held-out agreement {result.best_agreement:.4f} at epoch {result.best_epoch}")
        self.note(f"trained {self.student} on {len(fit)} samples ({n_hold} held out), {stop}{best}, "
                  f"{result.seconds:.1f} s")
        self.details["training"] = {
            "student": self.student, "student_kwargs": dict(self.student_kwargs),
            "samples": len(fit), "holdout": n_hold, "labeled": y is not None, "seed": seed,
            "augment": {"padding": padding, "flip": flip}, "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch, "best_holdout_agreement": result.best_agreement,
            "stopped_early": result.stopped_early, "history": result.history,
            "threads": ctx.threads}

        t0 = time.perf_counter()
        path = tmp / "student.onnx"
        with dt.torch_state(ctx.threads):
            exported = export_model(module, path, (teacher.fixed_batch or 1, *sample_shape),
                                    dynamic_batch=teacher.fixed_batch is None,
                                    tolerance=self.export_tolerance, input_name=teacher.input_name,
                                    output_name=teacher.output_name, seed=seed, exporter=self.exporter)
        timings["export_s"] = time.perf_counter() - t0
        self.details["export"] = {
            "exporter": exported.exporter, "opset": exported.opset,
            "max_abs_diff": exported.max_abs_diff, "fallback_reason": exported.fallback_reason}
        return path

    # -- decision, latency, record --------------------------------------------------------------
    def _decide(self, teacher_path: pathlib.Path, student_path: pathlib.Path) -> dict[str, Any]:
        from deployopt.measure.judge import Judge

        ctx = self.context
        data = ctx.evaluation
        judge = Judge(teacher_path, data, metrics=ctx.metrics, relative=self.relative, batch_size=self.batch_size,
                      threads=ctx.threads)
        t_eval = judge.reference_result()
        verdict = judge.score(student_path, with_reference=True)
        s_eval = verdict.result
        drop = verdict.drop
        swapped = drop is not None and drop <= self.max_accuracy_drop + 1e-12
        return {"dataset": data.name, "n": s_eval["n"], "metric": verdict.metric, "teacher": verdict.base,
                "student": verdict.score, "teacher_top1": t_eval["top1"], "student_top1": s_eval["top1"],
                "agreement": s_eval["agreement"], "kl": s_eval["kl"], "drop": drop,
                "max_accuracy_drop": self.max_accuracy_drop, "relative": self.relative,
                "metrics": verdict.per_metric, "swapped": swapped}

    def _latency(self, teacher_path: pathlib.Path, student_path: pathlib.Path, seed: int) -> dict[str, Any] | None:
        if self.latency_runs == 0:
            return None
        from deployopt.measure import latency

        threads = self.context.threads
        result = latency.compare([teacher_path, student_path], labels=["teacher", "student"],
                                 threads=(threads,), batch=(1,), warmup=LATENCY_WARMUP,
                                 runs=self.latency_runs, rounds=LATENCY_ROUNDS, seed=seed, progress=False)
        rows = {r["model"]: r for r in result.rows}
        t_row, s_row = rows["teacher"], rows["student"]
        errors = [f"{k}: {r['error']}" for k, r in rows.items() if r["error"] is not None]
        return {"threads": threads, "batch": 1, "runs": self.latency_runs, "rounds": LATENCY_ROUNDS,
                "teacher_p50_ms": t_row["p50_ms"], "student_p50_ms": s_row["p50_ms"],
                "speedup": s_row["speedup"], "speedup_ci": s_row["speedup_ci"] and list(s_row["speedup_ci"]),
                "errors": errors, "warnings": list(result.warnings)}

    def _record(self, teacher: ir.Model, student: ir.Model, decision: dict, latency: dict | None,
                timings: dict[str, float], seconds: float) -> None:
        from deployopt.core.stats import model_stats

        keys = ("macs", "params", "bytes", "opset")
        t_stats = {k: v for k, v in model_stats(teacher).items() if k in keys}
        s_stats = {k: v for k, v in model_stats(student).items() if k in keys}
        mac_ratio = (t_stats["macs"] / s_stats["macs"]) if t_stats["macs"] and s_stats["macs"] else None
        self.details.update({"teacher": t_stats, "student": {"spec": self.student_label, **s_stats},
                        "mac_ratio": mac_ratio, "decision": decision, "latency": latency,
                        "timings_s": {k: round(v, 3) for k, v in timings.items()},
                        "seconds": round(seconds, 3)})

        m, tol = decision["metric"], self.max_accuracy_drop
        scores = (f"{m} {decision['student']:.4f} vs teacher {decision['teacher']:.4f} on "
                  f"{decision['n']} samples of {decision['dataset']!r}")
        if self.relative:
            scores += ", drop relative to the teacher's score"
        if decision["swapped"]:
            self.note(f"student swapped in: {self.student_label}, drop {decision['drop']:.4f} <= {tol:g} "
                      f"({scores})")
        else:
            self.note(f"student rejected: drop {decision['drop']:.4f} > {tol:g} ({scores}); "
                      f"the teacher is kept")
        sizes = f"params {t_stats['params']:,} -> {s_stats['params']:,}"
        if mac_ratio is not None:
            sizes = f"MACs {t_stats['macs']:,} -> {s_stats['macs']:,} ({mac_ratio:.1f}x fewer), " + sizes
        self.note(f"teacher -> student: {sizes}")
        if t_stats["opset"] != s_stats["opset"]:
            self.note(f"student opset {s_stats['opset']} (teacher {t_stats['opset']})")
        if latency is not None:
            if latency["errors"]:
                self.note("latency: " + "; ".join(latency["errors"]))
            elif latency["speedup"] is not None:
                low, high = latency["speedup_ci"]
                self.note(f"latency p50 {latency['teacher_p50_ms']:.3f} ms -> {latency['student_p50_ms']:.3f} ms "
                          f"({latency['speedup']:.2f}x [{low:.2f}, {high:.2f}], {latency['threads']} thread(s), "
                          f"batch 1)")
        self.note(f"distill step took {seconds:.1f} s")
