"""Published numbers against the peer int8 tools: onnxruntime's ``quantize_static`` (its defaults and
the U8S8 per-channel setting), NNCF and deployopt, on onnxruntime and OpenVINO, in one run.

    .venv/bin/python -m benchmarks.run_peers [--quick] [--runs 40] [--rounds 6]
        [--work runs/peers] [--fresh] [--out benchmarks/results/peers.md]

Per model (EfficientNet-Lite0 with the demo's export spec and MobileNetV2, both with real ImageNet
weights; ResNet-18 for speed only: no real ResNet-18 weights install offline, and agreement of a
random-init network says nothing, so its fidelity is not measured), every entry below, in ONE
``deployopt.measure.latency.compare`` run (one worker process per entry, interleaved rounds, a
(runtime, ep) target per entry), 1 intra-op thread, batch 1:

1. fp32 on onnxruntime: the reference every ratio divides (ratio = p50(reference) / p50(entry),
   bootstrap 95% interval over the paired rounds); fp32 on OpenVINO beside it.
2. ``quantize_static(fp32, out, reader)`` with every other argument at its default (QDQ, int8
   activations and weights, per-tensor, MinMax).
3. ``quantize_static`` U8S8 per-channel: QDQ, uint8 activations, int8 weights, ``per_channel``,
   ``reduce_range`` as deployopt chooses for this CPU (``auto_reduce_range``).
4. ``nncf.quantize`` on the ONNX model (default preset, ``subset_size`` = the calibration set), and
   its slower variant ``fast_bias_correction=False``; run on onnxruntime and on OpenVINO.
5. ``deployopt.optimize`` with the demo's passes (cleanup, quantize with ``calibration: auto``); run on both runtimes.
   Its latency-aware search times on the recipe's target, onnxruntime; a second build adds
   ``tune_ranges: true``, a third with ``benchmark.runtime: openvino`` decides on OpenVINO
   and is run there, and a fourth adds the accuracy fallback judged by KL: ``metrics:
   classification:score=kl`` and ``max_accuracy_drop: MAX_KL`` on the calibration crops
   (data.evaluation = data.calibration, so no fidelity crop is ever judged); run on both runtimes.

Every quantizer calibrates on the same samples: the demo's calibration set (the 'photos' test
split, 110 crops). Fidelity (``deployopt.evaluate`` with the fp32 model as reference, both run on
the entry's runtime): top-1 agreement with fp32 (Wilson 95% interval) and KL(fp32 || entry) on

* the demo's held-out crops: the 'photos' train split (440 crops of the same 25 photos as the
  calibration crops, different crops);
* unseen photos: the same 22 crop variants of 6 colour/grey photos that are in no built-in
  dataset (scikit-learn's china/flower, matplotlib's grace_hopper, scikit-image's camera,
  coins and hubble_deep_field), 132 crops written under the work folder.

The noise floor: the same fidelity for the fp32 model whose input is moved by at most one grey level
per pixel (uniform integer noise in {-1, 0, 1} before normalization; less than a JPEG re-encode). A
crop is noise-unstable when any of 8 such draws changes the fp32 top-1. Per entry, the table "where
the disagreements are" counts how many of its disagreements fall on those crops and its agreement
on the stable ones: a quantizer cannot be judged on a top-1 that one grey level already flips.

Each entry also has its top-1 on foolbox's 20 labelled ImageNet photos (``imagenet-samples``) and
the wall time its quantizer took to make the file (kept beside the model as ``.seconds``).

Resumable: quantized models and every measurement are kept under ``--work``; a rerun reuses them
(``--fresh`` measures again). ``--quick`` takes fewer runs and samples, keeps its results apart and
writes ``<work>/peers-quick.md`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import deployopt  # noqa: E402
from deployopt.core.data import open_dataset  # noqa: E402
from deployopt.core.errors import one_line  # noqa: E402
from deployopt.measure import machine  # noqa: E402
from deployopt.measure.latency import compare  # noqa: E402
from deployopt.measure.metrics import wilson_interval  # noqa: E402
from deployopt.passes.quantize.cpu import auto_reduce_range  # noqa: E402

SHAPE = (1, 3, 224, 224)
ARCHS = ("efficientnet_lite0", "mobilenet_v2", "resnet18")
#: Models with real ImageNet weights: the only ones whose fidelity means anything.
REAL_WEIGHTS = ("efficientnet_lite0", "mobilenet_v2")
PREPROCESS = {"efficientnet_lite0": "efficientnet-lite", "mobilenet_v2": "imagenet", "resnet18": "imagenet"}
CALIBRATION = {"dataset": "photos", "split": "test"}
HELD_OUT = {"dataset": "photos", "split": "train"}
LABELLED = {"dataset": "imagenet-samples"}  # foolbox's 20 labelled ImageNet photos
ORT, OV = ("onnxruntime", None), ("openvino", None)
#: Convolutions in an onnxruntime-optimized graph, int8 or float.
CONV_OPS = ("QLinearConv", "Conv", "FusedConv", "NhwcFusedConv", "NhwcConv")
#: max_accuracy_drop of the "deployopt, KL fallback" entry on exp(-KL) against fp32 (a mean KL of about that)
MAX_KL = 0.002
#: (entry, quantizer, target); the quantizer names the model file the entry runs.
ENTRIES = (("fp32", "fp32", ORT), ("fp32", "fp32", OV),
           ("ort quantize_static defaults", "ort-default", ORT),
           ("ort quantize_static U8S8 per-channel", "ort-u8s8", ORT),
           ("nncf", "nncf", ORT), ("nncf fast_bias_correction=False", "nncf-fbc", ORT),
           ("deployopt", "deployopt", ORT), ("deployopt, tune_ranges", "deployopt-tuned", ORT),
           (f"deployopt, KL fallback {MAX_KL:g}", "deployopt-kl", ORT),
           ("nncf", "nncf", OV), ("nncf fast_bias_correction=False", "nncf-fbc", OV),
           ("deployopt", "deployopt", OV), ("deployopt, tune_ranges", "deployopt-tuned", OV),
           (f"deployopt, KL fallback {MAX_KL:g}", "deployopt-kl", OV),
           ("deployopt, target openvino", "deployopt-ov", OV))
#: deployopt's builds and the runtime each one's latency-aware search times on
DEPLOYOPT_BUILDS = {"deployopt": "onnxruntime", "deployopt-tuned": "onnxruntime", "deployopt-kl": "onnxruntime",
                    "deployopt-ov": "openvino"}
NOISE_GREY = 1  # grey levels the noise floor moves each input pixel by, at most
NOISE_DRAWS = 8  # noisy copies per crop that decide whether its fp32 top-1 is stable
# Colour or grey photos shipped with installed packages and in no built-in dataset: (package, path).
UNSEEN_PHOTOS = (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
                 ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"), ("skimage", "data/camera.png"),
                 ("skimage", "data/coins.png"), ("skimage", "data/hubble_deep_field.jpg"))
# The 'photos' dataset's crop variants (scale of the short side, position, mirrored): the centre
# square and its mirror, then 75% and 50% squares at the centre and the four corners.
_CORNERS = ("center", "top-left", "top-right", "bottom-left", "bottom-right")
CROP_VARIANTS = [(1.0, "center", False), (1.0, "center", True)] + [
    (s, pos, flip) for s in (0.75, 0.5) for flip in (False, True) for pos in _CORNERS]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- models -------------------------------------------------------------------------------------

def fp32_model(arch: str, folder: pathlib.Path) -> pathlib.Path:
    """``folder/ARCH.onnx``, the fp32 export (made once; run_runtimes uses it too): real weights for
    ``REAL_WEIGHTS``, a seeded random init otherwise."""
    path = folder / f"{arch}.onnx"
    if not path.exists():
        if arch == "mobilenet_v2":
            from benchmarks.task_models import build_mobilenet_v2

            build_mobilenet_v2(folder)
        elif arch not in REAL_WEIGHTS:
            deployopt.export(arch, path, input_shape=list(SHAPE), seed=0)
        else:
            deployopt.export(arch, path, input_shape=list(SHAPE), pretrained=True)
    return path


def calibration_samples(arch: str) -> list[np.ndarray]:
    data = open_dataset({**CALIBRATION, "preprocess": PREPROCESS[arch]}, input_shape=SHAPE)
    return [x[i:i + 1] for x, _ in data.batches(16) for i in range(len(x))]


def ort_quantize(fp32: pathlib.Path, out: pathlib.Path, samples: list[np.ndarray], **options) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{name: x} for x in samples])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(fp32), str(out), Reader(), **options)


def _nncf_quantize(fp32: pathlib.Path, out: pathlib.Path, samples: list[np.ndarray], **options) -> None:
    import nncf
    import onnx

    model = onnx.load(str(fp32))
    name = model.graph.input[0].name
    dataset = nncf.Dataset(samples, lambda x: {name: x})
    onnx.save(nncf.quantize(model, dataset, subset_size=len(samples), **options), str(out))


def deployopt_int8(arch: str, fp32: pathlib.Path, out: pathlib.Path, runtime: str = "onnxruntime",
                   max_kl: float | None = None, **quantize: object) -> None:
    """The demo's passes on the demo's calibration data, no benchmark, saved as ``out``; the
    latency-aware search decides on ``runtime``; ``quantize`` adds settings to the quantize pass.
    ``max_kl``: the accuracy fallback holds exp(-KL) against fp32 on the calibration crops within
    that drop (``metrics: classification:score=kl``, ``max_accuracy_drop``): no held-out crop is judged."""
    import shutil

    data = {**CALIBRATION, "preprocess": PREPROCESS[arch]}
    settings = {"calibration": "auto", **quantize}
    recipe = {"model": str(fp32), "data": {"calibration": data},
              "passes": [{"cleanup": {}}, {"quantize": settings}],
              "benchmark": {"enabled": False, "runtime": runtime}}
    if max_kl is not None:
        recipe["data"]["evaluation"] = data
        recipe["metrics"] = "classification:score=kl"
        settings["max_accuracy_drop"] = max_kl
    folder = out.with_suffix("")
    deployopt.optimize(recipe, folder)
    shutil.copyfile(folder / "model.onnx", out)


def build_seconds(path: pathlib.Path) -> float | None:
    """Wall time the quantizer took to make ``path`` (kept beside it when it was built)."""
    kept = path.with_suffix(".seconds")
    return float(kept.read_text(encoding="utf-8")) if kept.exists() else None


def build_models(arch: str, folder: pathlib.Path) -> tuple[dict[str, pathlib.Path], dict[str, str]]:
    """{quantizer: model path} (cached in ``folder``) and {quantizer: one-line error} for those that failed."""
    from onnxruntime.quantization import QuantFormat, QuantType

    folder.mkdir(parents=True, exist_ok=True)
    fp32 = fp32_model(arch, folder)
    reduce_range, _ = auto_reduce_range()
    samples = calibration_samples(arch)
    makers = {
        "ort-default": lambda out: ort_quantize(fp32, out, samples),
        "ort-u8s8": lambda out: ort_quantize(fp32, out, samples, quant_format=QuantFormat.QDQ,
                                             activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                             per_channel=True, reduce_range=reduce_range),
        "nncf": lambda out: _nncf_quantize(fp32, out, samples),
        "nncf-fbc": lambda out: _nncf_quantize(fp32, out, samples, fast_bias_correction=False),
        "deployopt": lambda out: deployopt_int8(arch, fp32, out),
        "deployopt-ov": lambda out: deployopt_int8(arch, fp32, out, runtime="openvino"),
        "deployopt-tuned": lambda out: deployopt_int8(arch, fp32, out, tune_ranges=True),
        "deployopt-kl": lambda out: deployopt_int8(arch, fp32, out, max_kl=MAX_KL),
    }
    paths, errors = {"fp32": fp32}, {}
    for name, make in makers.items():
        out = folder / f"{arch}-{name}.onnx"
        error_file = out.with_suffix(".error")
        if not out.exists() and not error_file.exists():
            log(f"{arch}: quantizing with {name} on {len(samples)} calibration samples")
            start = time.perf_counter()
            try:
                make(out)
                seconds = time.perf_counter() - start
                out.with_suffix(".seconds").write_text(f"{seconds:.1f}\n", encoding="utf-8")
                log(f"{arch}: {name} done in {seconds:.0f} s")
            except Exception as e:  # a peer tool failing is a result of the comparison
                error_file.write_text(one_line(e, with_type=True), encoding="utf-8")
                out.unlink(missing_ok=True)
        if out.exists():
            paths[name] = out
        else:
            errors[name] = error_file.read_text(encoding="utf-8")
            log(f"{arch}: {name} FAILED: {errors[name]}")
    return paths, errors


# -- data ---------------------------------------------------------------------------------------

def unseen_photo_folder(folder: pathlib.Path) -> pathlib.Path:
    """The crops of ``UNSEEN_PHOTOS`` as PNG files in ``folder`` (written once)."""
    import importlib

    from PIL import Image

    if folder.is_dir() and len(list(folder.glob("*.png"))) == len(UNSEEN_PHOTOS) * len(CROP_VARIANTS):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for package, relative in UNSEEN_PHOTOS:
        source = pathlib.Path(importlib.import_module(package).__file__).parent / relative
        with Image.open(source) as im:
            image = im.convert("RGB")
        w, h = image.size
        for k, (scale, position, flip) in enumerate(CROP_VARIANTS):
            side = round(scale * min(w, h))
            left = {"center": (w - side) // 2, "top-left": 0, "bottom-left": 0}.get(position, w - side)
            top = {"center": (h - side) // 2, "top-left": 0, "top-right": 0}.get(position, h - side)
            crop = image.crop((left, top, left + side, top + side))
            if flip:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(folder / f"{pathlib.Path(relative).stem}-{k:02d}.png")
    return folder


# -- measurements -------------------------------------------------------------------------------

class Store:
    """Measurements kept as JSON in one file, so an interrupted run resumes where it stopped."""

    def __init__(self, path: pathlib.Path, fresh: bool):
        self.path = path
        self.data = {} if fresh or not path.exists() else json.loads(path.read_text(encoding="utf-8"))

    def get(self, key: str, compute):
        if key not in self.data:
            self.data[key] = compute()
            self.path.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        return self.data[key]


def _latency(arch: str, paths: dict, runs: int, rounds: int) -> dict:
    entries = [(f"{label} [{target[0]}]", paths[quantizer], target) for label, quantizer, target in ENTRIES
               if quantizer in paths]
    log(f"{arch}: latency of {len(entries)} entries, {rounds} interleaved rounds of {runs} runs")
    result = compare([p for _, p, _ in entries], labels=[e[0] for e in entries], targets=[t for _, _, t in entries],
                     threads=(1,), batch=(1,), runs=runs, rounds=rounds, warmup=10, progress=False)
    return result.to_dict()


def _labelled_top1(path: pathlib.Path, arch: str, runtime: str) -> dict:
    """Top-1 on the labelled ImageNet photos (``LABELLED``) on ``runtime``."""
    try:
        result = deployopt.evaluate(path, {**LABELLED, "preprocess": PREPROCESS[arch]}, runtime=runtime, threads=1)
    except Exception as e:  # a model a runtime cannot run is a result of the comparison
        return {"error": one_line(e, with_type=True)}
    return {"n": result.n, "top1": result.top1}


def fidelity_against(path: pathlib.Path, fp32: pathlib.Path, data, runtime: str) -> dict:
    try:
        result = deployopt.evaluate(path, data, reference=fp32, runtime=runtime, threads=1)
    except Exception as e:  # a model a runtime cannot run is a result of the comparison
        return {"error": one_line(e, with_type=True)}
    return {"n": result.n, "agreement": result.agreement, "agreement_ci": result.agreement_ci, "kl": result.kl}


def int8_convs(path: pathlib.Path, folder: pathlib.Path) -> list[int]:
    """[convolutions that run as QLinearConv, all convolutions] in onnxruntime's optimized graph:
    a Conv onnxruntime cannot fuse with its Q/DQ runs in float between them."""
    import onnx

    from deployopt.core.session import open_session

    optimized = folder / f"{path.stem}.ort-optimized.onnx"
    open_session(path, threads=1, optimized_path=optimized, what=str(path))
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    optimized.unlink()
    return [ops.count("QLinearConv"), sum(op in CONV_OPS for op in ops)]


def crops(arch: str, spec: dict) -> np.ndarray:
    """The preprocessed crops of a fidelity set, [N, 3, 224, 224]."""
    data = open_dataset({**spec, "preprocess": PREPROCESS[arch]}, input_shape=SHAPE)
    return np.concatenate([x for x, _ in data.batches(16)])


def logits(path: pathlib.Path, runtime: str, xs: np.ndarray) -> np.ndarray:
    """The model's output for each crop, batch 1, on ``runtime``."""
    from deployopt.measure.runtime import open_runtime

    model = open_runtime(path, runtime, threads=1)
    return np.concatenate([model.run(None, {model.inputs[0]: xs[i:i + 1]})[0] for i in range(len(xs))])


