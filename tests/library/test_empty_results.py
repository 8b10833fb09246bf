"""An empty answer is a valid answer (issue 12, part 3): morphometrics, QC and compare on empty label
maps (count 0, no division by zero, 'no lesion found', growth not computable with the reason)."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np

from imsct.cli import main as cli
from imsct.io import save_volume

AFFINE = np.array([[0, 0, -0.8, 20.0], [0, 0.6, 0, -30.0], [1.0, 0, 0, -40.0], [0, 0, 0, 1]])  # oblique-free, anisotropic


def _image(shape=(80, 60, 12)):
    rng = np.random.default_rng(3)
    return rng.uniform(50, 100, shape).astype(np.float32)


def test_morphometrics_of_an_empty_label_map(tmp_path):
    from imsct.morphometrics import measure, rows, write_tables

    empty = np.zeros((80, 60, 12), np.uint8)
    cord = np.zeros_like(empty)
    cord[:, 28:34, 5:8] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a division by zero would warn
        for result in (measure(empty, AFFINE), measure(empty, AFFINE, cord=cord),
                       measure(empty, AFFINE, levels=[{"level": "C3", "z_top_mm": 40, "z_bottom_mm": 20}])):
            assert result["components"] == []
            for name, c in result["classes"].items():
                assert c["count"] == 0 and c["volume_mm3"] == 0.0 and c["volume_cm3"] == 0.0, name
                assert c["length_si_mm"] == 0.0 and c["max_equivalent_diameter_mm"] == 0.0
            assert [r["component"] for r in rows(result)] == ["all"] * 4
        csv_path, json_path = write_tables(result, tmp_path / "m")
    table = list(csv.DictReader(open(csv_path)))
    assert [(r["class"], r["count"], float(r["volume_mm3"])) for r in table] == [
        ("tumor", "0", 0.0), ("edema", "0", 0.0), ("cavity", "0", 0.0), ("whole-tumor", "0", 0.0)]
    assert json.loads(json_path.read_text())["classes"]["whole-tumor"]["count"] == 0
    # through the command
    seg = save_volume(empty, AFFINE, tmp_path / "sub-x_T2w_seg-imsct.nii.gz")
    assert cli(["morphometrics", "-i", str(seg), "-o", str(tmp_path / "cmd")]) == 0


def test_qc_page_says_no_lesion(tmp_path):
    t2 = save_volume(_image(), AFFINE, tmp_path / "sub-a_T2w.nii.gz", np.float32)
    seg = save_volume(np.zeros((80, 60, 12), np.uint8), AFFINE, tmp_path / "sub-a_seg.nii.gz")
    lab = np.zeros((80, 60, 12), np.uint8)
    lab[30:40, 25:35, 4:8] = 1
    t2b = save_volume(_image(), AFFINE, tmp_path / "sub-b_T2w.nii.gz", np.float32)
    segb = save_volume(lab, AFFINE, tmp_path / "sub-b_seg.nii.gz")
    assert cli(["qc", "--t2", str(t2), str(t2b), "--seg", str(seg), str(segb), "-o", str(tmp_path / "qc")]) == 0
    page = (tmp_path / "qc" / "index.html").read_text()
    sections = page.split('<section class="subject"')[1:]
    assert len(sections) == 2
    assert "No lesion found" in sections[0] and "No lesion found" not in sections[1]


def test_compare_with_an_empty_visit(tmp_path, capsys):
    from imsct.followup import compare_visits, load_visit

    t2a = save_volume(_image(), AFFINE, tmp_path / "v1_T2w.nii.gz", np.float32)
    t2b = save_volume(_image(), AFFINE, tmp_path / "v2_T2w.nii.gz", np.float32)
    empty = save_volume(np.zeros((80, 60, 12), np.uint8), AFFINE, tmp_path / "v1_seg-imsct.nii.gz")
    lab = np.zeros((80, 60, 12), np.uint8)
    lab[30:40, 25:35, 4:8] = 1
    grown = save_volume(lab, AFFINE, tmp_path / "v2_seg-imsct.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = compare_visits(load_visit(t2a, [str(empty)], "2023-01-01"), load_visit(t2b, [str(grown)], "2024-01-01"), register=False)
        none = compare_visits(load_visit(t2a, [str(empty)], "2023-01-01"), load_visit(t2b, [str(empty)], "2024-01-01"), register=False)
    t = new["classes"]["tumor"]
    assert t["volume_visit1_mm3"] == 0 and t["volume_visit2_mm3"] > 0
    assert t["change_percent"] is None and t["rate_percent_per_year_linear"] is None and t["rate_percent_per_year_compound"] is None
    assert "not computable" in t["growth_note"] and "visit 1" in t["growth_note"]
    assert t["rate_mm3_per_year"] > 0 and t["components_visit1"] == 0 and t["new_components"] == 1
    for name, c in none["classes"].items():
        assert c["change_mm3"] == 0 and c["change_percent"] is None and "either visit" in c["growth_note"], name
        assert c["components_visit1"] == c["components_visit2"] == 0 and c["new_components"] == c["vanished_components"] == 0
    # the command prints the reason and writes it to both files
    out = tmp_path / "cmp"
    rc = cli(["compare", "--t2", str(t2a), str(t2b), "--seg1", str(empty), "--seg2", str(grown),
              "--dates", "2023-01-01", "2024-01-01", "--no-register", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tumor: relative growth not computable: volume 0 at visit 1" in printed and "n/a" in printed
    rows = {r["class"]: r for r in csv.DictReader(open(out / "compare.csv"))}
    assert rows["tumor"]["change_percent"] == "" and "not computable" in rows["tumor"]["growth_note"]
    assert json.loads((out / "compare.json").read_text())["classes"]["edema"]["growth_note"].startswith("relative growth")
