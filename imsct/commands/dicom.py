"""``imsct dicom``: a BIDS folder of T2w + Gd-T1w NIfTI as DICOM MR studies, optionally stored by STOW-RS.

Each series is written in its acquisition plane, one instance per acquired slice: the slices run
along the voxel axis with the largest spacing (the NIfTI's third axis for isotropic data); see
:func:`imsct.dicom.slice_axis`."""

from __future__ import annotations

HELP = ("Convert a BIDS folder of T2w + Gd-T1w NIfTI (e.g. phantoms) to DICOM MR studies, one instance per acquired slice "
        "(slices along the axis with the largest voxel spacing; the third for isotropic images); optionally store them in a DICOMweb server.")
EXAMPLE = ("imsct dicom data/phantoms --out data/phantoms-dicom\n"
           "  imsct dicom data/phantoms --out data/phantoms-dicom --stow http://127.0.0.1:8042/dicom-web")


def add_arguments(parser) -> None:
    parser.add_argument("bids", help="BIDS folder with sub-*/[ses-*/]anat/sub-*_T2w.nii.gz and _T1w.nii.gz")
    parser.add_argument("--out", required=True, help="output folder: <out>/sub-XXX[/ses-YY]/{T2w,T1w_Gd}/*.dcm")
    parser.add_argument("--stow", metavar="URL", help="DICOMweb root to store the studies in (STOW-RS), "
                        "e.g. http://127.0.0.1:8042/dicom-web for Orthanc")
    parser.add_argument("--quiet", action="store_true", help="print nothing per study")


def run(args) -> int:
    import pydicom

    from ..dicom import bids_to_dicom
    from ..io import InputError

    client = None
    if args.stow:  # check the server first: nothing is converted for a server that is not there
        from dicomweb_client import DICOMwebClient

        client = DICOMwebClient(args.stow.rstrip("/"))
        try:
            client.search_for_studies(limit=1)
        except Exception as exc:
            raise InputError(f"{args.stow}: cannot reach the DICOMweb server ({type(exc).__name__})") from None
    studies = bids_to_dicom(args.bids, args.out)
    for s in studies:
        if client is not None:
            try:
                client.store_instances([pydicom.dcmread(f) for f in s.files])
            except Exception as exc:  # connection refused, HTTP error: name the server and the study
                raise InputError(f"{args.stow}: storing study {s.study_uid} of {s.patient_id} failed ({exc})") from None
        if not args.quiet:
            where = f", stored in {args.stow}" if client is not None else ""
            print(f"{s.patient_id}: study {s.study_uid} (T2w {s.t2_series_uid}, T1w Gd {s.t1_series_uid}){where}", flush=True)
    return 0