def noise_floor(arch: str, fp32: pathlib.Path, xs: np.ndarray) -> dict:
    """Fidelity of fp32 on inputs moved by at most ``NOISE_GREY`` grey levels (the first draw) and,
    per crop, whether any of ``NOISE_DRAWS`` draws changes its fp32 top-1 (module doc)."""
    from deployopt.measure.metrics import fidelity

    from deployopt.core.data.preprocess import Preprocess

    step = Preprocess.from_spec(PREPROCESS[arch]).unit_step()  # one grey level in input units
    rng = np.random.default_rng(0)
    clean = logits(fp32, "onnxruntime", xs)
    flipped = np.zeros(len(xs), bool)
    first = None
    for _ in range(NOISE_DRAWS):
        noise = rng.integers(-NOISE_GREY, NOISE_GREY + 1, size=xs.shape).astype(np.float32) * step
        noisy = logits(fp32, "onnxruntime", (xs + noise).astype(np.float32))
        first = noisy if first is None else first
        flipped |= noisy.argmax(axis=1) != clean.argmax(axis=1)
    return {**fidelity(first, clean), "n": len(xs), "unstable": flipped.tolist(),
            "top1": clean.argmax(axis=1).tolist()}


def measure(arch: str, paths: dict, store: Store, *, runs: int, rounds: int, datasets: dict,
            folder: pathlib.Path) -> dict:
    latency = store.get(f"{arch}/latency", lambda: _latency(arch, paths, runs, rounds))
    convs = {q: store.get(f"{arch}/{q}/int8-convs", lambda: int8_convs(p, folder))
             for q, p in paths.items() if q != "fp32"}
    fidelity, floor, top1 = {}, {}, {}
    if arch in REAL_WEIGHTS:  # agreement of a random-init network says nothing
        for name, spec in datasets.items():
            xs = None
            if f"{arch}/noise/{name}" not in store.data:
                log(f"{arch}: noise floor on {name}")
                xs = crops(arch, spec)
            floor[name] = store.get(f"{arch}/noise/{name}", lambda: noise_floor(arch, paths["fp32"], xs))
        for label, quantizer, (runtime, _) in ENTRIES:
            if quantizer not in paths:
                continue
            key = f"{arch}/{quantizer}/{runtime}/labelled"
            fidelity[key] = store.get(key, lambda: _labelled_top1(paths[quantizer], arch, runtime))
            if quantizer == "fp32":
                continue
            for name, spec in datasets.items():
                key = f"{arch}/{quantizer}/{runtime}/{name}"
                if key not in store.data:
                    log(f"{arch}: fidelity of {label} on {runtime}, {name}")
                data = {**spec, "preprocess": PREPROCESS[arch]}
                fidelity[key] = store.get(key, lambda: fidelity_against(paths[quantizer], paths["fp32"], data, runtime))
                top1[key] = store.get(key + "/top1", lambda: logits(paths[quantizer], runtime,
                                                                    crops(arch, spec)).argmax(axis=1).tolist())
    return {"latency": latency, "fidelity": fidelity, "noise_floor": floor, "top1": top1, "int8_convs": convs,
            "deployopt_float": {q: deployopt_float(paths[q]) for q in DEPLOYOPT_BUILDS if q in paths},
            "range_tuning": range_tuning_record(paths["deployopt-tuned"]) if "deployopt-tuned" in paths else None}


