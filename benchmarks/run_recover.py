"""Published numbers for the ``recover`` pass: channel-pruned ImageNet models fine-tuned against
their unpruned selves, with and without int8.

    .venv/bin/python -m benchmarks.run_recover [--quick] [--models mobilenet_v2,efficientnet_lite0]
        [--keeps 0.9,0.75,0.5] [--epochs 4] [--max-seconds 900] [--lr LR] [--views N] [--fresh-views]
        [--features penultimate] [--feature-weight W]
        [--criterion l1|l2|activation] [--mixup A] [--cutmix A]
        [--calibration photos|training] [--equalize] [--bias-epochs N] [--crops 24] [--no-openvino]
        [--runs 30] [--rounds 3]
        [--out benchmarks/results/recover.md]

``--quick``: MobileNetV2 at keep 0.75 only (the row the target is about).

1. MobileNetV2 and EfficientNet-Lite0 with their real ImageNet weights (``deployopt.models``,
   offline packages), exported at 1x3x224x224 with a dynamic batch: the fp32 reference.
2. Training images, none of them in the held-out sets: scikit-learn's photos (china, flower),
   matplotlib's grace_hopper, scikit-image's other pictures (retina, hubble deep field, grass,
   gravel, brick, color, ihc, camera, coins, moon, page, text, clock_motion), the foolbox CIFAR
   thumbnails and the first 50 faces of scikit-image's lfw_subset; ``--crops`` random square
   crops of each of the large pictures (seeded); and the even-numbered half of the 110 crops of
   the 'photos' test split (the demo's calibration set: other crops of the photos the held-out
   set is cut from, none of the held-out crops). Written as PNGs and read back through the
   model's preprocessing preset (``folder:`` dataset). The odd-numbered half of those crops is
   recover's early-stopping set (``data.evaluation``), in no other set: early stopping on
   training-folder images (textures, faces) rejected epochs that raised agreement on photos.
   ``channel_prune`` (ranking, sensitivity, reconstruction) and ``quantize`` calibrate on the
   training folder with its 55 'photos' crops first (``--calibration photos``, the default: a
   user calibrates on images like the ones the model will see), or on its first 256 images after
   a seeded shuffle (``--calibration training``). Never on the early-stopping crops: a pruned
   model reconstructed on them scores in-sample there (measured: keep 0.5 at 0.91 agreement on
   them before training, keep 0.75 at 0.80), and early stopping then rejects every epoch.
3. Per keep: ``ChannelPrunePass(keep, scope)`` (``--scope``, default ``sensitivity``: the MACs of
   uniform keeps, spent where measured damage is least; ``--criterion`` ranking, default l1;
   reconstruction), then ``RecoverPass`` (its defaults, ``max_epochs`` and ``max_seconds`` from the
   flags, ``--features`` its comma-separated ``features``, ``--mixup``/``--cutmix`` its ``mixup`` and
   ``cutmix``; early stopping on the early-stopping crops of step 2), and
   ``QuantizePass(latency_aware=False)`` on each (int8 throughout; ``--equalize``: with
   ``equalize: true``). ``--bias-epochs N``: the recovered int8 model then trains its int32 biases
   alone against fp32 (``RecoverPass(trainable="biases")``, N epochs), the '+ biases' row.
4. Held-out: agreement and KL vs fp32 on the 440 'photos' crops of the train split (the demo's
   fidelity set: scikit-image photos and the ImageNet samples), with the noise floor (fp32 against
   itself on the crops moved by one grey level) and each model's agreement on the crops whose
   fp32 top-1 that noise leaves unchanged, top-1 on the 20 labelled 'imagenet-samples'
   (``deployopt.measure.accuracy``); latency ratio vs fp32 with a bootstrap
   95% interval (``deployopt.measure.latency.compare``: worker processes, interleaved rounds,
   1 thread, batch 1), and the same on OpenVINO's CPU plugin against its own fp32 (skipped with
   ``--no-openvino``); MACs and file size (``deployopt.core.stats``). The target lines check
   ``TARGETS``.

Writes ``--out`` (command, machine stamp, table) and a Pareto plot (latency ratio vs agreement)
next to it, and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import shlex
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from deployopt.measure import machine  # noqa: E402

SHAPE = (1, 3, 224, 224)
PRESET = {"mobilenet_v2": "imagenet", "efficientnet_lite0": "efficientnet-lite"}
#: The figures the pass is held to: at least ``speedup`` x fp32 (or, with "int8", faster than int8
#: alone) and at least ``agreement`` top-1 agreement on the held-out crops.
TARGETS = ({"arch": "mobilenet_v2", "keep": 0.75, "speedup": 3.0, "agreement": 0.90},
           {"arch": "efficientnet_lite0", "keep": 0.9, "speedup": "int8", "agreement": 0.93})
CALIBRATION_TEXT = {"photos": "the training folder, its 55 'photos' crops first",
                    "training": "the first 256 images of the shuffled training folder"}
SKIMAGE = ("retina.jpg", "hubble_deep_field.jpg", "grass.png", "gravel.png", "brick.png", "color.png",
           "ihc.png", "camera.png", "coins.png", "moon.png", "page.png", "text.png", "clock_motion.png")
LFW_FACES = 50
#: Grey levels of the noise floor (``deployopt.measure.accuracy``): fp32 against itself on crops
#: moved by this much, and each model's agreement on the crops whose fp32 top-1 it leaves alone.
NOISE_LEVELS = 1


def _training_images() -> list:
    """(name, PIL image) of every training picture (module docstring, step 2)."""
    import matplotlib
    import sklearn.datasets
    import skimage
    from PIL import Image

    pictures = []
    sk_images = pathlib.Path(sklearn.datasets.__file__).parent / "images"
    for name in ("china.jpg", "flower.jpg"):
        pictures.append((name, Image.open(sk_images / name).convert("RGB")))
    pictures.append(("grace_hopper.jpg", Image.open(pathlib.Path(matplotlib.get_data_path()) / "sample_data" /
                                                    "grace_hopper.jpg").convert("RGB")))
    sk_data = pathlib.Path(skimage.__file__).parent / "data"
    for name in SKIMAGE:
        pictures.append((name, Image.open(sk_data / name).convert("RGB")))
    return pictures


def _small_images() -> list:
    """CIFAR thumbnails of foolbox and lfw faces: used whole (upscaled by the preprocessing)."""
    import importlib.util

    from PIL import Image

    small = []
    spec = importlib.util.find_spec("foolbox")
    if spec is not None and spec.submodule_search_locations:
        folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "data"
        for path in sorted(folder.glob("cifar*.png")):
            small.append((path.name, Image.open(path).convert("RGB")))
    import skimage

    faces = np.load(pathlib.Path(skimage.__file__).parent / "data" / "lfw_subset.npy")[:LFW_FACES]
    for i, face in enumerate(faces):
        grey = (np.clip(face, 0, 1) * 255).astype(np.uint8)
        small.append((f"lfw_{i:03d}.png", Image.fromarray(grey).convert("RGB")))
    return small


def write_training_folder(folder: pathlib.Path, crops: int, early_stopping: pathlib.Path, seed: int = 0) -> int:
    """Random square crops (side 35-100% of the short side) of the large pictures, plus the
    small ones whole, as PNGs in ``folder``; the photo crops alternate between ``folder`` and
    ``early_stopping``. Returns how many training files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, image in _training_images():
        w, h = image.size
        for k in range(crops):
            side = int(min(w, h) * rng.uniform(0.35, 1.0))
            left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = image.crop((left, top, left + side, top + side)).resize((256, 256))
            crop.save(folder / f"{pathlib.Path(name).stem}_{k:03d}.png")
            count += 1
    for name, image in _small_images():
        image.resize((256, 256)).save(folder / name)
        count += 1
    early_stopping.mkdir(parents=True, exist_ok=True)
    for k, (name, image) in enumerate(_calibration_crops()):
        image.resize((256, 256)).save((early_stopping if k % 2 else folder) / name)
        count += 0 if k % 2 else 1
    return count


