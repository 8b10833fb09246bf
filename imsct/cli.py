"""The ``imsct`` console command: one entry point, one sub-command per job.

Each sub-command lives in ``imsct/commands/<name>.py`` and provides ``HELP`` (one line),
``EXAMPLE`` (shown under ``--help``), ``add_arguments(parser)`` and ``run(args) -> int``. Heavy
imports stay inside ``run`` so that ``imsct --help`` answers at once.

Exit codes: 0 success, 1 the job failed on some input or could not write its outputs (each failure
printed), 2 bad usage or bad input (one line naming the file and the problem).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .io import InputError, WriteError

COMMANDS = ("segment", "morphometrics", "compare", "qc", "phantoms", "dicom", "export")


def build_parser() -> argparse.ArgumentParser:
    mods = {name: importlib.import_module(f"imsct.commands.{name}") for name in COMMANDS}
    parser = argparse.ArgumentParser(
        prog="imsct",
        description="Intramedullary spinal cord tumour segmentation (tumour, edema, cavity) on T2w + Gd-T1w MRI.",
        epilog="examples:\n" + "\n".join(f"  {m.EXAMPLE.splitlines()[0]}" for m in mods.values())
        + "\n\nRun 'imsct <command> --help' for the options and more examples of each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"imsct {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, mod in mods.items():
        p = sub.add_parser(
            name, help=mod.HELP, description=mod.HELP, epilog=f"example:\n  {mod.EXAMPLE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    import shlex

    args.command_line = "imsct " + shlex.join(argv)  # for the outputs' provenance
    try:
        return int(args._run(args) or 0)
    except InputError as exc:
        print(f"imsct {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except WriteError as exc:  # full disk, read-only folder: the job failed, earlier outputs are intact
        print(f"imsct {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"imsct {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