def deployopt_float(model: pathlib.Path) -> dict[str, int]:
    """How many nodes deployopt's quantize left in float, from the run's report.json: {latency: nodes
    its latency-aware search returned to float, latency_convs: the convolutions among them, fallback:
    nodes its accuracy fallback returned to float, other}."""
    report = json.loads((model.with_suffix("") / "report.json").read_text(encoding="utf-8"))
    counts = {"latency": 0, "latency_convs": 0, "fallback": 0, "other": 0}
    for step in report.get("steps", []):
        for node in (step.get("details") or {}).get("float_nodes", []):
            kind = next((k for k in ("latency", "fallback") if node["reason"].startswith(k)), "other")
            counts[kind] += 1
            counts["latency_convs"] += kind == "latency" and node["op_type"] == "Conv"
    return counts


def range_tuning_record(model: pathlib.Path) -> dict | None:
    """The quantize step's ``range_tuning`` record of the run that made ``model`` (report.json)."""
    report = json.loads((model.with_suffix("") / "report.json").read_text(encoding="utf-8"))
    return next((step["details"]["range_tuning"] for step in report.get("steps", [])
                 if "range_tuning" in (step.get("details") or {})), None)


# -- report -------------------------------------------------------------------------------------

def _entry_rows(arch: str, measured: dict, errors: dict) -> list[dict]:
    """One dict per entry of ENTRIES: label, quantizer, runtime, latency row (or None), fidelity per set."""
    rows = {r["model"]: r for r in measured["latency"]["rows"]}
    out = []
    for label, quantizer, (runtime, _) in ENTRIES:
        row = None if quantizer in errors else rows.get(f"{label} [{runtime}]")
        fid = {name: measured["fidelity"].get(f"{arch}/{quantizer}/{runtime}/{name}")
               for name in ("held-out", "unseen", "labelled")}
        out.append({"label": label, "quantizer": quantizer, "runtime": runtime, "row": row, "fidelity": fid})
    return out