def write_calibration_folder(folder: pathlib.Path, training: pathlib.Path, seed: int = 0) -> None:
    """Links to the training folder's files, served photo crops first (the half of the 'photos'
    test split in training), then the rest in a seeded random order: a folder is read in file-name
    order, and channel_prune and quantize read its first samples."""
    files = sorted(training.iterdir())
    shuffled = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    photos = [f for f in files if f.name.startswith("photo_")]
    rest = [f for f in shuffled if not f.name.startswith("photo_")]
    folder.mkdir(parents=True, exist_ok=True)
    for rank, f in enumerate(photos + rest):
        os.link(f, folder / f"{rank:04d}_{f.name}")


def _calibration_crops() -> list:
    """The 'photos' test split (the demo's calibration crops) as (name, PIL image), cut by the
    dataset's own source so that they are exactly the crops the test split serves."""
    from PIL import Image

    from deployopt.core.data import open_dataset

    data = open_dataset({"dataset": "photos", "split": "test"})
    source = data._source  # benchmark code: the crop boxes are the source's, not re-derived here
    crops = []
    for i in data.indices:
        image = source._decode(source.paths[i], "RGB").crop(source.boxes[i])
        if source.flips[i]:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops.append((f"photo_{int(i):03d}.png", image))
    return crops


