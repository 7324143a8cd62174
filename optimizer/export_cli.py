"""The `deployopt export` verb: argument parsing here, the work in deployopt.models.export.

Kept apart so that building the CLI parser does not import torch (seconds of start-up for
`inspect`, `bench` and `eval`, which never need it).
"""

from __future__ import annotations

import argparse

from deployopt.core.errors import UserError
from deployopt.models import EXPORTERS



def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="export a reference model or package.module:callable to ONNX",
        description="Export a models/ name or package.module:callable (which is imported and run: "
                    "only use code you trust) to a single .onnx file, checked against torch.")
    p.add_argument("model", metavar="MODEL", help="a models/ name or package.module:callable")
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
    p.set_defaults(func=handle)
    return p


def _takes_pretrained(spec: str) -> bool:
    from deployopt import models

    return spec in models.REGISTRY and models.accepts(spec, "pretrained")


def handle(args: argparse.Namespace) -> int:
    from deployopt import models  # torch model code is only imported by the verbs that need it
    from deployopt.models.export import export_model, parse_input_shape

    kwargs = {}
    if args.pretrained or (args.pretrained is False and _takes_pretrained(args.model)):
        # --no-pretrained on a model without packaged weights asks for what it does anyway.
        kwargs["pretrained"] = args.pretrained
    module = models.resolve(args.model, seed=args.seed, **kwargs)
    if args.weights:
        models.load_weights(module, args.weights)
    if args.input_shape:
        shape = parse_input_shape(args.input_shape)
    elif getattr(module, "default_input_shape", None):
        shape = tuple(module.default_input_shape)
    else:
        raise UserError(f"--input-shape: required for '{args.model}', which has no default_input_shape")
    result = export_model(module, args.output, shape, dynamic_batch=args.dynamic_batch, opset=args.opset,
                          tolerance=args.tolerance, seed=args.seed, exporter=args.exporter)
    if args.weights:
        weights = f"weights {args.weights}"
    elif args.pretrained:
        weights = "pretrained weights"
    else:
        weights = f"random init (seed {args.seed})" if ":" not in args.model else "weights from the callable"
    note = f" ({result.fallback_reason})" if result.fallback_reason else ""
    print(f"{result.path}: {args.model} {'x'.join(map(str, shape))}{' dynamic batch' if args.dynamic_batch else ''}, "
          f"{weights}, exporter {result.exporter}{note}, opset {result.opset}, "
          f"max abs diff {result.max_abs_diff:.2e} (outputs up to {result.max_abs_output:.2g}), {result.bytes / 1e6:.2f} MB, {result.seconds:.1f}s")
    return 0