def _speed(entry: dict) -> str:
    row = entry["row"]
    return f"{row['speedup']:.2f}x [{row['speedup_ci'][0]:.2f}, {row['speedup_ci'][1]:.2f}]"


def findings(per_arch: dict, errors: dict) -> list[str]:
    """Where deployopt wins and loses, from the measured numbers."""
    lines = []
    for arch, measured in per_arch.items():
        entries = [e for e in _entry_rows(arch, measured, errors[arch]) if e["quantizer"] != "fp32"
                   and e["row"] is not None and not e["row"].get("error")]
        parts = []
        for runtime in ("onnxruntime", "openvino"):
            on = [e for e in entries if e["runtime"] == runtime]
            if not on:
                continue
            best = max(on, key=lambda e: e["row"]["speedup"])
            ours = [e for e in on if e["quantizer"].startswith("deployopt") and e is not best]
            text = f"on {runtime} the fastest int8 is {best['label']} at {_speed(best)}"
            if ours and not best["quantizer"].startswith("deployopt"):
                text += "; " + ", ".join(
                    f"{e['label']} {_speed(e)}" + (" (the intervals overlap: a tie at this noise)"
                                                   if e["row"]["speedup_ci"][1] >= best["row"]["speedup_ci"][0] else "")
                    for e in ours)
            parts.append(text)
        faithful = [e for e in entries if all(e["fidelity"][n] and "kl" in e["fidelity"][n] for n in ("held-out", "unseen"))]
        peers = [e for e in faithful if not e["quantizer"].startswith("deployopt")]
        ours = [e for e in faithful if e["quantizer"].startswith("deployopt")]
        if faithful:
            best = min(faithful, key=lambda e: e["fidelity"]["unseen"]["kl"])
            text = (f"lowest KL on unseen photos: {best['label']} on {best['runtime']} "
                    f"({best['fidelity']['unseen']['kl']:.4f}, agreement {best['fidelity']['unseen']['agreement']:.1%})")
            if peers and ours:
                peer = min(peers, key=lambda e: e["fidelity"]["unseen"]["kl"])
                mine = min(ours, key=lambda e: e["fidelity"]["unseen"]["kl"])
                ratio = peer["fidelity"]["unseen"]["kl"] / max(mine["fidelity"]["unseen"]["kl"], 1e-12)
                text += (f"; best peer {peer['label']} on {peer['runtime']} {peer['fidelity']['unseen']['kl']:.4f} "
                         f"(agreement {peer['fidelity']['unseen']['agreement']:.1%}) vs deployopt "
                         f"{mine['fidelity']['unseen']['kl']:.4f}: the peer's KL is {ratio:.1f}x deployopt's")
            parts.append(text)
        lines.append(f"- **{arch}**: " + "; ".join(parts) + ".")
        tuning = measured.get("range_tuning")
        if tuning:
            kept, held = tuning.get("kept", "tuned"), tuning.get("held_out")
            lines.append(
                f"- **{arch}, tune_ranges**: {tuning['units_searched']} of {tuning['units']} activation ranges searched "
                f"in {tuning['seconds']:.0f} s, {tuning['ranges_moved']} moved; output SQNR on {tuning['samples']} "
                f"calibration crops {tuning['output_sqnr_db_before']} dB calibrated, "
                f"{tuning.get('output_sqnr_db_requantized', tuning['output_sqnr_db_after'])} dB re-quantized from the "
                "tuned ranges" + (f", {held['output_sqnr_db_calibrated']} -> {held['output_sqnr_db_tuned']} dB on the "
                                  f"{held['samples']} calibration crops not searched" if isinstance(held, dict) else "")
                + ": " + ("the tuned ranges are kept." if kept == "tuned" else
                                    "the calibrated ranges are kept, so this entry differs from `deployopt` only where "
                                    "its own latency-aware search placed float nodes."))
        floor = measured.get("noise_floor", {}).get("held-out")
        ours_ort = next((e for e in faithful if e["quantizer"] == "deployopt" and e["runtime"] == "onnxruntime"), None)
        if floor and ours_ort:
            mine = ours_ort["fidelity"]["held-out"]
            lines.append(f"- **{arch}, against the noise floor**: fp32 agrees with itself on {floor['agreement']:.1%} "
                         f"of the held-out crops (KL {floor['kl']:.4f}) when their pixels move by ±{NOISE_GREY} grey "
                         f"level; deployopt's int8 agrees with fp32 on {mine['agreement']:.1%} (KL {mine['kl']:.4f}). "
                         "Most of its disagreements fall on crops that one grey level already flips (table above).")
        if peers and ours and min(e["fidelity"]["unseen"]["kl"] for e in peers) < min(
                e["fidelity"]["unseen"]["kl"] for e in ours):
            lines.append(f"- **{arch}, where a peer is more faithful**: NNCF's defaults differ from the demo's "
                         "deployopt recipe in two ways: full 8-bit symmetric weights (deployopt takes 7-bit weights "
                         "on a CPU without VNNI, so that onnxruntime's uint8 x int8 kernels cannot saturate) and "
                         "per-tensor activation ranges from the mean of per-sample min/max (NNCF's MEAN_MINMAX) "
                         "where the demo's `calibration: auto` chooses among global min/max, mse and entropy ranges.")
    # Why, on onnxruntime: how many convolutions each file's Q/DQ placement lets onnxruntime fuse.
    for arch, measured in per_arch.items():
        convs = measured.get("int8_convs", {})
        names = {q: label for label, q, _ in ENTRIES}
        slow = [e["label"] for e in _entry_rows(arch, measured, errors[arch]) if e["runtime"] == "onnxruntime"
                and e["quantizer"] != "fp32" and e["row"] and not e["row"].get("error") and e["row"]["speedup_ci"][1] < 1]
        text = (f"- **{arch}, why on onnxruntime**: convolutions onnxruntime runs as int8 QLinearConv (of all) "
                "in its optimized graph: " + ", ".join(f"{names[q]} {a}/{b}" for q, (a, b) in convs.items()) + ".")
        for quantizer, target in DEPLOYOPT_BUILDS.items():
            kept = (measured.get("deployopt_float") or {}).get(quantizer) or {}
            if kept.get("fallback"):
                text += f" {names[quantizer]}'s accuracy fallback returned {kept['fallback']} nodes to float."
            if kept.get("latency"):
                text += (f" {names[quantizer]}'s latency-aware search, timed on {target} on this loaded host, "
                         f"returned {kept['latency']} nodes ({kept['latency_convs']} of them Conv) to float where "
                         "int8 measured slower.")
        if slow:
            text += (" A convolution left unfused runs in float between DequantizeLinear/QuantizeLinear and "
                     f"pays for both, which is why {', '.join(slow)} run slower than fp32 there.")
        lines.append(text)
    return lines


