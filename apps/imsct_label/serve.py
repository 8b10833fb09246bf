"""Start the IMSCT MONAI Label server, listening on the loopback interface unless told otherwise.

    python apps/imsct_label/serve.py --studies DIR|URL [--demo-cases N] [--token-file PATH] [--allow-origin URL]
                                     [monailabel start_server options]
    python apps/imsct_label/serve.py --orthanc DIR [--orthanc-port N] [--store-bids BIDS] [--demo-cases N] [...]

It runs ``monailabel start_server --app apps/imsct_label --studies DIR`` with ``--host 127.0.0.1``
added when no ``--host``/``-i`` is given (``monailabel`` itself defaults to ``0.0.0.0``, every
interface). ``--demo-cases N`` first fills an empty DIR with N phantom cases in the app's
convention (``DIR/<id>.nii.gz`` T2w, ``DIR/T1w/<id>.nii.gz`` Gd-T1w); ``make serve-nifti`` uses it
(a NIfTI folder: 3D Slicer works on it, OHIF does not: it needs DICOMweb).

``--orthanc DIR`` (``make serve``) starts a local Orthanc instead (:mod:`imsct.orthanc`: 127.0.0.1,
``--orthanc-port``, else the port of the last run in DIR when free, else a free one; storage in ``DIR/db``), stores studies in it as DICOM written by
:mod:`imsct.dicom` (series in their acquisition plane): every ``--store-bids BIDS`` folder, and
with ``--demo-cases N`` N phantom cases (``DIR/nifti``) when Orthanc holds no T2w series yet; then
serves the app on Orthanc's DICOMweb root. OHIF at ``http://127.0.0.1:PORT/ohif/`` reads Orthanc
through the app, and its MONAI Label panel is set to this server (``lib/web.py``). The app's DICOM
cache and served weights go under ``DIR`` too (``DIR/cache``, ``DIR/.imsct``) unless given. Stopping
the server (Ctrl-C, SIGTERM) stops Orthanc; Orthanc also gets SIGTERM should this process be killed.

Access: with a token (``--token-file PATH``, created with a random token when missing, or the
environment variable ``IMSCT_LABEL_TOKEN``) every route requires it (``lib/auth.py``), on any
address. A ``--host`` other than loopback without a token is refused unless ``--insecure-no-token``
is given (or MONAI Label's own Keycloak authentication is enabled, MONAI_LABEL_AUTH_ENABLE=true).
A token is never taken from the command line, where ``ps`` shows it to every user.

Web pages: requests from another web origin than the server's own are refused (HTTP 403,
``lib/web.py``), with or without a token, unless the origin is given with ``--allow-origin URL``
(repeatable; the same as ``--conf allow_origin URL[,URL]``), e.g. a viewer served elsewhere.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"
DEFAULT_ASGI_APP = "monailabel.app:app"


def server_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's own options, and the ``monailabel`` command line they stand for."""
    ap = argparse.ArgumentParser(prog="serve.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                 epilog="Other options (--port, --host, --conf KEY VALUE, ...) go to monailabel start_server.")
    ap.add_argument("--studies", help="datastore: a folder, or a DICOMweb URL (or --orthanc)")
    ap.add_argument("--orthanc", metavar="DIR", help="start a local Orthanc with its storage in DIR, store the studies "
                                                     "in it as DICOM and serve the app on its DICOMweb root (what OHIF needs)")
    ap.add_argument("--orthanc-port", type=int, metavar="N", help="with --orthanc: Orthanc's HTTP port (default: the last run's when free, else a free one)")
    ap.add_argument("--store-bids", action="append", default=[], metavar="BIDS",
                    help="with --orthanc: convert this BIDS folder's T2w + T1w (sub-*/[ses-*/]anat) to DICOM and store it "
                         "in Orthanc before serving (repeatable)")
    ap.add_argument("--demo-cases", type=int, default=0,
                    help="fill an empty studies folder with N phantom cases first (with --orthanc: store N phantom cases "
                         "when Orthanc holds no T2w series)")
    ap.add_argument("--demo-seed", type=int, default=7)
    ap.add_argument("--demo-max-voxels", type=int, default=6_000_000, help="largest T2w matrix of a demo phantom")
    ap.add_argument("--token-file", help=f"require the access token kept in this file on every route (a missing file is "
                                         f"created with a random token, mode 0600); or set {_auth().TOKEN_ENV}")
    ap.add_argument("--insecure-no-token", action="store_true",
                    help="allow a network --host without a token (a trusted, isolated network only)")
    ap.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                    help="a web origin (scheme://host[:port]) besides the server's own whose pages may use the server "
                         "(repeatable; --conf allow_origin URL[,URL] is the same)")
    own, rest = ap.parse_known_args(argv)
    if not own.studies and not own.orthanc:
        ap.error("give the datastore: --studies DIR|URL, or --orthanc DIR (a local Orthanc, what OHIF needs)")
    if own.studies and own.orthanc:
        ap.error("--studies and --orthanc exclude each other (with --orthanc the studies are the local Orthanc's)")
    if not own.orthanc and (own.orthanc_port is not None or own.store_bids):
        ap.error("--orthanc-port and --store-bids go with --orthanc DIR")
    if own.orthanc_port is not None and not 0 < own.orthanc_port < 65536:
        ap.error(f"--orthanc-port {own.orthanc_port}: not a TCP port (1-65535)")
    if own.demo_cases < 0 or own.demo_max_voxels < 1:
        ap.error("--demo-cases and --demo-max-voxels must not be negative")
    if any(a == "--token" or a.startswith("--token=") for a in rest):
        ap.error(f"a token on the command line is visible to every user (ps); put it in a file (--token-file PATH) "
                 f"or the environment variable {_auth().TOKEN_ENV}")
    if own.allow_origin:
        if any(a == "allow_origin" and rest[i - 1] == "--conf" for i, a in enumerate(rest) if i):
            ap.error("give the allowed web origins once: --allow-origin or --conf allow_origin")
        rest = [*rest, "--conf", "allow_origin", ",".join(own.allow_origin)]
    if given_host(rest) is None:
        rest = [*rest, "--host", LOOPBACK]
    if own.orthanc:
        base = Path(own.orthanc).resolve()
        for key, sub in (("models_dir", "models"), ("state_dir", "state")):  # the demo's files stay in its folder
            if given_conf(rest, key) is None:
                rest = [*rest, "--conf", key, str(base / ".imsct" / sub)]
    # with --orthanc, the studies (Orthanc's DICOMweb URL) are known once it runs: see with_studies()
    return own, ["monailabel", "start_server", "--app", str(APP_DIR), "--studies", own.studies or "", *rest]


