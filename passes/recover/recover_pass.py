"""Recover: fine-tune the current model's own weights to imitate a teacher, keeping its graph.

After ``prune`` or ``channel_prune`` the model computes something close to, but not the same as,
the model it came from. This pass trains the pruned graph's weights (the interpreter's trainable
initializers: layer weights and biases, see ``deployopt.passes.recover.interpreter``; with
``trainable: changed`` only those that differ from the teacher's initializer of the same name,
so the layers pruning did not touch keep the teacher's exact values; with ``trainable: biases``
only the per-channel vectors, so every weight tensor keeps its exact values) so that its
outputs match the teacher's, by default the pipeline's input model (``context.reference``, run in
onnxruntime), on ``data.training`` (falling back to ``data.calibration``; labels are not needed).

Loss, for student logits s, teacher logits t, temperature T and feature names F::

    L = T^2 KL(softmax(t / T) || softmax(s / T))
        + feature_weight * mean_{f in F} ||s_f - t_f||^2 / ||t_f||^2       (per batch)

The feature term (optional) matches intermediate tensors of the same name and shape in both
models, normalised by the teacher's energy so each tensor weighs the same whatever its scale.
The entry ``penultimate`` (when no tensor has that name) is the feature map a classifier head
pools: the input of the global pooling (GlobalAveragePool, GlobalMaxPool, ReduceMean/ReduceMax)
reached from the model's first output through single-input head ops (Gemm, Reshape, Flatten,
activations); when pruning changed that map's channels it is left out with a note (a tensor
named outright with another shape is refused). Matching it, with the teacher's head kept, is the
"mimic the features, keep the classifier" recipe for few-sample compression: the C·H·W values of
that map per view carry more of the teacher than its logits do.

Teacher targets are exact for every training input: ``views`` copies of each training sample
(random-resized crop, flip, colour jitter, optional mixup/cutmix; ``passes.recover.views``) are
drawn once, the teacher labels each copy once (onnxruntime, cached), and the loop of
``deployopt.passes.distill.train`` (AdamW, one-cycle schedule, early stopping) trains on them.

Masking: a weight that is exactly 0 when the pass starts (magnitude pruning's zeros) gets a zero
gradient, ``g <- g * [w != 0]``. With AdamW the moments of such a weight stay 0, so its update is
0 and decoupled weight decay scales 0 to 0: pruned weights stay exactly zero. Integer weights
of a quantized graph are not masked: int8 rounding makes many small weights 0 that no pruning
chose (the float weights of layers left in float are).

Early stopping watches the top-1 agreement with the teacher on ``data.evaluation`` when the recipe
has one (at most ``holdout_samples`` of it), else on a held-out fraction ``holdout`` of the training
samples (equal agreement: the lower KL there), or with ``select_by: kl`` the KL there (equal KL:
the higher agreement); the weights of the best epoch are kept, the untrained ones included (a
fine-tune that does not help leaves the model as it was). Bounded: ``max_samples``
training samples, ``views`` copies, ``max_memory_mb`` for the bank and its targets, ``max_epochs``
and ``max_seconds``. A held-out fraction of training crops is a leaky judge when other crops of the
same pictures train (the epochs that memorise them win): give ``data.evaluation`` images of their
own.

A training loss that becomes NaN or Inf stops the pass: the step fails (the run exits 1) with
the epoch in its reason, and the model leaves the step as it came in (only the torch copy trained).

After ``quantize`` (a QDQ graph) this is quantization-aware fine-tuning: the integer weights and
biases train through their fake-quantized forms with the model's scales held fixed (see
``deployopt.passes.recover.interpreter``), the teacher is still the float input model, and the
written-back integers keep the graph, its scales and so its fused int8 kernels. The quantize step's
choices (calibrated ranges, GPTQ rounding, the float fallback) are the starting point.
Training every integer weight there moves the model away from fp32 at every rate tried (a weight
step that flips a rounding is a jump of one quantization step); ``trainable: biases`` trains the
int32 biases alone, which shift each output channel's pre-activation by a learned constant b_c
(int8 weights byte-identical, the same kernels): a learned form of bias correction, fitted to the
teacher's logits through every later layer instead of to each layer's own output mean.

Write-back: trained values replace the values of the same initializers (names, shapes and dtypes
unchanged). The result is then run in onnxruntime against the torch forward on held-out inputs;
a difference above the tolerance restores the original weights and fails the step. The same
check runs before training, so an interpreter that does not reproduce the model fails before any
training time is spent. The difference is max |onnxruntime - torch| for a float graph
(``tolerance``), and the relative RMS difference ||onnxruntime - torch|| / ||onnxruntime|| for a
quantized one (``quantized_tolerance``): a one-ulp difference in a convolution's sum flips a
rounding tie of the next QuantizeLinear, and the flips cascade. Measured on MobileNetV2 int8:
torch vs onnxruntime's QDQ reference kernels 7.6%, onnxruntime's own integer kernels vs the same
reference 7.4%, so only a relative bound can tell an interpreter error (order 100%) from that.
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from deployopt.core.errors import UserError, one_line
from deployopt.core.settings import setting
from deployopt.passes.base import DeployInPlacePass
from deployopt.passes.distill.interface import Interface, check_samples, dims_text, interface

PARITY_SAMPLES = 8  # inputs of the torch-vs-onnxruntime check
PENULTIMATE = "penultimate"  # the ``features`` entry naming the map the classifier head pools
GLOBAL_POOLS = ("GlobalAveragePool", "GlobalMaxPool")
MAX_HEAD_NODES = 16  # nodes walked back from the output looking for the head's pooling
FLOAT_LR, QUANTIZED_LR, BIASES_LR = 3e-4, 2e-5, 1e-4  # the default peak learning rates (``lr`` None)


@dataclasses.dataclass
class RecoverPass(DeployInPlacePass):
    """Fine-tune the current model's weights by distillation from the pipeline's input model."""

    name: ClassVar[str] = "recover"
    #: Needs ``context.training`` (the recipe's data.training, else data.calibration).
    needs_training: ClassVar[bool] = True

    teacher: str | None = None  # None: the pipeline's input model; else the path of an ONNX teacher
    # MobileNetV2 keep 0.75 (8 views x 3 epochs, lr 1e-4), agreement / KL on 440 held-out crops:
    # T 2 65.2% / 0.753, T 1 67.0% / 0.705; with features: [penultimate] (weight 10) T 2 68.6% /
    # 0.646, T 1 68.0% / 0.651: the feature term takes what a lower temperature gave
    temperature: float = setting(2.0, low=0, low_open=True)
    # Tensor names matched between the models; "penultimate": the map the classifier head pools
    # (module docstring). Measured, ``features: [penultimate]`` at feature_weight 10 against none,
    # KL / agreement on 440 held-out crops, same pruned model and settings otherwise: MobileNetV2
    # keep 0.75 (8 views x 3 epochs, lr 1e-4) 0.753 / 65.2% -> 0.646 / 68.6% (weight 1: 0.714 /
    # 67.7%; weight 30: 0.623 / 68.6%), after int8 0.857 / 66.1% -> 0.724 / 66.6%;
    # EfficientNet-Lite0 keep 0.9 (2 views x 4 epochs, lr 2e-5) 0.091 / 87.3% -> 0.077 / 88.0%,
    # after int8 0.094 / 87.3% -> 0.081 / 87.7%. A steady KL gain, agreement inside its interval.
    # Seven block outputs of MobileNetV2 instead (see ``views``) gained nothing.
    features: list[str] = setting(default_factory=list)
    feature_weight: float = setting(1.0, low=0)
    # "all": every layer weight and bias trains; "changed": only the initializers that differ from
    # the teacher's of the same name (what pruning cut, compensated or refitted), the rest stay
    # the teacher's values. Less sensitive to lr, not better at a good one (EfficientNet-Lite0
    # keep 0.9, held-out KL after 4 epochs: changed 0.100 at 1e-4, 0.119 at 2e-5; all 0.093 at 2e-5)
    # "biases": only the 1-D parameters (Conv/Gemm biases, the constant of a bias Add, and
    # BatchNormalization's scale and shift where the graph still has them); every weight tensor
    # keeps its exact values. The one that trains a quantized graph: MobileNetV2 int8, 110 crops x 4
    # views, AdamW 1e-4, 8 epochs: KL to fp32 on 344 held-out crops 0.040 -> 0.023, where training
    # every weight raised it at every rate tried (benchmarks/results/qat_probes.md)
    trainable: Literal["all", "changed", "biases"] = "all"
    max_epochs: int = setting(5, low=1)
    max_seconds: float | None = setting(600.0, low=0, low_open=True)  # time budget of the training loop
    batch_size: int = setting(32, low=2)
    # Peak of the one-cycle schedule (AdamW). None: 1e-4 with ``trainable: biases`` (MobileNetV2
    # int8, early-stopping KL from 0.024: 0.050 at 1e-3 and 0.030 at 1e-4 after 2 epochs, 0.018
    # at 1e-4 over 8), else 3e-4 for a float graph, 2e-5 for a quantized one, which starts from
    # GPTQ's rounding (MobileNetV2 int8 trained 3 epochs on its 99 calibration crops lost 3.4
    # points of held-out agreement at 1e-4, 2.2 at 2e-5). A real-weight
    # network pruned lightly wants a low rate: EfficientNet-Lite0 at keep 0.9 (sensitivity), 529
    # images x 2 views, KL on 440 held-out crops per epoch: 0.148 -> 0.154, 0.69, 0.57, 0.58 at
    # 1e-4; 0.148 -> 0.103, 0.097, 0.093, 0.093 at 2e-5. One pruned hard gains less at 2e-5
    # (MobileNetV2 keep 0.75: KL 2.45 -> 1.23 in 4 epochs, still falling).
    lr: float | None = setting(None, low=0, high=1, low_open=True)
    weight_decay: float = setting(0.0, low=0)
    max_samples: int = setting(2048, low=2)  # training samples read (the first ones)
    # Copies per training sample in the bank, the first unaugmented. On few images, more views beat
    # more epochs in the same time: MobileNetV2 channel-pruned to keep 0.75, 529 images, lr 1e-4,
    # ~1000 s of training, agreement / KL on 440 held-out crops: 2 views x 6 epochs 59.1% / 0.99,
    # 8 views x 3 epochs 68.0% / 0.80 (matching 7 block outputs as ``features`` on top: 67.0% /
    # 0.79, no gain); EfficientNet-Lite0 keep 0.9 (criterion activation, lr 2e-5, penultimate),
    # 2 views x 4 epochs 90.9% / 0.054 in 495 s, 8 views x 3 epochs 91.6% / 0.048 in 1126 s (no
    # VNNI CPU). The default stays 2 because the bank's memory grows with it (max_memory_mb).
    views: int = setting(2, low=1)
    # Draw a new bank (new augmented copies, labelled by the teacher again) before every epoch
    # after the first, instead of training every epoch on the same copies. Costs one teacher
    # pass over the bank per epoch, inside max_seconds, and two banks' memory at the swap. Off by
    # default: on MobileNetV2 keep 0.75 (529 images, 8 views, lr 1e-4) 8 epochs with 7 fresh banks
    # reached 67.7% / KL 0.74 on the 440 held-out crops in 1134 s (teacher 176 s, peak RSS 12.7
    # GB), against 67.5% / 0.81 for 3 epochs on one bank in 443 s: lower KL, the same agreement.
    fresh_views: bool = False
    crop_scale: float = setting(0.35, low=0, high=1, low_open=True)  # smallest crop area (1: no crops)
    flip: bool = True
    jitter: float = setting(0.2, low=0, high=1, high_open=True)  # colour jitter strength (0: off)
    mixup: float = setting(0.0, low=0)  # Beta(a, a) of mixup copies (0: off)
    # Beta(a, a) of cutmix copies (0: off). Off by default: MobileNetV2 keep 0.75 (8 views, lr 1e-4,
    # features: [penultimate], epoch 2), agreement / KL on 440 held-out crops: 68.6% / 0.646
    # without, 60.7% / 0.855 with cutmix 1.0: on few, mostly off-domain images the mixed copies
    # move the training inputs farther from the photos the model is judged on.
    cutmix: float = setting(0.0, low=0)
    holdout: float = setting(0.1, low=0, high=0.5, low_open=True)  # without data.evaluation
    holdout_samples: int = setting(512, low=1)  # at most this many data.evaluation samples
    patience: int | None = setting(2, low=1)  # epochs without a better held-out score
    # the held-out score that picks the epoch kept: "kl" (ties: agreement) or "agreement" (ties: KL)
    select_by: Literal["kl", "agreement"] = "agreement"
    tolerance: float = setting(1e-3, low=0, low_open=True)  # max |onnxruntime - torch| on the outputs
    quantized_tolerance: float = setting(0.2, low=0, low_open=True)  # relative RMS, quantized graphs
    max_memory_mb: float = setting(4096.0, low=0, low_open=True)  # view bank + cached teacher outputs
    seed: int | None = setting(None, low=0)  # None: the recipe's seed

    def validate(self) -> None:
        from deployopt.models import require_torch

        require_torch("the recover pass")
        if len(set(self.features)) != len(self.features):
            raise UserError(f"features: names repeat ({', '.join(self.features)})")

    # -- the pass -------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from deployopt.measure.memory import RssSampler, peak_rss_mb
        from deployopt.passes.distill import train as dt
        from deployopt.passes.recover import interpreter

        start = time.perf_counter()
        ctx = self.context
        seed = ctx.seed if self.seed is None else self.seed
        interpreter.check_supported(model)  # refused before any data is read or anything trained
        student_io = interface(model, "model")
        teacher_model, teacher_label = self._teacher()
        teacher_io = interface(teacher_model, teacher_label)
        if teacher_io.classes and student_io.classes and teacher_io.classes != student_io.classes:
            raise UserError(f"{teacher_label}: output {dims_text(teacher_io.output_dims)} does not match the "
                            f"model's output {dims_text(student_io.output_dims)}")
        training = ctx.training
        if training is None:
            raise UserError("data.training: the recover pass needs training data "
                            "(data.training, or data.calibration as the fallback)")
        check_samples(tuple(training.sample_shape), student_io, "data.training", training.name)

        with RssSampler() as rss, dt.torch_state(ctx.threads):
            result = self._recover(model, teacher_model, teacher_io, student_io, seed, dt, interpreter)
        self.details["peak_rss_mb"] = None if rss.peak_mb is None else round(rss.peak_mb, 1)
        self.details["process_peak_rss_mb"] = round(peak_rss_mb(), 1)
        self.details["seconds"] = round(time.perf_counter() - start, 3)
        self.note(f"recover step took {self.details['seconds']:.1f} s, peak RSS "
                  f"{self.details['peak_rss_mb']} MB")
        return result

    def _teacher(self) -> tuple[ir.Model, str]:
        if self.teacher is None:
            if self.context.reference is None:
                raise UserError("teacher: no reference model in this run (the pipeline's input model); "
                                "give teacher: PATH")
            return self.context.reference, "teacher (the pipeline's input model)"
        from deployopt.core import io

        try:
            return io.load(self.teacher), f"teacher {self.teacher}"
        except UserError as e:
            raise UserError(f"teacher: {e}") from e

    def _recover(self, model: ir.Model, teacher_model: ir.Model, teacher_io: Interface, student_io: Interface,
                 seed: int, dt, interpreter) -> ir.passes.PassResult:
        import torch

        from deployopt.core.session import open_session
        from deployopt.passes.recover.views import ViewConfig, make_views

        ctx = self.context
        training = ctx.training
        x, _ = dt.load_arrays(training, "data.training", limit=self.max_samples)
        check_samples(tuple(x.shape[1:]), student_io, "data.training", training.name)
        features = self._resolved_features(model, teacher_model)
        module = interpreter.OnnxModule(model, capture=features)
        # What stays fixed is decided (or refused) before the teacher labels any training view.
        if self.trainable == "changed":
            same = self._freeze_unchanged(module, model, teacher_model)
            self.details["unchanged_frozen"] = same
            self.note(f"trainable: changed: {same} of {len(module.trainable)} initializers equal the teacher's "
                      f"and stay fixed")
        if self.trainable == "biases":
            weights = self._freeze_weights(module)
            self.details["weights_frozen"] = weights
            self.note(f"trainable: biases: {weights} weight tensors stay fixed, "
                      f"{len(module.trainable) - weights} per-channel vectors train")
        teacher_proto = ir.to_proto(teacher_model)
        missing = [f for f in features if not _has_tensor(teacher_model, f)]
        if missing:
            raise UserError(f"features: tensor '{missing[0]}' is not in the teacher")
        if features:  # the matched tensors become extra teacher outputs
            teacher_proto = _with_outputs(teacher_model, features)
        sess = dt.session(teacher_proto.SerializeToString(), ctx.threads)

        # Held-out set for early stopping, with the teacher's logits.
        evaluation = ctx.evaluation
        if evaluation is not None and len(evaluation):
            check_samples(tuple(evaluation.sample_shape), student_io, "data.evaluation", evaluation.name)
            hx, hy = dt.load_arrays(evaluation, "data.evaluation", limit=self.holdout_samples)
            fit = x
            held_from = f"{len(hx)} samples of data.evaluation {evaluation.name!r}"
        else:
            order = np.random.default_rng(seed).permutation(len(x))
            n_hold = max(1, min(len(x) - 2, int(round(self.holdout * len(x)))))
            hx, hy, fit = x[order[:n_hold]], None, x[order[n_hold:]]
            held_from = f"{n_hold} held-out training samples"
        ht = dt.teacher_logits(sess, teacher_io.input_name, teacher_io.output_name, hx, teacher_io.fixed_batch)

        # Training runs mini-batches: a graph that fixes its batch (a Reshape to [1, ...]) cannot.
        try:
            with torch.no_grad():
                module(torch.from_numpy(hx[:2] if len(hx) >= 2 else x[:2]))
        except RuntimeError as e:
            raise UserError(f"model: does not run on a batch of 2 samples ({one_line(e)}); recover trains in "
                            f"mini-batches: export the model with a dynamic batch dimension") from e

        # The interpreter must reproduce the model before its weights are worth training.
        current = open_session(ir.to_proto(model).SerializeToString(), threads=ctx.threads,
                               optimization_level="disable", what="the model")
        quantized = any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph)
        limit, measure = ((self.quantized_tolerance, "relative RMS") if quantized else (self.tolerance, "max |diff|"))
        self.details["quantization_aware"] = quantized
        before = self._parity(module, current, student_io, hx[:PARITY_SAMPLES], quantized)
        self.details["parity_before"] = before
        if before > limit:
            self.fail(f"recover: the torch interpreter differs from onnxruntime by {before:.3g} ({measure}) > "
                      f"{'quantized_tolerance' if quantized else 'tolerance'} {limit:g} on the model as given; "
                      f"not trained")
            return ir.passes.PassResult(model, False)

        # The view bank and its teacher targets, within the memory budget.
        cfg = ViewConfig(self.views, self.crop_scale, self.flip, self.jitter, self.mixup, self.cutmix)
        # per view: the input, the teacher's logits and its matched features (a 224x224 MobileNetV2
        # with its 7 block outputs as features holds 0.6 MB of them per view, as much as the image)
        feature_floats = (sum(int(np.prod(f.shape[1:])) for f in
                              dt.teacher_outputs(sess, teacher_io.input_name, features, x[:1],
                                                 teacher_io.fixed_batch))
                          if features else 0)
        per_sample = x[0].nbytes + 4 * ((teacher_io.classes or 1000) + feature_floats)
        # A fresh bank is drawn while the previous one is still in use: two banks at the peak.
        refresh = self.fresh_views and self.views > 1 and cfg.augments
        banks = 2 if refresh else 1
        bank_mb = banks * len(fit) * self.views * per_sample / 2**20
        if bank_mb > self.max_memory_mb:
            held = "two view banks (fresh_views) and their" if banks == 2 else "view bank and its"
            raise UserError(f"max_memory_mb: {len(fit)} samples x {self.views} views need {bank_mb:.0f} MB for the "
                            f"{held} teacher targets (limit {self.max_memory_mb:g} MB); lower max_samples or views")
        if self.fresh_views and not refresh:
            self.note("fresh_views: every copy of a sample would be the same (views 1 or no augmentation): "
                      "one bank is used")
        t0 = time.perf_counter()
        bank = make_views(fit, cfg, seed)
        names = [teacher_io.output_name, *features]
        outs = dt.teacher_outputs(sess, teacher_io.input_name, names, bank, teacher_io.fixed_batch)
        logits, feats = outs[0], outs[1:]
        teacher_s = time.perf_counter() - t0
        self.note(f"teacher ({'input model' if self.teacher is None else self.teacher}) labelled "
                  f"{len(bank)} training views ({len(fit)} samples x {len(bank) // len(fit)}) in {teacher_s:.1f} s")

        # Feature targets live in a list the fresh-view redraw replaces in place.
        feature_targets = [torch.from_numpy(f) for f in feats]
        extra_loss = self._feature_loss(module, features, feature_targets, bank[:2]) if features else None
        redraws: list[float] = []

        def redraw(epoch: int) -> tuple[np.ndarray, np.ndarray]:
            """The bank of ``epoch``: copies drawn with their own seed, labelled by the teacher."""
            t_start = time.perf_counter()
            fresh = make_views(fit, cfg, seed + 1000 * (epoch - 1))
            fresh_outs = dt.teacher_outputs(sess, teacher_io.input_name, names, fresh, teacher_io.fixed_batch)
            feature_targets[:] = [torch.from_numpy(f) for f in fresh_outs[1:]]
            redraws.append(time.perf_counter() - t_start)
            return fresh, fresh_outs[0]
        frozen = self._mask_zeros(module, torch)

        lr = (self.lr if self.lr is not None else BIASES_LR if self.trainable == "biases"
              else QUANTIZED_LR if quantized else FLOAT_LR)
        train_cfg = dt.TrainConfig(epochs=self.max_epochs, batch_size=self.batch_size, lr=lr,
                                   weight_decay=self.weight_decay, temperature=self.temperature, alpha=1.0,
                                   seed=seed, padding=0, flip=False, patience=self.patience, progress=False,
                                   max_seconds=self.max_seconds, keep_initial=True, label="recover",
                                   select_by=self.select_by)
        try:
            result = dt.train(module, bank, logits, None, (hx, ht, hy), train_cfg, extra_loss=extra_loss,
                              redraw=redraw if refresh and len(bank) > len(fit) else None)
        except dt.Diverged as e:  # only the torch copy trained: the graph's initializers are as given
            self.details["diverged"] = str(e)
            self.fail(f"{e}; the model is kept as it was before recover")
            return ir.passes.PassResult(model, False)
        history = result.history
        trained = sum(1 for param in module.params if param.requires_grad)
        agree_before, agree_after = history[0]["holdout_agreement"], result.best_agreement
        best = next(h for h in history if h["epoch"] == result.best_epoch)
        self.details.update({
            "teacher": "reference" if self.teacher is None else self.teacher,
            "samples": len(fit), "views": len(bank) // len(fit), "bank_mb": round(bank_mb, 1),
            "holdout": held_from, "trainable_initializers": trained,
            "frozen_zeros": frozen, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early, "out_of_time": result.out_of_time,
            "agreement_before": agree_before, "agreement_after": agree_after,
            "kl_before": history[0]["holdout_kl"], "kl_after": best["holdout_kl"],
            "top1_before": history[0]["holdout_top1"], "top1_after": best["holdout_top1"],
            "history": history, "teacher_seconds": round(teacher_s + sum(redraws), 3),
            "fresh_banks": len(redraws), "train_seconds": round(result.seconds, 3),
            "lr": lr, "threads": ctx.threads, "seed": seed})
        stop = ("stopped by max_seconds" if result.out_of_time else
                "stopped early" if result.stopped_early else "all epochs")
        self.note(f"trained {trained} initializers for {result.epochs_run} epoch(s) ({stop}) in "
                  f"{result.seconds:.1f} s; agreement with the teacher on {held_from}: "
                  f"{agree_before:.4f} -> {agree_after:.4f} (KL {history[0]['holdout_kl']:.3g} -> "
                  f"{best['holdout_kl']:.3g})" + (f"; {frozen:,} zero weights kept at 0" if frozen else "")
                  + (f"; {len(redraws)} fresh view bank(s), teacher {sum(redraws):.1f} s" if redraws else ""))
        if result.best_epoch == 0:
            self.note("no epoch beat the model as given: its weights are kept")
            return ir.passes.PassResult(model, False)

        originals = {name: model.graph.initializers[name].const_value for name in module.trainable}
        for name, array in module.trained_arrays().items():
            model.graph.initializers[name].const_value = ir.tensor(array, name=name)
        updated = open_session(ir.to_proto(model).SerializeToString(), threads=ctx.threads,
                               optimization_level="disable", what="the recovered model")
        after = self._parity(module, updated, student_io, hx[:PARITY_SAMPLES], quantized)
        self.details["relative_rms_diff" if quantized else "max_abs_diff"] = after
        if after > limit:
            for name, tensor in originals.items():
                model.graph.initializers[name].const_value = tensor
            self.fail(f"recover: the recovered model differs from the torch forward by {after:.3g} ({measure}) > "
                      f"{'quantized_tolerance' if quantized else 'tolerance'} {limit:g}; the weights before "
                      f"training are kept")
            return ir.passes.PassResult(model, False)
        self.note(f"written back into the same initializers; onnxruntime vs torch {measure} {after:.2e}")
        return ir.passes.PassResult(model, True)

    # -- pieces ---------------------------------------------------------------------------------
    @staticmethod
    def _parity(module, sess, io: Interface, x: np.ndarray, relative: bool) -> float:
        """max |onnxruntime - torch|, or with ``relative`` their relative RMS difference (docstring)."""
        import torch

        ref = sess.run([io.output_name], {io.input_name: x})[0]
        module.eval()
        with torch.no_grad():
            out = module(torch.from_numpy(x)).numpy()
        if relative:
            return float(np.linalg.norm(out - ref) / max(float(np.linalg.norm(ref)), 1e-12))
        return float(np.abs(out - ref).max())

    def _resolved_features(self, model: ir.Model, teacher: ir.Model) -> list[str]:
        """``features`` with ``penultimate`` replaced by the tensor it names in ``model``, or left
        out with a note when pruning changed that map's channels (known from the inferred shapes):
        a named tensor of another shape is refused, the keyword asks for the map only if it matches."""
        if PENULTIMATE not in self.features or _has_tensor(model, PENULTIMATE):
            return list(self.features)
        name, pool = penultimate_tensor(model)
        if name in self.features:
            raise UserError(f"features: 'penultimate' is '{name}', which the list also names")
        self.details["penultimate"] = name
        mine, theirs = _sample_shape(model, name), _sample_shape(teacher, name)
        if mine is not None and theirs is not None and mine != theirs:
            self.details["penultimate"] = None
            self.note(f"features: penultimate '{name}' is {list(mine)} per sample in the model but {list(theirs)} "
                      f"in the teacher (pruned channels): not matched")
            return [f for f in self.features if f != PENULTIMATE]
        self.note(f"features: penultimate is '{name}', the input of {pool.op_type} '{pool.name}'")
        return [name if f == PENULTIMATE else f for f in self.features]

    def _feature_loss(self, module, features: list[str], targets: list, probe: np.ndarray):
        """The feature term of the loss for a batch's indices; ``targets`` (one tensor per matched
        name, indexed like the bank) is read at every call, so a redrawn bank's targets apply."""
        import torch

        with torch.no_grad():
            module(torch.from_numpy(probe))
        for name, target in zip(features, targets):
            got = tuple(module.captured[name].shape[1:])
            if got != tuple(target.shape[1:]):
                raise UserError(f"features: tensor '{name}' is {list(got)} per sample in the model but "
                                f"{list(target.shape[1:])} in the teacher (pruned tensors cannot be matched)")
        weight = self.feature_weight

        def loss(idx):
            terms = []
            for name, target in zip(features, targets):
                t = target[idx]
                terms.append(((module.captured[name] - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12))
            return weight * torch.stack(terms).mean()

        return loss

    @staticmethod
    def _freeze_unchanged(module, model: ir.Model, teacher: ir.Model) -> int:
        """Stop the gradient of every trainable initializer equal to the teacher's of the same name
        (``trainable: changed``); returns how many."""
        same = 0
        for name in module.trainable:
            theirs = teacher.graph.initializers.get(name)
            if theirs is None or theirs.const_value is None:
                continue
            mine, other = model.graph.initializers[name].const_value.numpy(), theirs.const_value.numpy()
            if mine.shape == other.shape and np.array_equal(mine, other):
                module.parameter(name).requires_grad_(False)
                same += 1
        if same == len(module.trainable):
            raise UserError("trainable: 'changed' finds every weight equal to the teacher's: nothing to train")
        return same

    @staticmethod
    def _freeze_weights(module) -> int:
        """Stop the gradient of every trainable initializer of more than one dimension
        (``trainable: biases``); returns how many."""
        weights = [name for name in module.trainable if module.parameter(name).dim() > 1]
        if len(weights) == len(module.trainable):
            raise UserError("trainable: 'biases' finds no bias or other per-channel vector in the model: "
                            "nothing to train")
        for name in weights:
            module.parameter(name).requires_grad_(False)
        return len(weights)

    @staticmethod
    def _mask_zeros(module, torch) -> int:
        """Zero gradients for the weights that are exactly 0 (module docstring); returns their count."""
        frozen = 0
        quantized = {id(module.parameter(name)) for name in module.quantized}
        for param in module.params:
            # int8 rounding makes many small weights 0 that no pruning chose; a frozen one has no gradient
            if id(param) in quantized or not param.requires_grad:
                continue
            mask = param.detach() != 0
            zeros = int((~mask).sum())
            if zeros:
                frozen += zeros
                keep = mask.to(param.dtype)
                param.register_hook(lambda grad, keep=keep: grad * keep)
        return frozen


def penultimate_tensor(model: ir.Model) -> tuple[str, ir.Node]:
    """The feature map a classifier head pools, and the pooling node: walking back from the
    model's first output through nodes with one non-constant input, the input of the first global
    pooling met (a ReduceMean/ReduceMax counts when it reduces exactly the spatial axes); in a QDQ
    graph the float tensor before that input's QuantizeLinear/DequantizeLinear pair."""
    output = model.graph.outputs[0]
    value, seen = output, 0
    while value.producer() is not None and seen < MAX_HEAD_NODES:
        node = value.producer()
        if node.op_type in GLOBAL_POOLS or (node.op_type in ("ReduceMean", "ReduceMax") and
                                             _reduces_spatial_axes(node)):
            return _before_fake_quantization(node.inputs[0]).name, node
        data = [v for v in node.inputs if v is not None and not _is_constant(v)]
        if len(data) != 1:
            break
        value, seen = data[0], seen + 1
    raise UserError(f"features: 'penultimate' needs a classifier head: no global pooling before the output "
                    f"'{output.name}' through single-input ops; name the tensors to match instead")


def _before_fake_quantization(value: ir.Value) -> ir.Value:
    """The float tensor behind a QuantizeLinear -> DequantizeLinear pair (a QDQ graph), which has
    the name the float teacher gives it; ``value`` itself otherwise."""
    dq = value.producer()
    q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
    return q.inputs[0] if q is not None and q.op_type == "QuantizeLinear" else value


def _reduces_spatial_axes(node: ir.Node) -> bool:
    """A ReduceMean/ReduceMax over exactly the axes after the channel axis of an N, C, spatial...
    input (axes as an attribute or, from opset 18, a constant input; rank 4 when not inferred)."""
    axes = node.attributes.get("axes")
    values = axes.as_ints() if axes is not None else None
    if values is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        try:
            const = ir.convenience.get_const_tensor(node.inputs[1])
        except ValueError:
            const = None
        values = None if const is None else [int(a) for a in const.numpy().reshape(-1)]
    shape = node.inputs[0].shape
    rank = len(shape) if shape is not None else 4
    return values is not None and rank >= 3 and sorted(a % rank for a in values) == list(range(2, rank))


def _is_constant(value: ir.Value, depth: int = 3) -> bool:
    """An initializer, a Constant's output, or computed from such alone (a weight's
    DequantizeLinear in a QDQ graph), looking ``depth`` nodes back."""
    producer = value.producer()
    if value.const_value is not None or (producer is not None and producer.op_type == "Constant"):
        return True
    return (producer is not None and depth > 0 and
            all(_is_constant(v, depth - 1) for v in producer.inputs if v is not None))


def _sample_shape(model: ir.Model, name: str) -> tuple | None:
    """The per-sample dimensions of the tensor ``name`` when they are all known, else None."""
    value = next((o for node in model.graph for o in node.outputs if o.name == name), None)
    dims = None if value is None or value.shape is None else tuple(value.shape)[1:]
    return dims if dims is not None and all(isinstance(d, int) for d in dims) else None


def _has_tensor(model: ir.Model, name: str) -> bool:
    graph = model.graph
    return (name in graph.initializers or any(v.name == name for v in graph.inputs)
            or any(o.name == name for node in graph for o in node.outputs))


def _with_outputs(model: ir.Model, names: list[str]):
    """A copy of ``model`` as a proto that also outputs the tensors ``names``."""
    import onnx

    proto = ir.to_proto(model)
    known = {v.name for v in proto.graph.output}
    for name in names:
        if name not in known:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return proto
