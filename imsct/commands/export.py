"""``imsct export``: the networks of a models folder as TorchScript and ONNX (every model of :mod:`imsct.weights` present)."""

from __future__ import annotations

import argparse

HELP = "Export the networks of a models folder (localiser, tumour, T2w-only) to TorchScript and/or ONNX."
EXAMPLE = ("imsct export --models bundle/models --format both\n"
           "  imsct export --models bundle/models --out exported/ --format onnx --model tumor")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..weights import MODELS

    parser.add_argument("--models", metavar="DIR", help="models folder (default: the shipped bundle/models)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: the models folder)")
    parser.add_argument("--format", choices=["torchscript", "onnx", "both"], default="both", help="default both")
    parser.add_argument("--model", action="append", choices=list(MODELS), metavar="KEY",
                        help=f"only this model (repeatable; one of {', '.join(MODELS)}); default: every model present")


def run(args: argparse.Namespace) -> int:
    import warnings

    from ..weights import DEFAULT_MODELS_DIR, check_present, export_models

    models = args.models or DEFAULT_MODELS_DIR
    if args.model:
        check_present(args.model, models)
    formats = ("torchscript", "onnx") if args.format == "both" else (args.format,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, path in export_models(models, args.out, formats, keys=args.model).items():
            print(f"{name}: {path}")
    return 0