def disagreement_table(arch: str, measured: dict) -> list[str]:
    """Per int8 entry and fidelity set: its top-1 disagreements with fp32 on onnxruntime, how many
    fall on noise-unstable crops, and its agreement on the noise-stable ones (module doc)."""
    floor = measured.get("noise_floor")
    if not floor:
        return []
    sets = ("held-out", "unseen")
    unstable = {n: np.array(floor[n]["unstable"]) for n in sets}
    lines = [f"Where the disagreements are: a crop is noise-unstable when one of {NOISE_DRAWS} draws of "
             f"±{NOISE_GREY} grey level changes its fp32 top-1 (held-out: {int(unstable['held-out'].sum())} of "
             f"{len(unstable['held-out'])} crops; unseen: {int(unstable['unseen'].sum())} of "
             f"{len(unstable['unseen'])}). Top-1 against fp32 on onnxruntime.", "",
             "| entry | runtime | held-out: disagreements (on unstable crops) | held-out: agreement on stable crops "
             "| unseen: disagreements (on unstable crops) | unseen: agreement on stable crops |",
             "|---|---|---:|---:|---:|---:|"]
    for label, quantizer, (runtime, _) in ENTRIES:
        cells = []
        for name in sets:
            top1 = measured["top1"].get(f"{arch}/{quantizer}/{runtime}/{name}")
            if top1 is None:
                break
            wrong = np.array(top1) != np.array(floor[name]["top1"])
            stable = ~unstable[name]
            agree = int((~wrong & stable).sum())
            low, high = wilson_interval(agree, int(stable.sum()))
            cells += [f"{int(wrong.sum())} ({int((wrong & unstable[name]).sum())})",
                      f"{agree / stable.sum():.1%} [{low:.1%}, {high:.1%}]"]
        if len(cells) == 2 * len(sets):
            lines.append(f"| {label} | {runtime} | " + " | ".join(cells) + " |")
    return lines


