"""The `deployopt` command: export | inspect | optimize | bench | eval.

Exit codes: 0 success; 1 the work ran but failed (a gate not met, a pass that missed its
tolerance, a crashed worker); 2 bad input (usage, unreadable model, invalid recipe or data);
130 interrupted (SIGINT or SIGTERM). Errors are one line on stderr; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import shutil
import signal
import sys
import traceback

from deployopt.core.errors import DeployoptError


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
    p.set_defaults(func=_optimize)


def _optimize(args) -> int:
    from deployopt import pipeline, report
    from deployopt.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    out_dir = pathlib.Path(args.output or pathlib.Path("runs") / pathlib.Path(args.recipe).stem)
    result = pipeline.run(recipe, out_dir)
    print(report.terminal_table(result.report))
    print(f"\nwrote {out_dir / 'model.onnx'}, {out_dir / 'report.json'}, {out_dir / 'report.md'}")
    if result.exit_code:
        print(f"deployopt: failed: {result.reason}", file=sys.stderr)
    return result.exit_code


def build_parser() -> argparse.ArgumentParser:
    from deployopt.measure import accuracy, latency
    from deployopt import export_cli
    from deployopt.core import stats

    parser = argparse.ArgumentParser(
        prog="deployopt",
        description="Optimize ONNX vision models for CPU deployment and prove what each step bought.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    export_cli.add_parser(subparsers)
    stats.add_parser(subparsers)
    _add_optimize(subparsers)
    latency.add_parser(subparsers)
    accuracy.add_parser(subparsers)
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
        from deployopt.pipeline import STAGING_PREFIX

        out_dir = pathlib.Path(args.output or pathlib.Path("runs") / pathlib.Path(args.recipe).stem)
        for leftover in out_dir.glob(STAGING_PREFIX + "*") if out_dir.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)


def _contained(args) -> int:
    from deployopt.contain import run_contained

    try:
        return run_contained(args.func, args, verb=args.verb, timeout=getattr(args, "timeout", None))
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