# -- one architecture --------------------------------------------------------------------------

def run_arch(arch: str, keeps: list[float], args, tmp: pathlib.Path, train_folder: pathlib.Path,
             stop_folder: pathlib.Path, calibration_folder: pathlib.Path) -> dict:
    from deployopt import models
    from deployopt.core import io
    from deployopt.core.data import open_dataset
    from deployopt.core.stats import model_stats
    from deployopt.measure.accuracy import evaluate
    from deployopt.measure.latency import compare
    from deployopt.models.export import export_model
    from deployopt.passes.channel_prune import ChannelPrunePass
    from deployopt.passes.context import PassContext
    from deployopt.passes.quantize import QuantizePass
    from deployopt.passes.recover import RecoverPass

    preset = PRESET[arch]
    fp32 = tmp / f"{arch}.onnx"
    export_model(models.build(arch, pretrained=True), fp32, SHAPE, dynamic_batch=True)
    # Shuffled: channel_prune and quantize read the first 256 samples, and a folder is served in
    # file-name order (the first 256 were all textures, and the pruned model fitted on them kept
    # 0% agreement on photos; shuffled: 46% at keep 0.75 before recovery).
    training = open_dataset({"dataset": f"folder:{train_folder}", "preprocess": preset, "shuffle": True},
                            input_shape=SHAPE)
    early_stopping = open_dataset({"dataset": f"folder:{stop_folder}", "preprocess": preset}, input_shape=SHAPE)
    calibration = (training if args.calibration == "training" else
                   open_dataset({"dataset": f"folder:{calibration_folder}", "preprocess": preset}, input_shape=SHAPE))
    fidelity = open_dataset({"dataset": "photos", "split": "train", "preprocess": preset}, input_shape=SHAPE)
    labelled = open_dataset({"dataset": "imagenet-samples", "preprocess": preset}, input_shape=SHAPE)
    reference = io.load(fp32)
    variants: dict[str, dict] = {"fp32": {"path": fp32, "keep": 1.0, "recover": False, "int8": False, "train_s": None}}

    def quantize(source: pathlib.Path, label: str, keep: float, recovered: bool, train_s) -> None:
        # int8 rows are int8: the latency columns say what it bought
        q = QuantizePass(latency_aware=False, equalize=args.equalize)
        q.context = PassContext(calibration=calibration, seed=0, work_dir=tmp, threads=args.threads)
        out = tmp / f"{label.replace(' ', '_')}.onnx"
        io.save(q(io.load(source)).model, out)
        variants[label] = {"path": out, "keep": keep, "recover": recovered, "int8": True, "train_s": train_s}

    def recover(step, source: pathlib.Path, label: str, keep: float, int8: bool, train_before: float = 0.0) -> None:
        """Run a RecoverPass on ``source`` against fp32; the result is the variant ``label``, its train s
        the step's time plus ``train_before`` (the steps that made ``source``)."""
        step.context = PassContext(training=training, evaluation=early_stopping, reference=reference, seed=0,
                                   work_dir=tmp, threads=args.threads)
        t0 = time.perf_counter()
        result = step(io.load(source))
        train_s = train_before + time.perf_counter() - t0
        print(f"{arch} {label}: " + "; ".join(result.notes), file=sys.stderr)
        if result.failure:
            print(f"{arch} {label}: recover failed: {result.failure}", file=sys.stderr)
        out = tmp / f"{label.replace(' ', '_')}.onnx"
        io.save(result.model, out)
        variants[label] = {"path": out, "keep": keep, "recover": True, "int8": int8, "train_s": train_s,
                           "details": result.details}

    quantize(fp32, "int8", 1.0, False, None)
    for keep in keeps:
        prune = ChannelPrunePass(keep=keep, scope=args.scope, criterion=args.criterion)
        prune.context = PassContext(calibration=calibration, seed=0, work_dir=tmp, threads=args.threads)
        pruned_result = prune(io.load(fp32))
        print(f"{arch} keep {keep} channel_prune: " + "; ".join(pruned_result.notes), file=sys.stderr)
        pruned = pruned_result.model
        pruned_path = tmp / f"keep{keep}.onnx"
        io.save(pruned, pruned_path)
        variants[f"keep {keep}"] = {"path": pruned_path, "keep": keep, "recover": False, "int8": False, "train_s": None}
        step = RecoverPass(max_epochs=args.epochs, max_seconds=args.max_seconds,
                           **({"lr": args.lr} if args.lr is not None else {}),
                           **({"views": args.views} if args.views is not None else {}),
                           fresh_views=args.fresh_views, features=args.features, feature_weight=args.feature_weight,
                           mixup=args.mixup, cutmix=args.cutmix)
        recover(step, pruned_path, f"keep {keep} + recover", keep, int8=False)
        recovered = variants[f"keep {keep} + recover"]
        quantize(pruned_path, f"keep {keep} + int8", keep, False, None)
        quantize(recovered["path"], f"keep {keep} + recover + int8", keep, True, recovered["train_s"])
        if args.bias_epochs:
            # the int8 graph's int32 biases fitted to fp32, every int8 weight and scale unchanged (the same kernels)
            biases = RecoverPass(trainable="biases", max_epochs=args.bias_epochs, max_seconds=args.max_seconds,
                                 **({"views": args.views} if args.views is not None else {}))
            recover(biases, variants[f"keep {keep} + recover + int8"]["path"], f"keep {keep} + recover + int8 + biases",
                    keep, int8=True, train_before=recovered["train_s"])

    for label, v in variants.items():
        fid = evaluate(v["path"], fidelity, reference_path=fp32, threads=args.threads, progress=False,
                       noise_floor=NOISE_LEVELS)
        top = evaluate(v["path"], labelled, threads=args.threads, progress=False)
        stats = model_stats(io.load_proto(v["path"]), path=str(v["path"]))
        floor = fid.get("noise_floor") or {}
        v.update({"agreement": fid["agreement"], "agreement_ci": fid["agreement_ci"], "kl": fid["kl"],
                  "floor": floor, "agreement_on_stable": floor.get("agreement_on_stable"),
                  "n": fid["n"], "top1": top["top1"], "top1_n": top["n"], "macs": stats["macs"],
                  "bytes": v["path"].stat().st_size})
    labels = list(variants)
    bench = compare([variants[k]["path"] for k in labels], labels=labels, threads=(1,), batch=(1,), warmup=5,
                    runs=args.runs, rounds=args.rounds, progress=False)
    for row in bench.rows:
        v = variants[row["model"]]
        v["p50_ms"], v["speedup"], v["speedup_ci"], v["error"] = (row["p50_ms"], row["speedup"],
                                                                  row["speedup_ci"], row["error"])
    warnings = list(bench.warnings)
    if args.openvino:  # the same files on OpenVINO's CPU plugin, its speedups against its own fp32
        ov = compare([variants[k]["path"] for k in labels], labels=labels, threads=(1,), batch=(1,), warmup=5,
                     runs=args.runs, rounds=args.rounds, progress=False, runtime="openvino")
        for row in ov.rows:
            variants[row["model"]]["openvino"] = None if row["error"] else row["speedup"]
        warnings += [f"OpenVINO: {w}" for w in ov.warnings]
    return {"variants": variants, "warnings": warnings, "train_images": len(training),
            "stop_images": len(early_stopping)}