STUDIES_AT = 5  # index of the datastore in the command line server_argv returns


def with_studies(cmd: list[str], studies: str) -> list[str]:
    return [*cmd[:STUDIES_AT], studies, *cmd[STUDIES_AT + 1:]]


def given_conf(rest: list[str], key: str) -> str | None:
    """The value of ``--conf KEY VALUE`` among ``monailabel start_server`` options (the last one), None without."""
    found = None
    for i, a in enumerate(rest[:-2]):
        if a == "--conf" and rest[i + 1] == key:
            found = rest[i + 2]
    return found


def given_host(rest: list[str]) -> str | None:
    """The ``--host`` among ``monailabel start_server`` options (its spellings ``-i X``, ``-iX``,
    ``--host=X``, ``--ho X``; the last one counts), None when there is none."""
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ap.add_argument("-i", "--host", "--hos", "--ho", dest="host")
    return ap.parse_known_args(rest)[0].host


def make_demo(studies: str | Path, cases: int, seed: int = 7, max_voxels: int = 6_000_000) -> list[str]:
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
        # lesion cases in the appearance the shipped weights were trained on
        case = generate_case(seed, i, max_voxels=max_voxels, healthy_fraction=0.0, random_intensity_fraction=0.0,
                             acquisition="sagittal", storage="int16")
        nib.save(case.t1, root / "T1w" / f"{case.subject}.nii.gz")  # the T1w first: a listed image is always complete
        nib.save(case.t2, root / f"{case.subject}.nii.gz")
        ids.append(case.subject)
    return ids


