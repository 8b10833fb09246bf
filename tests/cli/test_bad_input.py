"""Bad input, everywhere: one table of broken inputs fed to the three front doors.

* CLI: ``imsct segment`` (images) and ``imsct morphometrics`` (label maps), in process: exit 2 and one
  line on stderr naming the file and the problem; the output folder is left as it was.
* bundle: ONE ``monai.bundle run`` of ``configs/inference.json`` over a BIDS folder holding every bad
  image case and one good case: each bad case is reported by name with its problem, the good case
  is written, and earlier outputs of the bad cases and the dataset stay byte-for-byte the same.
* server: ONE MONAI Label server (apps/imsct_label) with a small datastore: every bad upload, label
  or inference gets HTTP 4xx with the message; the studies folder (datastore JSON, images, T1w,
  labels, served model weights) hashes the same afterwards, and the server still accepts a good upload.

Each kind is built with nibabel / gzip directly from one small phantom case.
"""

from __future__ import annotations

import gzip
import csv
import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from imsct.cli import main as imsct_main
from support.cases import LIKE_SHIPPED_TRAINING

BIG_LIMIT_MB = 4  # the server's --conf max_upload_mb in this file (MiB once decompressed)


# ---- the table ------------------------------------------------------------------------------------

def _save(data, affine, path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _empty(good: Path, out: Path, affine) -> Path:
    out.write_bytes(b"")
    return out


def _truncated(good: Path, out: Path, affine) -> Path:
    raw = good.read_bytes()
    out.write_bytes(raw[: len(raw) // 2])
    return out


def _not_nifti(good: Path, out: Path, affine) -> Path:
    with gzip.open(out, "wb") as fh:
        fh.write(b"patient notes, not an image\n" * 40)
    return out


def _flat(good: Path, out: Path, affine) -> Path:
    return _save(np.ones((10, 10), np.float32), affine, out)


def _four_d(good: Path, out: Path, affine) -> Path:
    return _save(np.ones((10, 10, 10, 3), np.float32), affine, out)


def _with(value):
    def build(good: Path, out: Path, affine) -> Path:
        data = np.asanyarray(nib.load(str(good)).dataobj).astype(np.float32)
        data[tuple(s // 2 for s in data.shape)] = value
        return _save(data, affine, out)
    return build


def _complex(good: Path, out: Path, affine) -> Path:
    data = np.asanyarray(nib.load(str(good)).dataobj).astype(np.float32)
    return _save((data + 1j * data).astype(np.complex64), affine, out)


def _constant(value):
    def build(good: Path, out: Path, affine) -> Path:
        return _save(np.full(nib.load(str(good)).shape, value, np.float32), affine, out)
    return build


def _slab(good: Path, out: Path, affine) -> Path:
    data = np.asanyarray(nib.load(str(good)).dataobj).astype(np.float32)
    return _save(data[..., data.shape[2] // 2 - 1 : data.shape[2] // 2 + 2], affine, out)  # 3 slices


def _zero_axis(good: Path, out: Path, affine) -> Path:
    return _save(np.zeros((0, 10, 10), np.float32), affine, out)


def _voxel(mm: float):
    def build(good: Path, out: Path, affine) -> Path:
        return _save(np.ones((10, 10, 10), np.float32), np.diag([mm, mm, mm, 1.0]), out)
    return build


@dataclass(frozen=True)
class Kind:
    name: str  # alphanumeric: also a BIDS subject label
    build: object  # (good file, destination, good affine) -> destination
    expect: str  # fragment of the message


IMAGE_KINDS = [
    Kind("empty", _empty, "file is empty"),
    Kind("truncated", _truncated, "truncated or corrupt"),
    Kind("notnifti", _not_nifti, "cannot be read as NIfTI"),
    Kind("flat", _flat, "expected a 3D image, got 2D"),
    Kind("fourd", _four_d, "expected a 3D image, got 4D"),
    Kind("nan", _with(np.nan), "NaN or infinite"),
    Kind("inf", _with(np.inf), "NaN or infinite"),
    Kind("zeroaxis", _zero_axis, "zero-size axis"),
    Kind("hugevoxel", _voxel(1e4), "absurd voxel size"),
    Kind("tinyvoxel", _voxel(0.005), "absurd voxel size"),
    Kind("complex", _complex, "complex-valued voxels"),
]
# images with nothing to segment; as label maps they are valid (an empty label map is an answer)
IMAGE_ONLY_KINDS = [
    Kind("blank", _constant(0.0), "every voxel is 0"),
    Kind("constant", _constant(500.0), "every voxel is 500"),
    Kind("slab", _slab, "only 3 slice(s) along one axis"),
]
ROLES = ("T2w", "T1w")
# kinds that need a second file or a server; which front doors check them is in each test below
OTHER_KINDS = {
    "t1far": "does not overlap",  # T1w 2 m away from the T2w in world space (cli, bundle, server)
    "not1": "T1w",  # the T1w is missing (cli, bundle, server)
    "labelgrid": "grid",  # label map not on the image's grid (cli morphometrics, server save_label)
    "labelvalues": "7",  # label map with a value that is no class (cli morphometrics, server save_label)
    "pathid": "plain name",  # image id / label tag with path components (server)
    "oversized": "413",  # upload above --conf max_upload_mb (server)
}


def _sha_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """One small phantom subject (BIDS) and its truth label map."""
    from imsct.phantoms import generate_case, write_case

    root = tmp_path_factory.mktemp("bad_input_phantom")
    paths = write_case(generate_case(606060, 0, max_voxels=300_000, **LIKE_SHIPPED_TRAINING), root / "bids")
    t2 = nib.load(str(paths["t2"]))
    lab = np.zeros(t2.shape, np.uint8)
    for value, suffix in ((1, "_seg-tumor"), (2, "_seg-edema"), (3, "_seg-cavity")):
        lab[np.asanyarray(nib.load(str(paths[suffix])).dataobj) > 0.5] = value
    paths["truth"] = _save(lab, t2.affine, root / "truth_seg-imsct.nii.gz")
    paths["affine"] = t2.affine
    return paths


def _far_t1(case, out: Path) -> Path:
    t1 = nib.load(str(case["t1"]))
    far = t1.affine.copy()
    far[:3, 3] += 2000.0
    return _save(np.asanyarray(t1.dataobj), far, out)


def _bad_labels(case, d: Path) -> dict[str, Path]:
    truth = nib.load(str(case["truth"]))
    lab = np.asanyarray(truth.dataobj)
    d.mkdir(parents=True, exist_ok=True)
    return {
        "labelgrid": _save(lab[:-2], truth.affine, d / "grid_seg-edema.nii.gz"),
        "labelvalues": _save(np.where(lab > 0, 7, 0).astype(np.uint8), truth.affine, d / "values_seg-imsct.nii.gz"),
    }


# ---- CLI ------------------------------------------------------------------------------------------

def _cli(capsys, argv) -> str:
    code = imsct_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def cli_out(tmp_path):
    """An output folder holding an earlier result, checked unchanged after each refused command."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier_seg-imsct.nii.gz").write_bytes(b"an earlier result")
    before = _sha_tree(out)
    yield out
    assert _sha_tree(out) == before


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("kind", IMAGE_KINDS + IMAGE_ONLY_KINDS, ids=lambda k: k.name)
def test_cli_segment_refuses_bad_image(kind, role, case, tmp_path, capsys, cli_out):
    bad = kind.build(case[role[:2].lower()], tmp_path / f"bad_{role}.nii.gz", case["affine"])
    t2, t1 = (bad, case["t1"]) if role == "T2w" else (case["t2"], bad)
    line = _cli(capsys, ["segment", "--t2", str(t2), "--t1", str(t1), "-o", str(cli_out)])
    assert f"{role} {bad}" in line and kind.expect in line, line


def test_cli_segment_refuses_missing_and_far_t1w(case, tmp_path, capsys, cli_out):
    gone = tmp_path / "gone_T1w.nii.gz"
    line = _cli(capsys, ["segment", "--t2", str(case["t2"]), "--t1", str(gone), "-o", str(cli_out)])
    assert str(gone) in line and "file not found" in line, line
    line = _cli(capsys, ["segment", "--t2", str(case["t2"]), "-o", str(cli_out)])
    assert str(case["t2"]) in line and "no T1w given" in line, line
    far = _far_t1(case, tmp_path / "far_T1w.nii.gz")  # refused by the cascade before stage 1
    line = _cli(capsys, ["segment", "--t2", str(case["t2"]), "--t1", str(far), "-o", str(cli_out)])
    assert str(far) in line and OTHER_KINDS["t1far"] in line, line


@pytest.fixture
def small_disk(tmp_path):
    """Mount a real tmpfs (64 KiB) for write-failure cases; ``small_disk(read_only)`` gives its path.
    Needs the right to mount (root in CI); elsewhere these cases skip, saying so."""
    import subprocess

    mounted = []

    def mount(read_only: bool = False) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        opts = "size=64k" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs for the write-failure case ({r.stderr.strip() or r.returncode}); run as root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_cli_segment_checks_the_output_before_computing(case, tmp_path, capsys, small_disk):
    args = ["segment", "--t2", str(case["t2"]), "--t1", str(case["t1"]), "-o"]
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    line = _cli(capsys, args + [str(a_file)])
    assert str(a_file) in line and "exists and is not a folder" in line, line
    line = _cli(capsys, args + [str(a_file / "sub")])
    assert str(a_file) in line and "is a file, not a folder" in line, line
    assert a_file.read_text() == "not a folder"
    read_only = small_disk(read_only=True)
    assert imsct_main(args + [str(read_only / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(read_only / "out") in err[0] and "cannot write there" in err[0] and "Read-only" in err[0], err


def test_cli_segment_on_a_full_disk_fails_in_one_line_and_keeps_earlier_outputs(case, capsys, small_disk):
    disk = small_disk()
    earlier = disk / "earlier_seg-imsct.nii.gz"
    earlier.write_bytes(b"an earlier result")
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # fill the disk: the folder can be created in, not written to
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    code = imsct_main(["segment", "--t2", str(case["t2"]), "--t1", str(case["t1"]), "-o", str(disk)])
    err = [l for l in capsys.readouterr().err.strip().splitlines() if "warning" not in l]
    assert code == 1, err
    assert len(err) == 1 and str(disk) in err[0] and "No space left on device" in err[0], err
    assert earlier.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in disk.iterdir()) == ["earlier_seg-imsct.nii.gz", "filler"]  # no partial or temporary file


@pytest.mark.parametrize("kind", IMAGE_KINDS, ids=lambda k: k.name)
def test_cli_morphometrics_refuses_bad_label_file(kind, case, tmp_path, capsys, cli_out):
    bad = kind.build(case["truth"], tmp_path / "bad_seg-imsct.nii.gz", case["affine"])
    line = _cli(capsys, ["morphometrics", "-i", str(bad), "-o", str(cli_out / "m")])
    assert str(bad) in line and kind.expect in line, line


def test_cli_morphometrics_refuses_bad_label_content(case, tmp_path, capsys, cli_out):
    bad = _bad_labels(case, tmp_path / "labels")
    tumour = tmp_path / "labels" / "good_seg-tumor.nii.gz"
    truth = nib.load(str(case["truth"]))
    _save((np.asanyarray(truth.dataobj) == 1).astype(np.uint8), truth.affine, tumour)
    line = _cli(capsys, ["morphometrics", "-i", str(tumour), str(bad["labelgrid"]), "-o", str(cli_out / "m")])
    assert str(bad["labelgrid"]) in line and "grid" in line, line
    line = _cli(capsys, ["morphometrics", "-i", str(bad["labelvalues"]), "-o", str(cli_out / "m")])
    assert str(bad["labelvalues"]) in line and "values must be integers from 0 to 3" in line and "7" in line, line


# ---- bundle ---------------------------------------------------------------------------------------

def test_bundle_reports_each_bad_case_and_keeps_earlier_outputs(case, tmp_path):
    from imsct.labels import CORD_SUFFIX, DISC_LABELS_SUFFIX, LEVELS_SUFFIX
    from support.cases import OUTPUT_SUFFIXES, run_bundle

    ds, out = tmp_path / "ds", tmp_path / "out"
    problems: dict[str, tuple[Path, str]] = {}

    def subject(name: str) -> tuple[Path, Path]:
        d = ds / name / "anat"
        d.mkdir(parents=True)
        t2, t1 = d / f"{name}_T2w.nii.gz", d / f"{name}_T1w.nii.gz"
        shutil.copy(case["t2"], t2)
        shutil.copy(case["t1"], t1)
        return t2, t1

    subject("sub-good")
    for kind in IMAGE_KINDS + IMAGE_ONLY_KINDS:
        for role in ROLES:
            name = f"sub-{kind.name}{role}"
            files = dict(zip(ROLES, subject(name)))
            kind.build(case[role[:2].lower()], files[role], case["affine"])
            problems[name] = (files[role], kind.expect)
    _, t1 = subject("sub-not1")
    t1.unlink()
    problems["sub-not1"] = (t1, "file not found")
    _, t1 = subject("sub-t1far")
    _far_t1(case, t1)
    problems["sub-t1far"] = (t1, OTHER_KINDS["t1far"])
    # a write failure (here a folder where one output file goes): that case fails, the others go on
    subject("sub-writefail")
    blocked = out / "sub-writefail" / "anat" / "sub-writefail_T2w_seg-tumor.nii.gz"  # BIDS derivatives layout
    blocked.mkdir(parents=True)
    problems["sub-writefail"] = (blocked, "is a folder")

    # outputs of an earlier run, for every case that now fails, must survive untouched
    out.mkdir(exist_ok=True)
    for name in problems:
        if name != "sub-writefail":
            (out / name / "anat").mkdir(parents=True)
            (out / name / "anat" / f"{name}_T2w_seg-tumor.nii.gz").write_bytes(f"earlier result of {name}".encode())
    out_before, ds_before = _sha_tree(out), _sha_tree(ds)

    proc = run_bundle(ds, out)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert f"{len(problems)} of {len(problems) + 1} case(s) failed" in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    for name, (path, expect) in problems.items():
        line = next((l for l in lines if l.strip().startswith(f"{name}_T2w:")), None)
        assert line is not None, (name, proc.stderr[-3000:])
        assert str(path) in line and expect in line, line
    after = _sha_tree(out)
    assert {k: v for k, v in after.items() if k in out_before} == out_before
    assert _sha_tree(ds) == ds_before
    new = sorted(set(after) - set(out_before))
    good = [f"sub-good_T2w{s}.nii.gz" for s in (*OUTPUT_SUFFIXES, CORD_SUFFIX, LEVELS_SUFFIX, DISC_LABELS_SUFFIX)]
    good = [f"sub-good/anat/{n}" for n in (*good, "sub-good_T2w_seg-imsct.json")]
    assert new == sorted([*good, "dataset_description.json", "imsct_volumes.csv"]), new
    rows = {r["case"]: r for r in csv.DictReader(open(out / "imsct_volumes.csv"))}
    assert rows["sub-good_T2w"]["status"] == "written" and len(rows) == len(problems) + 1
    assert all(rows[f"{n}_T2w"]["status"] == "failed" for n in problems)


# ---- server ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(case, tmp_path_factory):
    """The app on a free loopback port; its datastore: sub-001 (T2w + T1w), sub-not1 (no T1w) and
    sub-far (T1w 2 m away); uploads above 1 MB refused."""
    pytest.importorskip("monailabel.client")
    from monailabel.client import MONAILabelClient
    from support.servers import MonaiLabelServer

    studies = tmp_path_factory.mktemp("bad_input_studies")
    (studies / "T1w").mkdir()
    for name in ("sub-001", "sub-not1", "sub-far"):
        shutil.copy(case["t2"], studies / f"{name}.nii.gz")
    shutil.copy(case["t1"], studies / "T1w" / "sub-001.nii.gz")
    _far_t1(case, studies / "T1w" / "sub-far.nii.gz")
    srv = MonaiLabelServer(studies, tmp_path_factory.mktemp("bad_input_server"),
                           {"retrain_after": 0, "max_upload_mb": BIG_LIMIT_MB}, start_timeout=300)
    try:
        srv.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    client = MONAILabelClient(srv.url, tmpdir=str(tmp_path_factory.mktemp("bad_input_client")))
    client.datastore()  # the datastore file is written once the server read the folder
    try:
        yield {"client": client, "studies": studies, "srv": srv, "before": _sha_tree(studies)}
    finally:
        srv.stop()


def _refused(call, status: tuple[int, ...] = (422,)) -> str:
    from monailabel.client.client import MONAILabelClientException

    with pytest.raises(MONAILabelClientException) as info:
        call()
    msg = info.value.msg  # "Status: 422; Response: {...}" (the client leaves status_code unset)
    code = re.match(r"Status: (\d+);", msg)
    assert code and int(code.group(1)) in status, msg
    return msg


def _uploads_refused(client, kind, case, tmp_path) -> None:
    """Both contrasts built as ``kind`` are refused at upload with its message."""
    for role in ROLES:
        bad = kind.build(case[role[:2].lower()], tmp_path / f"bad_{role}.nii.gz", case["affine"])
        msg = _refused(lambda: client.upload_image(str(bad), f"bad-{kind.name}", {"contrast": role}))
        assert f"uploaded {role} of 'bad-{kind.name}'" in msg and kind.expect in msg, msg


@pytest.mark.parametrize("kind", IMAGE_KINDS, ids=lambda k: k.name)
def test_server_refuses_bad_file(kind, server, case, tmp_path):
    client = server["client"]
    _uploads_refused(client, kind, case, tmp_path)
    bad = kind.build(case["truth"], tmp_path / "bad_label.nii.gz", case["affine"])
    msg = _refused(lambda: client.save_label("sub-001", str(bad), tag="final"))
    assert "final label of 'sub-001'" in msg and kind.expect in msg, msg


def test_server_refuses_cases_it_cannot_segment(server):
    client = server["client"]
    msg = _refused(lambda: client.infer("cascade", "sub-not1", {}))
    assert "sub-not1" in msg and "T1w" in msg, msg
    msg = _refused(lambda: client.infer("cascade", "sub-far", {}))
    assert "sub-far" in msg and OTHER_KINDS["t1far"] in msg, msg


def test_server_refuses_bad_labels(server, case, tmp_path):
    client = server["client"]
    bad = _bad_labels(case, tmp_path)
    msg = _refused(lambda: client.save_label("sub-001", str(bad["labelgrid"]), tag="final"))
    assert "sub-001" in msg and "grid" in msg, msg
    msg = _refused(lambda: client.save_label("sub-001", str(bad["labelvalues"]), tag="final"))
    assert "sub-001" in msg and "[7]" in msg, msg
    msg = _refused(lambda: client.save_label("sub-not-there", str(case["truth"]), tag="final"), (404,))
    assert "sub-not-there" in msg and "not in the datastore" in msg, msg


@pytest.mark.parametrize("kind", IMAGE_ONLY_KINDS, ids=lambda k: k.name)
def test_server_refuses_images_with_nothing_to_segment(kind, server, case, tmp_path):
    _uploads_refused(server["client"], kind, case, tmp_path)


@pytest.mark.parametrize("image_id", ["../evil", "a/b", "/tmp/evil", ".hidden", "..\\evil"])
def test_server_refuses_image_ids_with_path_components(image_id, server, case):
    client = server["client"]
    for contrast, src in (("T2w", case["t2"]), ("T1w", case["t1"])):
        msg = _refused(lambda: client.upload_image(str(src), image_id, {"contrast": contrast}), (400,))
        assert OTHER_KINDS["pathid"] in msg, msg
    msg = _refused(lambda: client.save_label(image_id, str(case["truth"]), tag="final"), (400,))
    assert OTHER_KINDS["pathid"] in msg, msg
    msg = _refused(lambda: client.save_label("sub-001", str(case["truth"]), tag=image_id), (400,))
    assert "label tag" in msg and OTHER_KINDS["pathid"] in msg, msg
    msg = _refused(lambda: client.infer("cascade", image_id, {}))  # not a datastore id: nothing is read
    assert "no image given" in msg, msg


def test_server_refuses_oversized_upload(server, case, tmp_path):
    client = server["client"]
    rng = np.random.default_rng(0)
    slices = int(1.5 * BIG_LIMIT_MB * 1024 * 1024 / (64 * 64 * 4))  # 1.5 x the limit in float32, barely compressible
    big = _save(rng.random((64, 64, slices), dtype=np.float32), case["affine"], tmp_path / "big.nii.gz")
    assert big.stat().st_size > BIG_LIMIT_MB * 1024 * 1024
    for contrast in ROLES:
        msg = _refused(lambda: client.upload_image(str(big), "sub-big", {"contrast": contrast}), (413,))
        assert "sub-big" in msg and "max_upload_mb" in msg, msg
    msg = _refused(lambda: client.save_label("sub-001", str(big), tag="final"), (413,))
    assert "sub-001" in msg, msg


def test_server_state_unchanged_after_bad_input(server, case):
    """Runs last: nothing above changed the studies folder, the datastore or the served weights;
    the server is alive and a good upload (the only change) is still accepted."""
    studies, client = server["studies"], server["client"]
    assert server["srv"].proc.poll() is None
    assert _sha_tree(studies) == server["before"]
    assert any(k.startswith(".imsct/models/") for k in server["before"])  # the served weights are in the snapshot
    assert client.upload_image(str(case["t2"]), "sub-ok", {})["image"] == "sub-ok"
    after = _sha_tree(studies)
    changed = {k for k in set(after) | set(server["before"]) if after.get(k) != server["before"].get(k)}
    assert "sub-ok.nii.gz" in changed and changed <= {"sub-ok.nii.gz", "datastore_v2.json", ".lock"}, changed
