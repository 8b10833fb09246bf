"""Morphometrics against hand-built shapes with known answers and against the phantom generator's truth."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from imsct.io import InputError, voxel_volume_mm3
from imsct.morphometrics import load_levels, measure, write_tables


def oblique_affine(sizes=(0.6, 0.7, 1.5), tilt_deg=20.0, origin=(-20.0, -20.0, -40.0)):
    """Anisotropic voxels on a grid rotated about the RL axis."""
    t = np.deg2rad(tilt_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(sizes)
    a[:3, 3] = origin
    return a


def cylinder(shape, affine, centre, direction, radius, length):
    """Voxels whose centre lies inside a solid cylinder (world mm)."""
    idx = np.indices(shape).reshape(3, -1).T
    d = idx @ affine[:3, :3].T + affine[:3, 3] - centre
    s = d @ direction
    perp = np.linalg.norm(d - s[:, None] * direction, axis=1)
    return ((np.abs(s) <= length / 2) & (perp <= radius)).reshape(shape)


SHAPE = (70, 60, 60)


@pytest.mark.parametrize("tilt_deg", [0.0, 25.0])
def test_cylinder_on_oblique_anisotropic_grid(tilt_deg):
    aff = oblique_affine()
    centre = aff[:3, :3] @ (np.array(SHAPE) / 2) + aff[:3, 3]
    a = np.deg2rad(tilt_deg)
    axis = np.array([0.0, np.sin(a), np.cos(a)])  # cord tilted in the sagittal plane
    r, length = 5.0, 30.0
    lesion = cylinder(SHAPE, aff, centre, axis, r, length)
    cord = cylinder(SHAPE, aff, centre, axis, 8.0, 80.0)
    lab = lesion.astype(np.uint8)
    voxel = max(np.sqrt((aff[:3, :3] ** 2).sum(0)))  # largest voxel side, 1.5 mm

    along_cord = measure(lab, aff, cord=cord)
    t = along_cord["classes"]["tumor"]
    assert along_cord["axis"] == "cord-centreline"
    assert t["count"] == 1 and along_cord["classes"]["edema"]["count"] == 0
    assert t["volume_mm3"] == pytest.approx(lesion.sum() * voxel_volume_mm3(aff))
    assert t["volume_mm3"] == pytest.approx(np.pi * r**2 * length, rel=0.05)
    assert abs(t["length_si_mm"] - length) <= voxel
    assert abs(t["max_equivalent_diameter_mm"] - 2 * r) <= voxel / 2
    comp = along_cord["components"][0]
    assert np.allclose(comp["centroid_world_mm"], centre, atol=0.5)
    i = np.asarray(comp["centroid_voxel"])
    assert np.allclose(aff[:3, :3] @ i + aff[:3, 3], comp["centroid_world_mm"])

    # along the world superior axis the tilted cylinder spans L cos a + 2 r sin a
    world_z = measure(lab, aff)["classes"]["tumor"]
    assert abs(world_z["length_si_mm"] - (length * np.cos(a) + 2 * r * np.sin(a))) <= voxel
    if tilt_deg == 0:
        assert abs(world_z["max_equivalent_diameter_mm"] - 2 * r) <= voxel / 2
    else:  # horizontal slabs cut the tilted cylinder obliquely: area pi r^2 / cos a
        assert world_z["max_equivalent_diameter_mm"] > t["max_equivalent_diameter_mm"]


def arc_tube(shape, affine, bend_radius, centre_y, radius, arc_mm):
    """A tube of ``radius`` along a circular arc in the sagittal plane (centre at y = centre_y,
    z = 0), running superior-inferior where it crosses z = 0, ``arc_mm`` long."""
    idx = np.indices(shape).reshape(3, -1).T
    p = idx @ affine[:3, :3].T + affine[:3, 3]
    dy, dz = p[:, 1] - centre_y, p[:, 2]
    off = np.hypot(np.hypot(dy, dz) - bend_radius, p[:, 0])
    ang = np.arctan2(dz, dy)
    return ((off <= radius) & (np.abs(ang) <= arc_mm / 2 / bend_radius)).reshape(shape)


def test_curved_cord_length_along_the_arc():
    aff = oblique_affine(sizes=(0.8, 0.8, 1.2), tilt_deg=10.0, origin=(-15.0, -40.0, -60.0))
    shape = (38, 110, 100)
    centre = aff[:3, :3] @ (np.array(shape) / 2) + aff[:3, 3]
    bend, r, length = 120.0, 4.0, 40.0
    cy = centre[1] - bend
    lesion = arc_tube(shape, aff, bend, cy, r, length)
    cord = arc_tube(shape, aff, bend, cy, 7.0, 110.0)  # the cord turns by 52 degrees over its length
    t = measure(lesion.astype(np.uint8), aff, cord=cord)["classes"]["tumor"]
    voxel = 1.2
    assert abs(t["length_si_mm"] - length) <= voxel
    assert abs(t["max_equivalent_diameter_mm"] - 2 * r) <= voxel / 2


def test_slices_perpendicular_to_the_axis_count_like_sct():
    """On a grid whose slices are perpendicular to z, length = slices x thickness and the
    equivalent diameter comes from the largest slice's area exactly."""
    aff = np.diag([0.5, 0.5, 3.0, 1.0])
    lab = np.zeros((40, 40, 20), np.uint8)
    lab[10:14, 10:15, 5:9] = 1  # 4 x 5 voxels per slice, 4 slices
    lab[10:12, 10:12, 9] = 1  # a smaller fifth slice
    c = measure(lab, aff)["classes"]["tumor"]
    assert c["length_si_mm"] == pytest.approx(5 * 3.0)
    assert c["max_equivalent_diameter_mm"] == pytest.approx(2 * np.sqrt(20 * 0.25 / np.pi))
    assert c["volume_mm3"] == pytest.approx((80 + 4) * 0.75)


