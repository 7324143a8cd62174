"""Published numbers for the quantize pass's accuracy fallback, by ranking and by judging rule.

    .venv/bin/python -m benchmarks.run_fallback [--tolerance 0.02] [--kl-tolerance 0.002]
        [--runs 30] [--rounds 3] [--out benchmarks/results/fallback.md]

EfficientNet-Lite0 with its real ImageNet weights (1x3x224x224, exported as ``make demo`` does),
quantized by ``QuantizePass(max_accuracy_drop=..., fallback_rank=...)`` with the demo recipe's
calibration data ('photos' split test). Rankings: the output error each tensor's quantization adds
(``sensitivity``, the default) and local SQNR (``sqnr``). Judging rules, on the first 200 crops of
'photos' split train (``data.evaluation``): top-1 agreement with fp32 (the default metric,
``--tolerance``) and ``classification:score=kl`` (exp(-KL) against fp32, ``--kl-tolerance``).
Fidelity is then measured on the other 240 crops of that split, which the fallback never saw, and
on the 132 crops of 6 photos no built-in dataset holds (``run_peers.unseen_photo_folder``).
Latency: fp32 and every result timed by ``deployopt.measure.latency.compare`` (separate workers,
interleaved rounds, 1 thread). Writes the table with the machine stamp and the command, and prints it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import onnx

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deployopt.measure import machine  # noqa: E402
from benchmarks import run_peers  # noqa: E402
from benchmarks.run_quantize import _Subset  # noqa: E402
from deployopt.core.data import open_dataset  # noqa: E402

SHAPE = (1, 3, 224, 224)
EVALUATION = 200  # crops of 'photos' split train the tolerance is checked on; the rest are held out
#: (judging rule, its metric spec, fallback_rank) of each row
CONFIGS = (("agreement", None, "sensitivity"), ("agreement", None, "sqnr"),
           ("KL", "classification:score=kl", "sensitivity"), ("KL", "classification:score=kl", "sqnr"))


def _data():
    spec = {"dataset": "photos", "preprocess": "efficientnet-lite"}
    calibration = open_dataset({**spec, "split": "test"}, input_shape=SHAPE)
    train = open_dataset({**spec, "split": "train"}, input_shape=SHAPE)
    evaluation = _Subset(train, lambda i: i < EVALUATION, name=f"photos split train, first {EVALUATION}")
    held_out = _Subset(train, lambda i: i >= EVALUATION, name=f"photos split train, after {EVALUATION}")
    return calibration, evaluation, held_out


def _quantize(fp32: pathlib.Path, rank: str, metrics: str | None, tolerance: float, data,
              out: pathlib.Path) -> dict:
    from deployopt.core import io
    from deployopt.passes.context import PassContext
    from deployopt.passes.quantize import QuantizePass

    calibration, evaluation, _ = data
    p = QuantizePass(max_accuracy_drop=tolerance, fallback_rank=rank)
    p.context = PassContext(calibration=calibration, evaluation=evaluation, work_dir=out.parent, metrics=metrics)
    result = p(io.load(fp32))
    io.save(result.model, out)
    return result.details


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tolerance", type=float, default=0.02, help="max_accuracy_drop on agreement")
    ap.add_argument("--kl-tolerance", type=float, default=0.002, help="max_accuracy_drop on exp(-KL)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fallback.md"))
    args = ap.parse_args(argv)
    command = "python -m benchmarks.run_fallback " + " ".join(argv if argv is not None else sys.argv[1:])
    tolerances = {"agreement": args.tolerance, "KL": args.kl_tolerance}

    from deployopt import models
    from deployopt.core.stats import model_stats
    from deployopt.measure.accuracy import evaluate
    from deployopt.measure.latency import compare
    from deployopt.models.export import export_model

    data = _data()
    rows = []
    with tempfile.TemporaryDirectory(prefix="run_fallback-") as name:
        tmp = pathlib.Path(name)
        fp32 = tmp / "efficientnet_lite0.onnx"
        export_model(models.build("efficientnet_lite0", pretrained=True), fp32, SHAPE)
        unseen = open_dataset({"dataset": f"folder:{run_peers.unseen_photo_folder(tmp / 'unseen-photos')}",
                               "preprocess": "efficientnet-lite"}, input_shape=SHAPE)
        macs = {layer["name"]: layer["macs"] or 0 for layer in model_stats(onnx.load(str(fp32)))["layers"]}
        results = {}
        for rule, metrics, rank in CONFIGS:
            label = f"{rule}, {rank}"
            print(f"[{label}] quantize with fallback", file=sys.stderr)
            out = tmp / f"int8-{rule}-{rank}.onnx"
            results[label] = (rule, rank, out, _quantize(fp32, rank, metrics, tolerances[rule], data, out))
        print("latency", file=sys.stderr)
        bench = compare([fp32, *(r[2] for r in results.values())], labels=["fp32", *results], threads=(1,),
                        batch=(1,), warmup=5, runs=args.runs, rounds=args.rounds, progress=False)
        speed = {r["model"]: r for r in bench.rows}
        for label, (rule, rank, path, details) in results.items():
            fid = evaluate(path, data[2], reference_path=fp32, progress=False)
            fid_unseen = evaluate(path, unseen, reference_path=fp32, progress=False)
            float_nodes = [e["node"] for e in details.get("float_nodes", [])]
            fb = details.get("fallback", {})
            latency = details.get("latency_aware", {})
            rows.append({"rule": rule, "rank": rank, "met": fb.get("met"),
                         "fallback_nodes": len(fb.get("nodes_to_float", [])), "trials": len(fb.get("trials", [])),
                         "latency_result": latency.get("result", "-"), "float_nodes": len(float_nodes),
                         "float_macs": sum(macs.get(n, 0) for n in float_nodes) / sum(macs.values()),
                         "speedup": speed[label]["speedup"], "ci": speed[label]["speedup_ci"],
                         "agreement": fid["agreement"], "agreement_ci": fid["agreement_ci"], "n": fid["n"],
                         "kl": fid["kl"], "unseen": fid_unseen["agreement"], "unseen_n": fid_unseen["n"],
                         "unseen_kl": fid_unseen["kl"],
                         "fallback_s": details.get("timings_s", {}).get("fallback", 0.0)})
    lines = ["# Accuracy fallback: rankings and judging rules", "",
             f"Machine: {machine.stamp_line(machine.stamp())}", "", f"Command: `{command.strip()}`", "",
             f"EfficientNet-Lite0 (real ImageNet weights), `QuantizePass(max_accuracy_drop=..., fallback_rank=...)`, "
             f"judged on {EVALUATION} crops ('photos' split train) by top-1 agreement with fp32 (max_accuracy_drop "
             f"{args.tolerance}) or by `classification:score=kl`, exp(-KL) against fp32 (max_accuracy_drop "
             f"{args.kl_tolerance}, a mean KL of about {args.kl_tolerance}); calibration on 'photos' split test. "
             "Fidelity on the other 240 crops of split train, which the fallback never saw, and on 132 crops of 6 "
             "photos no calibration or judging saw. Latency at 1 thread, batch 1, interleaved rounds; speedup = "
             "p50(fp32) / p50(model). 'float model' means the latency-aware step found no int8 configuration "
             "faster than fp32 and returned the float model; float MACs: the share of the model's "
             "multiply-accumulates in nodes left float (by the fallback or by the latency-aware step).", "",
             "| judged on | fallback_rank | tolerance met | nodes returned to float by the fallback | trials | "
             "fallback s | final model | float MACs | speedup vs fp32 [95% CI] | held-out agreement [95% CI] | "
             "KL | unseen agreement | KL unseen |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        is_float = r["latency_result"] == "float"
        final = "float model" if is_float else f"int8, {r['float_nodes']} float nodes"
        lines.append(f"| {r['rule']} | {r['rank']} | {'yes' if r['met'] else 'no'} | {r['fallback_nodes']} | "
                     f"{r['trials']} | {r['fallback_s']:.0f} | {final} | "
                     f"{'100%' if is_float else format(r['float_macs'], '.0%')} | "
                     f"{r['speedup']:.2f}x [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | "
                     f"{r['agreement'] * 100:.1f}% of {r['n']} [{r['agreement_ci'][0] * 100:.1f}, "
                     f"{r['agreement_ci'][1] * 100:.1f}] | {r['kl']:.2e} | "
                     f"{r['unseen'] * 100:.1f}% of {r['unseen_n']} | {r['unseen_kl']:.2e} |")
    text = "\n".join(lines) + "\n"
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