# -- output --------------------------------------------------------------------------------------

def markdown(results: dict, command: str, stamp: str, args, png: str | None) -> str:
    lines = ["# recover: channel_prune, then fine-tune against the unpruned model", "",
             f"Command: `{command}`", "", f"Machine: {stamp}", "",
             "Ratio = p50(model) / p50(fp32) at 1 thread, batch 1 (worker processes, interleaved rounds); "
             "speedup = its inverse with a bootstrap 95% interval"
             + ("; OpenVINO speedup: the same files on OpenVINO's CPU plugin against its own fp32" if args.openvino
                else "") + ". Agreement (Wilson 95% interval) and "
             "KL(fp32 || model) on the 440 held-out 'photos' crops; top-1 on the 20 labelled ImageNet samples. "
             f"channel_prune and quantize calibrate on {CALIBRATION_TEXT[args.calibration]}"
             + ("; quantize with equalize: true" if args.equalize else "") + ". "
             f"channel_prune: scope {args.scope}, criterion {args.criterion}, its other settings its defaults. "
             f"recover: {args.epochs} epoch(s) at most, max_seconds {args.max_seconds:g}"
             + (f", lr {args.lr:g}" if args.lr is not None else "")
             + (f", views {args.views}" if args.views is not None else "")
             + (", fresh_views" if args.fresh_views else "")
             + (f", mixup {args.mixup:g}" if args.mixup else "") + (f", cutmix {args.cutmix:g}" if args.cutmix else "")
             + (f", features {args.features}, feature_weight {args.feature_weight:g}" if args.features else "")
             + ", other settings its defaults; train s is the whole recover step (view bank, teacher labels, "
             "training, checks)"
             + (f"; '+ biases': then recover with trainable: biases on the int8 model, {args.bias_epochs} epoch(s) "
                "at most, its views as above, its other settings its defaults (train s: both steps)"
                if args.bias_epochs else "") + ".", ""]
    for arch, res in results.items():
        ov = args.openvino
        lines += [f"## {arch} ({res['train_images']} training images, {res['stop_images']} early-stopping crops)", "",
                  "| model | p50 ms | ratio | speedup [95% CI] | " + ("OpenVINO speedup | " if ov else "")
                  + "MACs | MB | agreement [95% CI] | on stable crops | KL | top-1 | train s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ov else "")]
        for label, v in res["variants"].items():
            if v.get("error"):
                lines.append(f"| {label} | error: {v['error']} | | | | | | | | | |" + (" |" if ov else ""))
                continue
            ov_cell = ("error | " if v.get("openvino") is None else f"{v['openvino']:.2f}x | ") if ov else ""
            ci = v["speedup_ci"] or (float("nan"), float("nan"))
            aci = v["agreement_ci"] or (float("nan"), float("nan"))
            ratio = 1 / v["speedup"] if v["speedup"] else float("nan")
            lines.append(
                f"| {label} | {v['p50_ms']:.2f} | {ratio:.3f} | {v['speedup']:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}] | "
                f"{ov_cell}"
                f"{v['macs'] / 1e6:.0f} M | {v['bytes'] / 1e6:.2f} | "
                f"{v['agreement']:.3f} [{aci[0]:.3f}, {aci[1]:.3f}] | "
                f"{_rate_cell(v['agreement_on_stable'])} | {v['kl']:.3f} | {v['top1']:.2f} | "
                f"{'' if v['train_s'] is None else round(v['train_s'])} |")
        for label, v in res["variants"].items():
            d = v.get("details")
            if d:
                lines.append("")
                fresh = f" (+{d['fresh_banks']} fresh banks)" if d.get("fresh_banks") else ""
                lines.append(f"- {label}: {d.get('samples')} samples x {d.get('views')} views{fresh}, "
                             f"{d.get('epochs_run')} epoch(s), best epoch {d.get('best_epoch')}, held-out agreement "
                             f"{d.get('agreement_before', float('nan')):.3f} -> "
                             f"{d.get('agreement_after', float('nan')):.3f}, "
                             f"training {d.get('train_seconds', 0):.0f} s, peak RSS {d.get('peak_rss_mb')} MB, "
                             + (f"onnxruntime vs torch max |diff| {d['max_abs_diff']:.1e}" if "max_abs_diff" in d
                                else f"onnxruntime vs torch relative RMS {d['relative_rms_diff']:.1e}"
                                if "relative_rms_diff" in d
                                else "no epoch beat the model as given: its weights kept, nothing written back"))
        floor = res["variants"]["fp32"].get("floor") or {}
        if floor.get("agreement") is not None:
            fci = floor["agreement_ci"]
            lines += ["", f"Noise floor: fp32 against itself on the same crops moved by {NOISE_LEVELS} grey level "
                      f"(uniform integer noise per pixel) agrees on {floor['agreement']:.1%} [{fci[0]:.1%}, "
                      f"{fci[1]:.1%}]: the rest are near ties a JPEG re-encode would flip. 'on stable crops' is "
                      f"each model's agreement on the {floor['stable']} crops whose fp32 top-1 that noise leaves "
                      f"unchanged."]
        if res["warnings"]:
            lines += ["", "Harness warnings: " + "; ".join(res["warnings"])]
        lines.append("")
    for goal, suffix in itertools.product(TARGETS, ("", " + biases")):
        variants = results.get(goal["arch"], {}).get("variants", {})
        target = variants.get(f"keep {goal['keep']} + recover + int8{suffix}")
        if not target or target.get("error"):
            continue
        if goal["speedup"] == "int8":  # strictly faster than int8 alone
            floor, aim = variants["int8"]["speedup"], "faster than int8 alone"
            slow = f"speed {target['speedup']:.2f}x <= int8 alone's {floor:.2f}x"
        else:  # at least this speedup over fp32
            floor, aim = goal["speedup"] * (1 - 1e-9), f"at least {goal['speedup']:g}x faster than fp32"
            slow = f"speed {target['speedup']:.2f}x < {goal['speedup']:g}x"
        missed = ([slow] if target["speedup"] <= floor else []) + (
                 [f"agreement {target['agreement']:.1%} < {goal['agreement']:.0%}"]
                 if target["agreement"] < goal["agreement"] else [])
        openvino = f" (OpenVINO {target['openvino']:.2f}x)" if target.get("openvino") else ""
        lines += [f"Target: {goal['arch']} keep {goal['keep']} + recover + int8{suffix} {aim} with >= "
                  f"{goal['agreement']:.0%} agreement: measured {target['speedup']:.2f}x{openvino} and "
                  f"{target['agreement']:.1%}: " + (f"MISSED ({'; '.join(missed)})." if missed else "met."), ""]
    if png:
        lines += [f"![latency ratio vs agreement]({png})", ""]
    return "\n".join(lines)


def _rate_cell(value) -> str:
    """A rate with three decimals for a table cell; blank when it was not measured."""
    return "" if value is None else f"{value:.3f}"


def pareto_png(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arch, res in results.items():
        for label, v in res["variants"].items():
            if v.get("error") or not v["speedup"]:
                continue
            marker = "s" if v["int8"] else "o"
            colour = "tab:green" if v["recover"] else ("tab:blue" if label in ("fp32", "int8") else "tab:red")
            ax.scatter(1 / v["speedup"], v["agreement"], marker=marker, color=colour)
            ax.annotate(f"{arch} {label}", (1 / v["speedup"], v["agreement"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("latency ratio to fp32 (1 thread, batch 1; lower is faster)")
    ax.set_ylabel("top-1 agreement with fp32 (440 held-out crops)")
    ax.set_title("channel_prune / recover / int8 (green: recovered, squares: int8)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MobileNetV2 keep 0.75 only")
    parser.add_argument("--models", default="mobilenet_v2,efficientnet_lite0")
    parser.add_argument("--keeps", default="0.9,0.75,0.5")
    parser.add_argument("--scope", default="sensitivity", choices=("layer", "global", "sensitivity"),
                        help="channel_prune's scope (sensitivity: the MACs of layer, spent where damage is least)")
    parser.add_argument("--criterion", default="l1", choices=("l1", "l2", "activation"),
                        help="channel_prune's channel ranking")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--lr", type=float, default=None, help="recover's peak learning rate (default: the pass's)")
    parser.add_argument("--views", type=int, default=None,
                        help="recover's copies per training image (default: the pass's)")
    parser.add_argument("--fresh-views", action="store_true", help="recover draws a new view bank every epoch")
    parser.add_argument("--features", type=lambda text: [f for f in text.split(",") if f], default=[],
                        help="recover's matched tensors, comma-separated ('penultimate': the map the head pools)")
    parser.add_argument("--feature-weight", type=float, default=1.0, help="recover's feature_weight")
    parser.add_argument("--mixup", type=float, default=0.0, help="recover's mixup (Beta parameter; 0: off)")
    parser.add_argument("--cutmix", type=float, default=0.0, help="recover's cutmix (Beta parameter; 0: off)")
    parser.add_argument("--bias-epochs", type=int, default=0,
                        help="then recover the int8 model's biases alone (trainable: biases) for this many epochs")
    parser.add_argument("--equalize", action="store_true", help="quantize with equalize: true")
    parser.add_argument("--calibration", choices=("photos", "training"), default="photos",
                        help="what channel_prune and quantize calibrate on (module doc, step 2)")
    parser.add_argument("--crops", type=int, default=24, help="random crops per large training picture")
    parser.add_argument("--threads", type=int, default=2, help="threads for training and the teacher")
    parser.add_argument("--no-openvino", dest="openvino", action="store_false",
                        help="skip the OpenVINO latency column")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "recover.md")
    args = parser.parse_args(argv)
    archs = args.models.split(",")
    keeps = [float(k) for k in args.keeps.split(",")]
    if args.quick:
        archs, keeps = ["mobilenet_v2"], [0.75]
    command = "python -m benchmarks.run_recover " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results = {}
    with tempfile.TemporaryDirectory(prefix="run_recover-") as folder:
        tmp = pathlib.Path(folder)
        train_folder = tmp / "training"
        stop_folder = tmp / "early_stopping"
        count = write_training_folder(train_folder, args.crops, stop_folder)
        calibration_folder = tmp / "calibration"
        write_calibration_folder(calibration_folder, train_folder)
        print(f"{count} training images in {train_folder}", file=sys.stderr)
        for arch in archs:
            results[arch] = run_arch(arch, keeps, args, tmp, train_folder, stop_folder, calibration_folder)
    png = args.out.with_suffix(".png")
    pareto_png(results, png)
    text = markdown(results, command.strip(), machine.stamp_line(machine.stamp()), args, png.name)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
