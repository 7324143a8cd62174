"""The `deployopt` command: export | inspect | optimize | sweep | bench | eval.

A thin layer over the Python API (``deployopt.api``): this module parses flags into API calls and
prints results. Exit codes: 0 success; 1 the work ran but failed (a gate not met, a pass that
missed its tolerance, a crashed worker); 2 bad input (usage, unreadable model, invalid recipe or
data); 130 interrupted (SIGINT or SIGTERM). Errors are one line on stderr; ``--debug`` shows the
traceback. ``optimize``, ``eval`` and ``inspect`` run in a watched child process
(``deployopt.core.contain``), so a model that makes onnxruntime abort cannot take the CLI down.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import pathlib
import shutil
import signal
import sys
import traceback

from deployopt.core.errors import DeployoptError, UserError, WorkFailed, one_line
from deployopt.core.session import OPT_LEVELS
from deployopt.models import EXPORTERS

DATA_HELP = "digits, mnist, imagenet-samples, photos, folder:PATH, npy:PATH, npz:PATH"


# -- flag parsing: numbers are parsed in the handlers so bad values are one-line errors (exit 2) ----

def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a comma-separated list of integers") from None


def _int(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not an integer") from None


def _shape_args(items: list[str]) -> dict[str, tuple[int, ...]]:
    from deployopt.measure.model_io import parse_shape

    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        if not sep or not name:
            raise UserError(f"--shape: {item!r} is not NAME=1x3x224x224")
        shapes[name] = parse_shape(dims, f"--shape {name}")
    return shapes


def _add_target(p, what: str) -> None:
    """``--runtime`` and ``--ep``: the target ``what`` is measured on (deployopt.measure.runtime)."""
    p.add_argument("--runtime", default=None, metavar="NAME",
                   help=f"runtime {what}: onnxruntime (default) or openvino (needs deployopt[openvino])")
    p.add_argument("--ep", default=None, metavar="NAME",
                   help="onnxruntime execution provider (default CPUExecutionProvider), or NAME=PATH "
                        "for a plugin EP library")


def _target(args) -> tuple[str, str | None]:
    """The (runtime, ep) of ``--runtime``/``--ep``, refused (exit 2) when not available here."""
    from deployopt.measure.runtime import check_target

    target = check_target(args.runtime or "onnxruntime", args.ep)
    return target.runtime, target.ep


def _writable(flag: str, path: str | None, inputs: list[str]) -> pathlib.Path | None:
    """``path`` checked as an output of ``flag``: writable, and none of the ``inputs`` files."""
    from deployopt.measure.output import check_writable

    return check_writable(path, flag, inputs) if path else None


def _input_files(*paths: str | None, data: str | None) -> list[str]:
    """The files a command reads: its path arguments and the path of its ``--data`` spec."""
    from deployopt.core.data.spec import check_spec

    files = [path for path in paths if path]
    if data:
        with contextlib.suppress(UserError):  # a bad spec is reported where the data is opened
            spec_path = check_spec(data).path
            if spec_path:
                files.append(spec_path)
    return files


# -- export --------------------------------------------------------------------------------------------

def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a reference model or package.module:callable to ONNX",
        description="Export a deployopt.models name or package.module:callable (which is imported and "
                    "run: only use code you trust) to a single .onnx file, checked against torch. "
                    "Needs the torch extra.")
    p.add_argument("model", metavar="MODEL", help="a deployopt.models name or package.module:callable")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--input-shape", help="e.g. 1,3,224,224 (default: the model's default_input_shape)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--weights", help="state_dict file (.pt/.pth) to load into the model")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max abs difference torch vs onnxruntime (default 1e-4)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="load the model's packaged pretrained weights (efficientnet_lite0)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto", help="torch exporter (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random init and the check input")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from deployopt import api, models

    models.require_torch("deployopt export")
    from deployopt.models.export import parse_input_shape

    pretrained = args.pretrained
    if pretrained is False and not (args.model in models.REGISTRY and models.accepts(args.model, "pretrained")):
        pretrained = None  # --no-pretrained on a model without packaged weights asks for what it does anyway
    shape = parse_input_shape(args.input_shape) if args.input_shape else None
    try:
        result = api.export(args.model, args.output, input_shape=shape, dynamic_batch=args.dynamic_batch,
                            opset=args.opset, weights=args.weights, pretrained=pretrained,
                            tolerance=args.tolerance, exporter=args.exporter, seed=args.seed)
    except UserError as e:
        if str(e).startswith("input_shape: required"):
            raise UserError(f"--input-shape: required for '{args.model}', which has no default_input_shape") from e
        raise
    if args.weights:
        weights = f"weights {args.weights}"
    elif args.pretrained:
        weights = "pretrained weights"
    else:
        weights = f"random init (seed {args.seed})" if ":" not in args.model else "weights from the callable"
    note = f" ({result.fallback_reason})" if result.fallback_reason else ""
    shape_text = "x".join(map(str, result.input_shape))
    print(f"{result.path}: {args.model} {shape_text}{' dynamic batch' if args.dynamic_batch else ''}, "
          f"{weights}, exporter {result.exporter}{note}, opset {result.opset}, "
          f"max abs diff {result.max_abs_diff:.2e} (outputs up to {result.max_abs_output:.2g}), "
          f"{result.bytes / 1e6:.2f} MB, {result.seconds:.1f}s")
    return 0


# -- inspect -------------------------------------------------------------------------------------------

def _add_inspect(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="opset, I/O, op histogram, params, MACs, sizes, quantized ops",
        description="Print statistics of an ONNX model: opset and IR version, inputs and outputs, "
                    "op histogram, params and non-zero params, MACs per Conv/Gemm/MatMul layer "
                    "and in total, bytes and zipped bytes, quantized ops.")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON on stdout")
    p.set_defaults(func=_inspect)


def _inspect(args) -> int:
    from deployopt import api
    from deployopt.core.stats import format_stats

    stats = api.inspect(args.model)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


# -- optimize ------------------------------------------------------------------------------------------

def _add_optimize(subparsers) -> None:
    p = subparsers.add_parser(
        "optimize", help="run a recipe: passes, benchmark, gates, report",
        description="Run the passes of RECIPE on its model, measure input vs output and check the gates. "
                    "Writes OUTDIR/model.onnx, report.json and report.md.")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("-o", "--output", metavar="OUTDIR",
                   help="output folder (default: runs/<recipe name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. passes[1].prune.sparsity=0.7 (repeatable)")
    _add_target(p, "every latency of the run is measured on (sets benchmark.runtime / benchmark.ep)")
    p.set_defaults(func=_optimize)


def _optimize_out_dir(args) -> pathlib.Path:
    return pathlib.Path(args.output or pathlib.Path("runs") / pathlib.Path(args.recipe).stem)


def _optimize(args) -> int:
    from deployopt import api, report

    out_dir = _optimize_out_dir(args)
    runtime, ep = _target(args) if args.runtime or args.ep else (None, None)
    result = api.optimize(args.recipe, out_dir, overrides=args.overrides, runtime=runtime, ep=ep)
    print(report.terminal_table(result.to_dict()))
    print(f"\nwrote {out_dir / 'model.onnx'}, {out_dir / 'report.json'}, {out_dir / 'report.md'}")
    if result.exit_code:
        print(f"deployopt: failed: {result.reason}", file=sys.stderr)
    return result.exit_code


# -- sweep ---------------------------------------------------------------------------------------------

def _add_sweep(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="search recipe settings for the fastest model that meets the gates",
        description="Run one optimize trial per setting of SWEEP's search space (grid, random or TPE) "
                    "with a shared step cache, on local worker processes or a Ray cluster; benchmark "
                    "the candidates on each target. Writes OUTDIR/sweep.json, sweep.md, pareto.png, "
                    "trials/NNN/ and best/ (the fastest trial that meets the gates); exit 1 when none does.")
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="output folder (default: runs/<sweep name>)")
    p.add_argument("--engine", choices=("local", "ray"), default=None,
                   help="local worker processes or Ray tasks (default: the file's engine, else local)")
    p.add_argument("--workers", default=None, metavar="N", help="trials run side by side (default: the file's)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --engine ray: the cluster to join (default: start a local Ray instance)")
    p.add_argument("--no-cache", action="store_true", help="compute every step (no step cache in OUTDIR/cache)")
    p.set_defaults(func=_sweep)


def _sweep(args) -> int:
    from deployopt import api

    workers = _int("--workers", args.workers) if args.workers is not None else None
    if workers is not None and workers < 1:
        raise UserError(f"--workers: {workers} is not an integer >= 1")
    if args.address and args.engine not in ("ray", None):
        raise UserError("--address: only with --engine ray")
    out_dir = pathlib.Path(args.output or pathlib.Path("runs") / pathlib.Path(args.sweep).stem)
    result = api.sweep(args.sweep, out_dir, engine=args.engine or ("ray" if args.address else None),
                       workers=workers, address=args.address, cache=not args.no_cache)
    sys.stdout.write((result.out_dir / "sweep.md").read_text(encoding="utf-8"))
    print(f"\nwrote {out_dir / 'sweep.json'}, {out_dir / 'sweep.md'}, {out_dir / 'pareto.png'}")
    if result.exit_code:
        print(f"deployopt: failed: {result.reason}", file=sys.stderr)
    return result.exit_code


# -- bench ---------------------------------------------------------------------------------------------

def _add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="side-by-side latency on onnxruntime or OpenVINO (CPU)",
        description="Latency of one or more ONNX models on onnxruntime or OpenVINO (CPU), measured in "
                    "interleaved rounds in one worker process per model; speedups are vs the "
                    "first model, with a 95% bootstrap interval.")
    p.add_argument("models", nargs="+", metavar="MODEL.onnx")
    p.add_argument("--threads", default="1", help="intra-op thread counts, e.g. 1,2 (default 1)")
    p.add_argument("--batch", default="1",
                   help="batch sizes, e.g. 1,8 (values > 1 need a dynamic batch dimension)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=1x3x224x224",
                   help="concrete shape for an input with dynamic dims (repeatable)")
    p.add_argument("--runs", default="100", help="timed runs per round (default 100)")
    p.add_argument("--rounds", default="3", help="interleaved rounds (default 3)")
    p.add_argument("--warmup", default="10",
                   help="untimed runs before each measured segment (default 10)")
    p.add_argument("--timeout", default=None, metavar="S",
                   help="seconds each model's worker may take in total before it is killed")
    p.add_argument("--seed", default="0", help="seed of the random inputs (default 0)")
    p.add_argument("--instances", default="1", metavar="N",
                   help="throughput mode: N concurrent worker processes per model, each with --threads "
                        "intra-op threads; img/s is their aggregate (default 1)")
    _add_target(p, "to time the models on")
    p.add_argument("--opt-level", default="all", choices=tuple(OPT_LEVELS),
                   help="onnxruntime graph optimization level (default all)")
    p.add_argument("--data", metavar="SPEC", help=f"feed real samples from a dataset spec ({DATA_HELP})")
    p.add_argument("--labels", help="comma-separated display names, one per model")
    p.add_argument("--json", metavar="F", help="write results as JSON")
    p.add_argument("--csv", metavar="F", help="write rows as CSV")
    p.add_argument("--markdown", metavar="F", help="write the table as Markdown")
    p.add_argument("--plot", metavar="F.png", help="write the latency distribution plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--profile", action="store_true",
                   help="after the latency table, profile each model per node with onnxruntime's "
                        "profiler (first --threads and --batch value) and print its most "
                        "expensive nodes and op types")
    p.add_argument("--top", default=None, metavar="N",
                   help="with --profile: how many nodes and op types to print (default 10)")
    p.set_defaults(func=_bench)


def _bench_profiles(result, args, settings: dict, top: int) -> tuple[list, list[str]]:
    """``bench --profile``: profile every model whose latency row at the first (threads, batch)
    succeeded, print each profile's top nodes and op types; return (profiles, one-line failures)."""
    from deployopt import api

    threads, batch = settings["threads"][0], settings["batch"][0]
    ok = {r["model"] for r in result.rows if r["threads"] == threads and r["batch"] == batch and r["error"] is None}
    profiles, errors = [], []
    for model in result.models:
        if model["label"] not in ok:
            continue  # its latency row already says why it failed
        try:
            prof = api.profile(model["path"], threads=threads, batch=batch, runs=settings["runs"],
                               warmup=settings["warmup"], shapes=settings["shapes"], seed=settings["seed"],
                               data=settings["data"], optimization_level=args.opt_level,
                               timeout=settings["timeout"], label=model["label"], runtime=settings["runtime"],
                               ep=settings["ep"])
        except WorkFailed as e:
            errors.append(f"{model['label']}: {one_line(e)}")
            print(f"\nprofile of {model['label']}: FAILED: {one_line(e)}")
            continue
        profiles.append(prof)
        sys.stdout.write("\n" + prof.to_text(top))
    return profiles, errors


