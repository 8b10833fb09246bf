"""Start the IMSCT MONAI Label server, listening on the loopback interface unless told otherwise.

    python apps/imsct_label/serve.py --studies DIR [--demo-cases N] [monailabel start_server options]

It runs ``monailabel start_server --app apps/imsct_label --studies DIR`` with ``--host 127.0.0.1``
added when no ``--host``/``-i`` is given (``monailabel`` itself defaults to ``0.0.0.0``, every
interface). ``--demo-cases N`` first fills an empty DIR with N phantom cases in the app's
convention (``DIR/<id>.nii.gz`` T2w, ``DIR/T1w/<id>.nii.gz`` Gd-T1w); ``make serve`` uses it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"


def server_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's own options, and the ``monailabel`` command line they stand for."""
    ap = argparse.ArgumentParser(prog="serve.py", description=__doc__.split("\n\n")[0],
                                 epilog="Other options (--port, --host, --conf KEY VALUE, ...) go to monailabel start_server.")
    ap.add_argument("--studies", required=True, help="datastore: a folder, or a DICOMweb URL")
    ap.add_argument("--demo-cases", type=int, default=0, help="fill an empty studies folder with N phantom cases first")
    ap.add_argument("--demo-seed", type=int, default=7)
    own, rest = ap.parse_known_args(argv)
    if not any(a in ("--host", "-i") or a.startswith("--host=") for a in rest):
        rest = [*rest, "--host", LOOPBACK]
    return own, ["monailabel", "start_server", "--app", str(APP_DIR), "--studies", own.studies, *rest]


def make_demo(studies: str | Path, cases: int, seed: int = 7) -> list[str]:
    """Write ``cases`` phantom cases into ``studies`` in the app's layout, unless it already holds
    images. Returns the image ids written."""
    import nibabel as nib

    from imsct.phantoms import generate_case

    root = Path(studies)
    if any(root.glob("*.nii.gz")) or any(root.glob("*.nii")):
        return []
    (root / "T1w").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(cases):
        case = generate_case(seed, i)
        nib.save(case.t1, root / "T1w" / f"{case.subject}.nii.gz")  # the T1w first: a listed image is always complete
        nib.save(case.t2, root / f"{case.subject}.nii.gz")
        ids.append(case.subject)
    return ids


def main(argv: list[str] | None = None) -> None:
    own, cmd = server_argv(sys.argv[1:] if argv is None else argv)
    if own.demo_cases:
        written = make_demo(own.studies, own.demo_cases, own.demo_seed)
        print(f"demo datastore {own.studies}: {len(written)} phantom case(s) written" if written else f"demo datastore {own.studies}: kept as it is")
    from monailabel.main import Main

    sys.argv = cmd
    Main().run()


if __name__ == "__main__":
    main()