def start_orthanc(own: argparse.Namespace):
    """The local Orthanc of ``--orthanc DIR``, started, with ``--store-bids`` folders and the demo cases
    stored in it as DICOM (:mod:`imsct.dicom`). Returns ``(orthanc, what was stored, in words)``.
    Raises ``OrthancError`` (not installed, port taken, did not start) or ``InputError`` (a BIDS
    folder), naming the problem; Orthanc is stopped then."""
    from imsct.dicom import T2W_DESCRIPTION, bids_to_dicom, write_study
    from imsct.orthanc import LocalOrthanc, OrthancError, missing_reason

    reason = missing_reason()
    if reason:
        raise OrthancError(f"--orthanc needs Orthanc with its DICOMweb plugin: {reason}")
    base = Path(own.orthanc)
    port = own.orthanc_port or LocalOrthanc.previous_port(base)  # else a free one
    orthanc = LocalOrthanc(base, port=port).start()
    try:
        notes = []
        for bids in own.store_bids:
            studies = bids_to_dicom(bids, base / "dicom")
            for study in studies:
                orthanc.store(study.files)
            notes.append(f"{len(studies)} study(ies) from {bids}")
        if own.demo_cases:
            have_t2 = any(d.strip().lower() == T2W_DESCRIPTION.lower() for d in orthanc.series_descriptions())
            if have_t2:
                notes.append("demo cases not added (Orthanc already holds T2w series)")
            else:
                nifti = base / "nifti"
                make_demo(nifti, own.demo_cases, own.demo_seed, own.demo_max_voxels)
                ids = sorted(p.name[: -len(".nii.gz")] for p in nifti.glob("*.nii.gz"))[: own.demo_cases]
                for case_id in ids:
                    study = write_study(nifti / f"{case_id}.nii.gz", nifti / "T1w" / f"{case_id}.nii.gz",
                                        base / "dicom" / case_id, case_id)
                    orthanc.store(study.files)
                notes.append(f"{len(ids)} phantom case(s) from {nifti}")
        return orthanc, "; ".join(notes) or "nothing added"
    except BaseException:
        orthanc.stop()
        raise