def _bench(args) -> int:
    from deployopt import api
    from deployopt.core import io
    from deployopt.measure.inputs import check_settings
    from deployopt.measure.model_io import input_specs, open_data
    from deployopt.measure.output import plot_latency, write_text

    settings = {"threads": _int_list("--threads", args.threads), "batch": _int_list("--batch", args.batch),
                "runs": _int("--runs", args.runs), "rounds": _int("--rounds", args.rounds),
                "warmup": _int("--warmup", args.warmup), "seed": _int("--seed", args.seed), "timeout": None}
    if args.timeout is not None:
        try:
            settings["timeout"] = float(args.timeout)
        except ValueError:
            raise UserError(f"--timeout: {args.timeout!r} is not a number of seconds") from None
    check_settings(threads=settings["threads"], batch=settings["batch"], warmup=settings["warmup"],
                   runs=settings["runs"], rounds=settings["rounds"], timeout=settings["timeout"], prefix="--",
                   instances=_int("--instances", args.instances))
    settings["runtime"], settings["ep"] = _target(args)
    if args.profile and settings["runtime"] != "onnxruntime":
        raise UserError(f"--profile: per-node profiles are onnxruntime's; not with --runtime {settings['runtime']}")
    settings["shapes"] = _shape_args(args.shape)
    if args.top is not None and not args.profile:
        raise UserError("--top: only used with --profile")
    top = _int("--top", args.top) if args.top is not None else 10
    if top < 1:
        raise UserError(f"--top: {top} is not an integer >= 1")
    reads = _input_files(*args.models, data=args.data)
    outputs = {flag: _writable(flag, path, reads) for flag, path in
               (("--json", args.json), ("--csv", args.csv), ("--markdown", args.markdown), ("--plot", args.plot))
               if path}
    if "--plot" in outputs and outputs["--plot"].suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UserError(f"--plot {outputs['--plot']}: use a .png (or .svg, .pdf) file name")
    # On the command line a file that is not a model is bad input (exit 2), not a failure row.
    specs = [input_specs(io.load_proto(path)) for path in args.models]
    settings["data"] = open_data(args.data, specs[0], settings["shapes"]) if args.data else None
    result = api.bench(args.models, labels=args.labels.split(",") if args.labels else None,
                       threads=settings["threads"], batch=settings["batch"], warmup=settings["warmup"],
                       runs=settings["runs"], rounds=settings["rounds"], shapes=settings["shapes"],
                       data=settings["data"], seed=settings["seed"], timeout=settings["timeout"],
                       optimization_level=args.opt_level, progress=not args.no_progress,
                       runtime=settings["runtime"], ep=settings["ep"], instances=_int("--instances", args.instances))
    sys.stdout.write(result.to_text())
    profiles, profile_errors = _bench_profiles(result, args, settings, top) if args.profile else ([], [])
    if "--json" in outputs:
        payload = result.to_dict()
        if args.profile:
            payload["profiles"] = [p.to_dict() for p in profiles]
        write_text(outputs["--json"], json.dumps(payload, indent=2) + "\n")
    if "--csv" in outputs:
        write_text(outputs["--csv"], result.to_csv())
    if "--markdown" in outputs:
        write_text(outputs["--markdown"], "\n".join([result.to_markdown(), *(p.to_markdown(top) for p in profiles)]))
    if "--plot" in outputs:
        plot_latency(result.rows, outputs["--plot"])
    if profile_errors:
        raise WorkFailed(f"{len(profile_errors)} of {len(result.models)} profiles failed; {profile_errors[0]}")
    failed = [r for r in result.rows if r["error"] is not None]
    if failed:
        first = failed[0]
        raise WorkFailed(f"{len(failed)} of {len(result.rows)} benchmark rows failed; "
                         f"{first['model']} (threads={first['threads']}, "
                         f"batch={first['batch']}): {one_line(first['error'])}")
    return 0