LEVELS = [  # world z (superior up), bodies with a disc below each
    {"level": "C5", "z_top_mm": 30.0, "z_bottom_mm": 18.0},
    {"level": "C6", "z_top_mm": 13.0, "z_bottom_mm": 1.0},
    {"level": "C7", "z_top_mm": -4.0, "z_bottom_mm": -16.0},
]


def test_components_connectivity_classes_and_levels():
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[2, 3] = -20.0  # voxel k sits at z = k - 20
    lab = np.zeros((20, 20, 60), np.uint8)
    lab[5:8, 5:8, 44:48] = 1  # tumour A, z 24..27: inside C5's body
    lab[8, 8, 48] = 1  # touches A at a corner only: same 26-connected component
    lab[5:8, 5:8, 32:36] = 2  # edema, z 12..15: C5's disc and C6's body, apart from both tumours
    lab[5:8, 5:8, 18:21] = 1  # tumour B, z -2..0: the disc below C6 only
    lab[5:8, 5:8, 21:23] = 3  # cavity touching tumour B: the whole tumour merges them
    r = measure(lab, aff, levels=LEVELS)
    cls = r["classes"]
    assert (cls["tumor"]["count"], cls["edema"]["count"], cls["cavity"]["count"], cls["whole-tumor"]["count"]) == (2, 1, 1, 3)
    tum = [c for c in r["components"] if c["class"] == "tumor"]
    assert [c["index"] for c in tum] == [1, 2]  # numbered superior to inferior
    assert tum[0]["volume_mm3"] == 3 * 3 * 4 + 1 and tum[0]["levels"] == ["C5"]
    assert tum[1]["levels"] == ["C6"]  # the disc below C6 belongs to C6
    edema = next(c for c in r["components"] if c["class"] == "edema")
    assert edema["levels"] == ["C5", "C6"]
    assert cls["tumor"]["levels"] == ["C5", "C6"]
    assert cls["tumor"]["volume_mm3"] == pytest.approx(sum(c["volume_mm3"] for c in tum))
    assert cls["whole-tumor"]["volume_mm3"] == pytest.approx((lab > 0).sum())
    assert measure(lab, aff)["components"][0]["levels"] is None
    with pytest.raises(InputError, match="label map"):
        measure(np.where(lab == 3, 4, lab), aff)


def test_write_tables_consistent_and_all_or_nothing(tmp_path):
    aff = oblique_affine()
    lab = np.zeros(SHAPE, np.uint8)
    lab[10:20, 10:20, 10:20] = 1
    lab[40:50, 30:40, 30:35] = 2
    r = measure(lab, aff, levels=LEVELS)
    csv_path, json_path = write_tables(r, tmp_path / "out" / "case_morphometrics")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(r))
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(r["components"]) + 4
    for row in rows:
        if row["component"] == "all":
            c = r["classes"][row["class"]]
            assert int(row["count"]) == c["count"]
        else:
            c = next(x for x in r["components"] if x["class"] == row["class"] and x["index"] == int(row["component"]))
            assert float(row["centroid_z_mm"]) == pytest.approx(c["centroid_world_mm"][2], abs=1e-3)
        assert float(row["volume_mm3"]) == pytest.approx(c["volume_mm3"], abs=1e-3)
        assert float(row["length_si_mm"]) == pytest.approx(c["length_si_mm"], abs=1e-3)
        assert row["levels"] == ";".join(c["levels"])

    # the JSON cannot be written (a folder sits there): no CSV appears and no temporary file is left
    (tmp_path / "bad.json").mkdir()
    with pytest.raises(OSError):
        write_tables(r, tmp_path / "bad")
    assert not (tmp_path / "bad.csv").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_levels_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "levels.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="levels.json"):
        load_levels(bad)
    bad.write_text(json.dumps({"vertebrae": [{"level": "C5", "z_top_mm": 1.0}]}))
    with pytest.raises(InputError, match="levels.json.*entry 0"):
        load_levels(bad)
    with pytest.raises(InputError, match="not found"):
        load_levels(tmp_path / "missing.json")