@functools.cache
def _auth():
    """lib/auth.py, loaded by file: the app's ``lib`` package is not importable from here under that name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("imsct_label_auth", APP_DIR / "lib" / "auth.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_token(own: argparse.Namespace, environ) -> str | None:
    """The access token from ``--token-file`` or ``IMSCT_LABEL_TOKEN`` (None without either); a file
    that is missing is created. Raises ``TokenError`` naming the file and the problem."""
    auth = _auth()
    env_name = auth.TOKEN_ENV
    if own.token_file and environ.get(env_name):
        raise auth.TokenError(f"both --token-file and {env_name} are given; use one")
    if own.token_file:
        token, created = auth.load_or_create_token(own.token_file)
        where = os.path.abspath(own.token_file)
        print(f"access token: {'created' if created else 'read from'} {where}", flush=True)
        warning = auth.loose_permissions(where)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        return token
    if environ.get(env_name):
        return auth.check_token(environ[env_name], env_name)
    return None


def refusal(args: argparse.Namespace, token: str | None, insecure: bool, monai_auth: bool) -> str:
    """Why the server must not start with ``monailabel start_server`` options ``args`` ('' when it may)."""
    if token and insecure:
        return "--insecure-no-token was given together with a token; drop one"
    if token and monai_auth:
        return "MONAI_LABEL_AUTH_ENABLE=true (Keycloak) and an IMSCT access token exclude each other; use one"
    if token and (args.workers or 1) > 1:
        return f"--workers {args.workers}: the worker processes would not check the access token; use one worker"
    if token and args.uvicorn_app != DEFAULT_ASGI_APP:
        return f"--uvicorn_app {args.uvicorn_app}: the access token guards {DEFAULT_ASGI_APP} only"
    if token or monai_auth or insecure or _auth().is_loopback(args.host):
        return ""
    return (f"refusing to listen on {args.host}, reachable from the network, without an access token: anyone who "
            f"reaches it could read and change the studies and the models. Give --token-file PATH (a missing file "
            f"is created with a random token, mode 0600) or set {_auth().TOKEN_ENV}; or listen on {LOOPBACK} (no --host); "
            f"or --insecure-no-token on a trusted, isolated network")


def _stop_if(why: str) -> None:
    if why:
        print(f"serve.py: {why}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    own, cmd = server_argv(sys.argv[1:] if argv is None else argv)
    if own.orthanc:
        from imsct.orthanc import missing_reason

        missing = missing_reason()
        _stop_if(missing and f"--orthanc needs Orthanc with its DICOMweb plugin: {missing}")  # at once
    if own.orthanc:  # the app's copies of the DICOM series stay in the demo folder (read when settings load)
        for name in ("MONAI_LABEL_DICOMWEB_CACHE_PATH", "MONAI_LABEL_DATASTORE_CACHE_PATH"):
            if not os.environ.get(name):
                os.environ[name] = str(Path(own.orthanc).resolve() / "cache")
    try:
        token = read_token(own, os.environ)
    except ValueError as exc:  # TokenError
        sys.exit(f"serve.py: {exc}")
    os.environ.pop(_auth().TOKEN_ENV, None)  # not handed down to training subprocesses
    from monailabel.config import settings

    monai_auth = bool(settings.MONAI_LABEL_AUTH_ENABLE)
    early = argparse.Namespace(host=given_host(cmd[2:]), workers=None, uvicorn_app=DEFAULT_ASGI_APP)
    _stop_if(refusal(early, token, own.insecure_no_token, monai_auth))  # at once, before loading the app
    orthanc = None
    if own.orthanc:
        from imsct.io import InputError
        from imsct.orthanc import OrthancError

        try:
            orthanc, stored = start_orthanc(own)
        except (OrthancError, InputError) as exc:
            _stop_if(str(exc))
        print(f"Orthanc (DICOMweb {orthanc.dicomweb_url}, storage {orthanc.workdir / 'db'}, log {orthanc.log_path}): "
              f"{stored}", flush=True)
        cmd = with_studies(cmd, orthanc.dicomweb_url)
    from monailabel.main import Main

    class GuardedMain(Main):
        def action_start_server(self, args):  # the options exactly as monailabel parsed them
            _stop_if(refusal(args, token, own.insecure_no_token, monai_auth))
            where = f"{'https' if args.ssl_certfile else 'http'}://{args.host}:{args.port}"
            if orthanc is not None:
                studies = orthanc.study_uids()
                first = f"; a study directly: {where}/ohif/monai-label?StudyInstanceUIDs={studies[0]}" if studies else ""
                print(f"OHIF: {where}/ohif/ lists the {len(studies)} study(ies) in Orthanc: open one in the 'MONAI Label' "
                      f"mode, its panel is set to {where}/ (press the connect button beside it){first}", flush=True)
            print(f"3D Slicer (MONAI Label module): server {where}/", flush=True)
            if own.demo_cases and orthanc is None:
                written = make_demo(own.studies, own.demo_cases, own.demo_seed, own.demo_max_voxels)
                print(f"demo datastore {own.studies}: {len(written)} phantom case(s) written" if written
                      else f"demo datastore {own.studies}: kept as it is", flush=True)
            if token:
                from monailabel.app import app

                _auth().protect(app, token)
                print(f"access token required on every route (Authorization: Bearer, or log in at "
                      f"http://{args.host}:{args.port}/auth/login for OHIF)", flush=True)
            elif not _auth().is_loopback(args.host):
                print(f"warning: listening on {args.host} WITHOUT an access token (--insecure-no-token or MONAI Label's "
                      f"own authentication)", file=sys.stderr, flush=True)
            return super().action_start_server(args)

    sys.argv = cmd
    try:
        GuardedMain().run()  # returns when the web server stops (Ctrl-C, SIGTERM)
    finally:
        if orthanc is not None:
            orthanc.stop()
            print("Orthanc stopped", flush=True)


if __name__ == "__main__":
    main()
