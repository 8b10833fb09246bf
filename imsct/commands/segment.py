"""``imsct segment``: one case, the Spinal Cord Toolbox's output names (``sct_deepseg tumor_edema_cavity_t1_t2``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

HELP = ("Segment tumour, edema and cavity on one T2w + Gd-T1w pair, or every case of a BIDS folder; "
        "writes SCT-named masks on the T2w grid.")
EXAMPLE = ("imsct segment --t2 sub-001_T2w.nii.gz --t1 sub-001_T1w.nii.gz -o seg/ --probabilities --morphometrics\n"
           "  imsct segment --t2 sub-001_T2w.nii.gz --t2-only --remove-small tumor=0.1,edema=0.3\n"
           "  imsct segment --bids study/ --jobs 2            # into study/derivatives/imsct/sub-*/anat/")

STAGES = ("load + resample", "localise cord", "segment", "post-process + save")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--t2", metavar="T2W", help="T2-weighted image (NIfTI); outputs are on its grid")
    parser.add_argument("--bids", metavar="DIR",
                        help="instead of --t2/--t1: every sub-*/[ses-*/]anat/*_T2w of a BIDS folder with its T1w, into BIDS "
                             "derivatives (-o, default DIR/derivatives/imsct) with dataset_description.json and imsct_volumes.csv")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="with --bids: cases segmented in parallel (processes)")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --bids: redo cases whose outputs are complete and newer than their inputs (skipped otherwise)")
    parser.add_argument("--t1", metavar="T1W", help="gadolinium-enhanced T1-weighted image (NIfTI); any grid overlapping the T2w")
    parser.add_argument("-o", "--output", metavar="DIR", help="output folder (default: the T2w's folder)")
    parser.add_argument("--models", metavar="DIR", help="models folder (default: the shipped bundle/models; see imsct.weights)")
    parser.add_argument("--thr", type=float, default=0.5, help="probability threshold (default 0.5)")
    parser.add_argument("--remove-small", metavar="CM3",
                        help="drop components smaller than this (cm3): one value for every class or per class, "
                             "e.g. tumor=0.2,edema=0.5 (default tumor 0.2, edema 0.5, cavity 0.5)")
    parser.add_argument("--no-fill-holes", action="store_true", help="do not fill holes in the masks")
    parser.add_argument("--no-cord-constraint", action="store_true",
                        help="keep lesions outside the cord region too (default: a lesion must overlap stage 1's cord "
                             "region dilated by 5 mm, since intramedullary lesions lie inside the cord)")
    parser.add_argument("--no-anatomy", action="store_true",
                        help="skip the tight cord mask and the vertebral levels (the anatomy network): faster")
    parser.add_argument("--probabilities", action="store_true",
                        help="also save per-class probability maps <name>_prob-<class>.nii.gz (float32, T2w grid)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="network arithmetic: auto (default) = bfloat16 where the CPU/GPU runs it natively "
                             "(about 2x faster, same masks on phantoms), else float32")
    parser.add_argument("--t2-only", action="store_true", help="no T1w: use the T2w-only stage-2 model")
    parser.add_argument("--register-t1", action="store_true", help="align the T1w onto the T2w (rigid, ITK) before segmenting")
    parser.add_argument("--morphometrics", action="store_true", help="also write <name>_morphometrics.csv and .json")
    parser.add_argument("--levels", metavar="JSON",
                        help="vertebral levels for the morphometrics, implies --morphometrics ({\"vertebrae\": "
                             "[{level, z_top_mm, z_bottom_mm}]} in world mm; a phantom's *_phantom.json works)")
    parser.add_argument("--disc-label", metavar="NIFTI",
                        help="one intervertebral disc you identified: an image (any grid) with one voxel, or a small blob, "
                             "valued by the disc's number as in the Spinal Cord Toolbox (3 = C2/C3, 8 = C7/T1); the vertebral "
                             "levels are numbered from it (as sct_label_vertebrae -initlabel)")
    parser.add_argument("--progress", action="store_true", help="show progress bars even when stderr is not a terminal")


def parse_remove_small(text: str | None) -> dict[str, float] | None:
    """``"0.3"`` -> every class 0.3 cm3; ``"tumor=0.2,edema=0.5"`` -> those classes (others default)."""
    from ..io import InputError
    from ..labels import LABELS

    if text is None:
        return None
    malformed = f"--remove-small {text}: expected a number or class=number pairs such as tumor=0.2,edema=0.5"
    if "=" not in text:
        pairs = [(name, text) for name in LABELS]
    else:
        pairs = [tuple(s.strip() for s in part.split("=", 1)) for part in filter(None, (p.strip() for p in text.split(",")))]
    out: dict[str, float] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise InputError(malformed)
        name, value = pair
        if name not in LABELS:
            raise InputError(f"--remove-small {text}: unknown class '{name}' (choose from {', '.join(LABELS)})")
        try:  # only the number: InputError is itself a ValueError and must not be reworded
            out[name] = float(value)
        except ValueError:
            raise InputError(malformed) from None
    bad = [k for k, v in out.items() if not v >= 0 or v == float("inf")]
    if bad:
        raise InputError(f"--remove-small {text}: volumes must be finite and >= 0 ({', '.join(bad)})")
    return out


def _check_device(device: str) -> None:
    from ..io import InputError

    if device == "cpu":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device}: not a torch device (cpu, cuda, cuda:0, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


@contextlib.contextmanager
def stage_progress(enabled: bool):
    """A tqdm bar over the cascade's stages on stderr; yields the ``on_stage`` hook for the cascade's call."""
    from tqdm import tqdm

    bar = tqdm(total=len(STAGES), desc=STAGES[0], file=sys.stderr, disable=not enabled, unit="stage", leave=True)

    def advance(to: int) -> None:
        if bar.n < to:
            bar.update(to - bar.n)
            bar.set_description(STAGES[min(to, len(STAGES) - 1)])

    index = {"localise": 1, "segment": 2, "postprocess": 3, "anatomy": 3, "done": 3}
    try:
        yield (lambda stage: advance(index[stage])) if enabled else None
        advance(len(STAGES))
    finally:
        bar.close()


def read_disc_label_file(path: str):
    """``--disc-label``: the (world point, disc number) of the one disc in the file."""
    from ..io import InputError, load_volume
    from ..levels import read_disc_label

    vol = load_volume(Path(path), "disc label")
    try:
        return read_disc_label(vol.data, vol.affine, str(path))
    except ValueError as exc:
        raise InputError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    import time

    from ..io import InputError, check_writable_folder, load_image, strip_nifti_ext

    t_start = time.perf_counter()
    if args.bids:
        return _run_bids(args, t_start)
    if not args.t2:
        raise InputError("no input: give --t2 FILE (with --t1 FILE or --t2-only), or --bids DIR")

    t2 = Path(args.t2)
    if not t2.is_file():
        raise InputError(f"T2w {t2}: file not found")
    t1 = None
    if args.t2_only:
        ignored = [f"T1w {args.t1}"] * bool(args.t1) + ["--register-t1"] * bool(args.register_t1)
        if ignored:
            print(f"imsct segment: --t2-only: ignoring {' and '.join(ignored)}", file=sys.stderr)
    elif not args.t1:
        raise InputError(f"T2w {t2}: no T1w given; pass --t1 FILE, or --t2-only to segment with the T2w-only model")
    else:
        t1 = Path(args.t1)
        if not t1.is_file():
            raise InputError(f"T1w {t1}: file not found; pass the Gd-T1w with --t1, or use --t2-only to segment without it")
    if not 0.0 < args.thr < 1.0:
        raise InputError(f"--thr {args.thr}: must be between 0 and 1")
    min_volume = parse_remove_small(args.remove_small)
    _check_device(args.device)
    levels = None
    if args.levels:
        from ..morphometrics import load_levels

        levels = load_levels(args.levels)
    if args.disc_label and args.no_anatomy:
        raise InputError(f"--disc-label {args.disc_label}: numbers the levels the anatomy network finds; not with --no-anatomy")
    disc_label = read_disc_label_file(args.disc_label) if args.disc_label else None
    # the output folder before anything is read or computed: a file there, a read-only or full disk
    # is reported at once, not after the segmentation
    out_dir = check_writable_folder(Path(args.output) if args.output else t2.parent)
    from ..weights import CASCADE_MODELS, check_present

    models = check_present(CASCADE_MODELS[args.t2_only], args.models)
    # read (and check) the images once, before loading the models: bad input fails in about a second
    t2_vol = load_image(t2, "T2w")
    t1_vol = load_image(t1, "T1w") if t1 is not None else None

    from ..labels import output_paths

    name = strip_nifti_ext(t2.name)
    inputs = {p.resolve() for p in (t2, t1) if p is not None}
    planned = list(output_paths(name, out_dir, args.probabilities).values())
    clash = [p for p in planned if p.resolve() in inputs]
    if clash:
        raise InputError(f"output {clash[0]}: would overwrite an input; choose another folder with -o")

    from ..cascade import Cascade
    from ..inference import segment_volumes

    cascade = Cascade.from_models(models, t2_only=args.t2_only, device=args.device, precision=args.precision,
                                  threshold=args.thr, min_volume_cm3=min_volume, fill_holes=not args.no_fill_holes,
                                  cord_constraint=not args.no_cord_constraint, with_anatomy=not args.no_anatomy)
    startup_s = time.perf_counter() - t_start  # checks, reading the images, imports, loading the networks
    show = args.progress or sys.stderr.isatty()
    with stage_progress(show) as on_stage:
        info = segment_volumes(cascade, t2_vol, t1_vol, out_dir, name, probabilities=args.probabilities,
                               register_t1=args.register_t1 and t1_vol is not None, on_stage=on_stage, progress=show,
                               extra={"command": getattr(args, "command_line", None)}, disc_label=disc_label)

    outputs = {k: Path(v) for k, v in info["outputs"].items()}
    if args.morphometrics or levels is not None:
        import nibabel as nib
        import numpy as np

        from ..morphometrics import measure, write_tables

        img = nib.load(str(outputs["labelmap"]))
        cord = level_map = None
        if "cord" in outputs:  # the anatomy network's cord and levels: lengths along the cord, levels from the image
            cord = np.asarray(nib.load(str(outputs["cord"])).dataobj) > 0
            cord = cord if cord.any() else None
            if levels is None:
                level_map = np.asarray(nib.load(str(outputs["levels"])).dataobj)
        result = measure(np.asarray(img.dataobj), img.affine, levels, cord=cord, level_map=level_map)
        outputs["morphometrics-csv"], outputs["morphometrics-json"] = write_tables(result, out_dir / f"{name}_morphometrics")

    if not info.get("cord_found", True):
        print(f"imsct segment: warning: no spinal cord found on {t2}; the whole field was segmented"
              + ("" if args.no_cord_constraint or info.get("cord_constraint") else " and the cord constraint not applied"), file=sys.stderr)
    print(f"T2w {t2.resolve()}" + (f"\nT1w {t1.resolve()}" if t1 is not None else " (T2w-only model)"))
    reg = info.get("t1_registration")
    if reg:
        t = [row[3] for row in reg.get("transform", [[0] * 4] * 3)[:3]]
        print(f"T1w registered onto T2w ({reg.get('metric', 'metric')} {reg.get('metric_value', float('nan')):.4g}; "
              f"translation {', '.join(f'{v:.1f}' for v in t)} mm; {reg.get('seconds', 0):.1f} s)")
    print("outputs:")
    width = max(len(k) for k in outputs)
    for k, p in outputs.items():
        print(f"  {k:<{width}}  {p.resolve()}")
    vols = ", ".join(f"{k} {v:.3f}" for k, v in info["volumes_cm3"].items())
    if not any(v > 0 for v in info["volumes_cm3"].values()):
        # an empty answer is a valid answer: empty masks were written, and the run succeeded
        print("no lesion found: " + ", ".join(f"{k} 0.00 cm3" for k in info["volumes_cm3"]))
    print(f"volumes (cm3): {vols}")
    lv = info.get("levels")
    if lv is not None:
        span = f"{lv['levels'][0]} to {lv['levels'][-1]}" if lv["levels"] else "none"
        print(f"vertebral levels: {span} ({len(lv['discs'])} discs, numbered by {lv['method']}"
              + ("" if lv["certain"] else ", uncertain") + ")")
        for note in lv["notes"]:
            print(f"imsct segment: note: {note}", file=sys.stderr)
    if info.get("t1_missing"):
        m = info["t1_missing"]
        print(f"imsct segment: warning: the T1w does not cover {m['share_of_cord_region']:.0%} of the cord region "
              f"(z {m['z_range_mm'][0]:.0f} to {m['z_range_mm'][1]:.0f} mm); no lesion is called there", file=sys.stderr)
    print(f"time: {info['seconds']:.1f} s for the case (start-up before it: {startup_s:.1f} s, reading the images, "
          f"loading the networks on {cascade.backend})")
    return 0


def _run_bids(args: argparse.Namespace, t_start: float) -> int:
    """``--bids DIR``: :func:`imsct.batch.segment_dataset`, one line per case, the summary, honest wall time."""
    import time

    from ..batch import SUMMARY, segment_dataset
    from ..io import InputError

    for flag in ("t2", "t1", "register_t1", "morphometrics", "levels"):
        if getattr(args, flag, None):
            raise InputError(f"--bids {args.bids}: --{flag.replace('_', '-')} applies to one case; not with --bids")
    if args.jobs < 1:
        raise InputError(f"--jobs {args.jobs}: must be 1 or more")
    if not 0.0 < args.thr < 1.0:
        raise InputError(f"--thr {args.thr}: must be between 0 and 1")
    _check_device(args.device)
    kw = {"models_dir": args.models, "t2_only": args.t2_only, "device": args.device, "precision": args.precision,
          "threshold": args.thr, "min_volume_cm3": parse_remove_small(args.remove_small),
          "fill_holes": not args.no_fill_holes, "cord_constraint": not args.no_cord_constraint,
          "with_anatomy": not args.no_anatomy}
    results = segment_dataset(args.bids, args.output, kw, jobs=args.jobs, overwrite=args.overwrite,
                              probabilities=args.probabilities, extra={"command": getattr(args, "command_line", None)})
    out_root = Path(args.output) if args.output else Path(args.bids) / "derivatives" / "imsct"
    counts = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "failed")}
    wall = time.perf_counter() - t_start
    print(f"{len(results)} case(s): {counts['written']} written, {counts['skipped']} up to date, {counts['failed']} failed; "
          f"summary {(out_root / SUMMARY).resolve()}")
    print(f"time: {wall:.1f} s wall, start-up included ({args.jobs} job(s))")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        lines = "\n".join(f"  {r.name}: {r.error}" for r in failed)
        print(f"imsct segment: {len(failed)} of {len(results)} case(s) failed:\n{lines}", file=sys.stderr)
        return 1
    return 0