def truth_cases(phantom_dir):
    for js in sorted(phantom_dir.glob("derivatives/labels/*/anat/*_phantom.json")):
        info = json.loads(js.read_text())
        sub = info["participant_id"]
        masks = {k: nib.load(js.parent / f"{sub}_T2w_seg-{k}.nii.gz") for k in ("tumor", "edema", "cavity", "whole-tumor")}
        lab = np.zeros(masks["tumor"].shape, np.uint8)
        for value, k in enumerate(("tumor", "edema", "cavity"), 1):
            lab[np.asarray(masks[k].dataobj) > 0] = value
        cord = np.asarray(nib.load(js.parent / f"{sub}_T2w_seg-cord.nii.gz").dataobj) > 0
        yield js, info, lab, masks["tumor"].affine, cord


def test_phantom_truth(phantom_dir):
    n = 0
    for js, info, lab, aff, cord in truth_cases(phantom_dir):
        n += 1
        r = measure(lab, aff, levels=load_levels(js))  # the phantom json works as a levels file
        for k in ("tumor", "edema", "cavity", "whole-tumor"):
            assert r["classes"][k]["volume_mm3"] == pytest.approx(info["volumes_mm3"][k], rel=1e-6), (js, k)
        # lesions inside the field of view, each found as its own tumour component
        zs = (np.indices(lab.shape).reshape(3, -1).T @ aff[:3, :3].T + aff[:3, 3])[:, 2]
        inside = [les for les in info["lesions"] if zs.min() < les["z_mm"] < zs.max()]
        tumours = [c for c in r["components"] if c["class"] == "tumor"]
        assert len(tumours) == len(inside) >= 1
        voxel = max(info["t2_voxel_mm"])  # the labels are partial-volume renderings at this size
        for les in inside:
            comp = min(tumours, key=lambda c: abs(c["centroid_world_mm"][2] - les["z_mm"]))
            assert comp["z_range_mm"][0] <= les["z_mm"] <= comp["z_range_mm"][1]
            assert abs(comp["length_si_mm"] - 2 * les["half_length_mm"]) <= voxel, (js, comp, les)
            assert les["level"] in comp["levels"]
        # along the (gently curved) cord the length is never shorter and stays close
        rc = measure(lab, aff, levels=load_levels(js), cord=cord)
        assert rc["axis"] == "cord-centreline"
        for a, b in zip(tumours, [c for c in rc["components"] if c["class"] == "tumor"]):
            assert b["length_si_mm"] >= a["length_si_mm"] - 0.5
            assert b["length_si_mm"] <= a["length_si_mm"] * 1.1 + voxel
    assert n == 2


def test_levels_from_a_level_map_and_the_axial_damage_ratio():
    """With the cascade's cord mask and level map (SCT's numbers on the cord): each lesion's levels are
    those of the map under it (a lesion voxel off the cord takes the nearest level), and the damage
    ratio is the lesion's largest share of the cord's cross-section."""
    from imsct.levels import level_number

    aff = np.eye(4)
    shape = (20, 20, 120)  # z (third axis) is superior
    cord = np.zeros(shape, bool)
    cord[6:14, 6:14, :] = True  # 64 voxels per axial slice
    level_map = np.zeros(shape, np.uint8)
    for k, name in enumerate(("C3", "C4", "C5", "C6")):  # 30 mm per level, C3 at the top
        level_map[..., 90 - 30 * k:120 - 30 * k] = level_number(name)
    level_map[~cord] = 0
    lab = np.zeros(shape, np.uint8)
    lab[8:12, 8:12, 50:75] = 1  # tumour across C4/C5 (z 50-74): 16 of 64 voxels per slice
    lab[8:12, 8:12, 75:80] = 2  # edema above it, C4 only
    lab[14, 9:11, 100:104] = 2  # an edema island just outside the cord, beside C3
    r = measure(lab, aff, cord=cord, level_map=level_map)
    tumour = [c for c in r["components"] if c["class"] == "tumor"]
    assert tumour[0]["levels"] == ["C4", "C5"]
    assert tumour[0]["max_axial_damage_ratio"] == pytest.approx(16 / 64)
    edema = sorted((c for c in r["components"] if c["class"] == "edema"), key=lambda c: -c["centroid_world_mm"][2])
    assert [c["levels"] for c in edema] == [["C3"], ["C4"]]
    assert r["classes"]["edema"]["levels"] == ["C3", "C4"]
    assert r["classes"]["whole-tumor"]["levels"] == ["C3", "C4", "C5"]
    # the island lies beside the cord: 2 of the 64 + 2 voxels of its slab
    assert edema[0]["max_axial_damage_ratio"] == pytest.approx(2 / 66)
    assert r["classes"]["tumor"]["max_axial_damage_ratio"] == pytest.approx(16 / 64)
    # without a cord mask there is no damage ratio; with an empty label map nothing breaks
    assert measure(lab, aff)["classes"]["tumor"]["max_axial_damage_ratio"] is None
    empty = measure(np.zeros(shape, np.uint8), aff, cord=cord, level_map=level_map)
    assert empty["classes"]["tumor"]["count"] == 0 and empty["classes"]["tumor"]["max_axial_damage_ratio"] == 0.0