# -- eval ----------------------------------------------------------------------------------------------

def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="task metrics vs labels and a reference model",
        description="Judge an ONNX model on a dataset by its task metric, against labels and a "
                    "reference model: classification (top-1/top-5 with Wilson 95% intervals; "
                    "agreement, cosine, max abs difference, KL), detection (box agreement F1 and "
                    "mean IoU; mAP@0.5 and mAP@0.5:0.95 against COCO JSON), segmentation (pixel "
                    "agreement, mIoU), sequence (CTC exact match, CER), regression (cosine, "
                    "relative MAE). `deployopt inspect` suggests a metric per output.")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    p.add_argument("--reference", metavar="REF.onnx", help="compare outputs with this model")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=1x3x224x224",
                   help="full shape of an input whose dynamic dims the data does not fix (repeatable)")
    p.add_argument("--metric", action="append", default=[], metavar="OUTPUT=KIND[:k=v,...]",
                   help="metric of an output (repeatable): classification, detection, segmentation, "
                        "sequence, regression, or package.module:function (user code: imported and run, "
                        "only code you trust), e.g. detection:score_threshold=0.4 (default: "
                        "classification for 2-D logits, regression for other outputs)")
    p.add_argument("--labels", metavar="FILE", help="labels for the detection (COCO JSON), segmentation "
                   "(folder of masks) or sequence (text, one per line) metric")
    p.add_argument("--charset", metavar="FILE", help="the sequence metric's charset, one character per line")
    p.add_argument("--batch-size", default="32", help="samples per run (default 32)")
    p.add_argument("--threads", default="1", help="intra-op threads (default 1)")
    p.add_argument("--noise-floor", default="0", metavar="L",
                   help="also score the reference against itself on inputs moved by up to L grey levels "
                        "(image data): the agreement no int8 model can be held to (default 0: off)")
    _add_target(p, "to run both models on")
    p.add_argument("--json", metavar="F", help="write the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)


def _metric_args(items: list[str]):
    from deployopt.measure.tasks import parse_metric

    return [parse_metric(item, "--metric") for item in items] or None


def _eval(args) -> int:
    from deployopt import api
    from deployopt.measure.output import write_text

    values = {}
    for flag, text, low in (("--batch-size", args.batch_size, 1), ("--threads", args.threads, 1),
                            ("--noise-floor", args.noise_floor, 0)):
        values[flag] = _int(flag, text)
        if values[flag] < low:
            raise UserError(f"{flag}: {values[flag]} is not an integer >= {low}")
    reads = _input_files(args.model, args.reference, args.labels, args.charset, data=args.data)
    out = _writable("--json", args.json, reads)
    runtime, ep = _target(args)
    try:
        result = api.evaluate(args.model, args.data, reference=args.reference, batch_size=values["--batch-size"],
                              threads=values["--threads"], progress=not args.no_progress,
                              shapes=_shape_args(args.shape), metrics=_metric_args(args.metric),
                              labels=args.labels, charset=args.charset, runtime=runtime, ep=ep,
                              noise_floor=values["--noise-floor"])
    except UserError as e:
        if str(e).startswith("data ") and "nothing to measure" in str(e):
            raise UserError(f"--data {args.data}: the dataset has no labels and no --reference or --labels "
                            "was given, so there is nothing to measure") from e
        raise
    sys.stdout.write(result.to_text())
    if out is not None:
        write_text(out, json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


# -- the command -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deployopt",
        description="Optimize ONNX vision models for CPU deployment and prove what each step bought.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in (_add_export, _add_inspect, _add_optimize, _add_sweep, _add_bench, _add_eval):
        add(subparsers)
    for verb, sub in subparsers.choices.items():
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show tracebacks on errors")  # allowed after the verb too
        if verb in CONTAINED:
            if not any("--timeout" in a.option_strings for a in sub._actions):
                sub.add_argument("--timeout", type=_positive_seconds, default=None, metavar="S",
                                 help="stop with exit 1 when the command runs longer than S seconds")
            sub.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    return parser


# Verbs whose work runs onnx/onnxruntime C++ code on the user's model: run in a watched child.
CONTAINED = ("optimize", "eval", "inspect")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _raise_interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C: cleanup handlers run
    raise KeyboardInterrupt


def _cleanup_staging(args) -> None:
    """After a crashed or killed optimize child: remove its staged (never published) outputs."""
    if getattr(args, "verb", None) == "optimize":
        from deployopt.core.contain import STAGING_PREFIX  # light: no onnxruntime import in the parent

        out_dir = _optimize_out_dir(args)
        for leftover in out_dir.glob(STAGING_PREFIX + "*") if out_dir.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)


def _contained(args) -> int:
    from deployopt.core.contain import run_contained

    try:
        return run_contained(functools.partial(run_handler, args.func, args), verb=args.verb,
                             timeout=getattr(args, "timeout", None))
    except KeyboardInterrupt:
        return 130  # the child was stopped and has already said so
    finally:
        _cleanup_staging(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb in CONTAINED and not args.in_process:
        return run_handler(_contained, args)
    return run_handler(args.func, args)


def run_handler(handler, args) -> int:
    """Run a verb's handler and turn every outcome into an exit code and at most one line."""
    debug = getattr(args, "debug", False)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return int(handler(args) or 0)
    except DeployoptError as e:
        if debug:
            traceback.print_exc()
        print(f"deployopt: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("deployopt: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `deployopt inspect m.onnx | head`: the reader left, nothing to say
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep Python's exit flush quiet
        return 0
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        cause = " ".join(str(e).split())[:300]
        print(f"deployopt: internal error: {type(e).__name__}: {cause} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