def _condensed(warnings: list[str]) -> str:
    noisy = [w for w in warnings if "CV" in w]
    others = [w for w in warnings if "CV" not in w]
    if noisy:
        others.append(f"{len(noisy)} entries with a timing CV above 10% (ratios over interleaved rounds remain usable)")
    return "; ".join(others)


def markdown(command: str, stamp: dict, per_arch: dict, errors: dict, sizes: dict, seconds: dict,
             settings: dict) -> str:
    rr, rr_reason = auto_reduce_range()
    lines = ["# Peers: int8 from onnxruntime quantize_static, NNCF and deployopt on onnxruntime and OpenVINO", "",
             f"Machine: {machine.stamp_line(stamp)}", "", f"Command: `{command}`", "",
             "Absolute milliseconds move with the host's load (the warnings under each table say when it was "
             "loaded); the ratios come from one interleaved run per model "
             f"({settings['rounds']} rounds of {settings['runs']} timed runs per entry, one worker process "
             "per entry, 1 intra-op thread, batch 1), so drift of the host hits every entry alike.", "",
             "- speedup = p50(fp32 on onnxruntime) / p50(entry), bootstrap 95% interval over the paired rounds.",
             "- Every quantizer calibrates on the demo's calibration set ('photos' test split, 110 crops).",
             "- `quantize_static defaults`: `quantize_static(fp32, out, reader)`, nothing else set (QDQ, int8 "
             "activations and weights, per-tensor, MinMax).",
             f"- `U8S8 per-channel`: QDQ, uint8 activations, int8 per-channel weights, reduce_range={rr} "
             f"(deployopt's choice here: {rr_reason.split(':')[0]}).",
             "- `nncf`: `nncf.quantize(onnx_model, nncf.Dataset(calibration), subset_size=110)`, default preset "
             "(symmetric weights and activations), target device ANY; the second NNCF entry adds "
             "`fast_bias_correction=False`.",
             "- `deployopt`: `deployopt.optimize` with the demo's passes (cleanup, quantize with `calibration: auto`); "
             "its latency-aware search times on onnxruntime. `deployopt, tune_ranges`: the same with "
             "`tune_ranges: true` (activation ranges rescaled by the int8 model's output error on 64 calibration "
             "crops). `deployopt, target openvino`: the demo's recipe with "
             "`benchmark.runtime: openvino`, so the search decides on OpenVINO.",
             "- ResNet-18: speed only. No real ResNet-18 weights install offline, and the agreement of a "
             "random-init network says nothing; its weights are a seeded random init (int8 kernels run as "
             "fast on them).",
             f"- Noise floor: fp32 on inputs moved by at most ±{NOISE_GREY} grey level per pixel (uniform "
             "integer noise before normalization, one draw per crop), against fp32 on the clean inputs.",
             "- OpenVINO compiles float models with INFERENCE_PRECISION_HINT f32, int8 (Q/DQ) models with "
             "its default precision; the OpenVINO entries run the very same .onnx files as the onnxruntime ones "
             "(`deployopt, target openvino` is its own build).",
             "- Agreement: top-1 with the fp32 model run on the same runtime (Wilson 95% CI); KL = "
             "KL(softmax fp32 || softmax entry), mean over samples (`deployopt.evaluate`). `held-out crops`: the "
             "demo's data.fidelity, 'photos' train split (other crops of the photos calibration saw); "
             "`unseen photos`: 22 crops each of 6 photos in no built-in dataset (sklearn china and "
             "flower, matplotlib grace_hopper, skimage camera, coins, hubble_deep_field), so no calibration "
             "sample came from them.",
             "- int8 convs: convolutions onnxruntime runs as QLinearConv, of all convolutions, in its optimized "
             "graph (ORT_ENABLE_ALL).",
             "- top-1, labelled photos: foolbox's 20 labelled ImageNet photos (`imagenet-samples`), on the "
             "entry's runtime; time to produce: wall time of the quantizer call that made the file (calibration "
             "included; deployopt's includes its latency-aware timing), on this 2-core machine.", ""]
    for arch, measured in per_arch.items():
        sets = {name: next((v["n"] for k, v in measured["fidelity"].items() if k.endswith("/" + name) and "n" in v), "?")
                for name in ("held-out", "unseen", "labelled")}
        lines += [f"## {arch}", "",
                  f"| entry | runtime | p50 ms | speedup vs ORT fp32 [95% CI] | agreement, held-out crops "
                  f"(n={sets['held-out']}) | KL held-out | agreement, unseen photos (n={sets['unseen']}) | KL unseen "
                  f"| top-1, labelled photos (n={sets['labelled']}) | int8 convs (ORT) | size MB | time to produce s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in _entry_rows(arch, measured, errors[arch]):
            quantizer, runtime, row = e["quantizer"], e["runtime"], e["row"]
            if quantizer in errors[arch]:
                lines.append(f"| {e['label']} | {runtime} | FAILED to quantize: {errors[arch][quantizer]} "
                             "| | | | | | | | | |")
                continue
            if row is None:  # kept measurements from before the entry existed: run with --fresh
                row = {"error": "not timed in the kept latency run", "runtime_version": ""}
            lat = (f"FAILED: {row['error']}", "") if row.get("error") else (f"{row['p50_ms']:.2f}", _speed(e))
            cells = []
            for name in ("held-out", "unseen"):
                result = e["fidelity"][name]
                if quantizer == "fp32":
                    cells += ["reference", "0"]
                elif arch not in REAL_WEIGHTS:
                    cells += ["not measured: random-init weights", ""]
                elif result is None or "error" in result:
                    cells += [f"FAILED: {result['error'] if result else 'not measured'}", ""]
                else:
                    cells += [f"{result['agreement']:.1%} [{result['agreement_ci'][0]:.1%}, "
                              f"{result['agreement_ci'][1]:.1%}]", f"{result['kl']:.4f}"]
            labelled = e["fidelity"]["labelled"]
            if arch not in REAL_WEIGHTS:
                cells.append("")
            elif labelled is None or "error" in labelled:
                cells.append(f"FAILED: {labelled['error'] if labelled else 'not measured'}")
            else:
                cells.append(f"{labelled['top1']:.0%}")
            convs = measured.get("int8_convs", {}).get(quantizer)
            conv_cell = f"{convs[0]}/{convs[1]}" if convs and runtime == "onnxruntime" else ""
            took = seconds[arch].get(quantizer)
            lines.append(f"| {e['label']} | {runtime} {row['runtime_version']} | {lat[0]} | {lat[1]} | "
                         + " | ".join(cells) + f" | {conv_cell} | {sizes[arch][quantizer]:.2f} | "
                         + ("" if took is None else f"{took:.0f}") + " |")
            if quantizer == "fp32" and runtime == "onnxruntime" and measured.get("noise_floor"):
                floor = measured["noise_floor"]
                lines.append(f"| fp32, input moved by ±{NOISE_GREY} grey level (noise floor) | onnxruntime | | | "
                             + " | ".join(f"{floor[n]['agreement']:.1%} [{floor[n]['agreement_ci'][0]:.1%}, "
                                          f"{floor[n]['agreement_ci'][1]:.1%}] | {floor[n]['kl']:.4f}"
                                          for n in ("held-out", "unseen")) + " | | | | |")
        if measured["latency"].get("warnings"):
            lines += ["", "Latency run warnings: " + _condensed(measured["latency"]["warnings"]) + "."]
        lines += ["", *disagreement_table(arch, measured), ""]
    lines += ["## Findings", "", *findings(per_arch, errors), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few runs and 32 samples per fidelity set: a trial")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--work", default=str(ROOT / "runs" / "peers"))
    parser.add_argument("--fresh", action="store_true", help="measure again instead of reusing kept results")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    runs = args.runs or (10 if args.quick else 40)
    rounds = args.rounds or (2 if args.quick else 6)
    work = pathlib.Path(args.work)
    out = pathlib.Path(args.out) if args.out else (
        work / "peers-quick.md" if args.quick else ROOT / "benchmarks" / "results" / "peers.md")
    command = "python -m benchmarks.run_peers " + " ".join(argv if argv is not None else sys.argv[1:])
    limit = {"limit": 32} if args.quick else {}
    datasets = {"held-out": {**HELD_OUT, **limit},
                "unseen": {"dataset": f"folder:{unseen_photo_folder(work / 'unseen-photos')}", **limit}}
    work.mkdir(parents=True, exist_ok=True)
    store = Store(work / ("measured-quick.json" if args.quick else "measured.json"), args.fresh)
    per_arch, errors, sizes, seconds = {}, {}, {}, {}
    for arch in ARCHS:
        paths, errors[arch] = build_models(arch, work / "models")
        sizes[arch] = {q: p.stat().st_size / 1e6 for q, p in paths.items()}
        seconds[arch] = {q: build_seconds(p) for q, p in paths.items() if q != "fp32"}
        per_arch[arch] = measure(arch, paths, store, runs=runs, rounds=rounds, datasets=datasets,
                                 folder=work / "models")
    stamp = machine.stamp(runtimes=True)
    text = markdown(command.strip(), stamp, per_arch, errors, sizes, seconds, {"runs": runs, "rounds": rounds})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"command": command.strip(), "machine": stamp,
                                                    "errors": errors, "sizes_mb": sizes, "seconds_to_produce": seconds,
                                                    **per_arch}, indent=1),
                                        encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
