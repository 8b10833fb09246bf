"""Vertebral levels from discs (imsct.levels): numbering rules, the level map, the user's disc, and
the generator's disc truth read back through the same code."""

import numpy as np
import pytest

from imsct.levels import (CONUS_DISC, Centreline, LEVEL_NAMES, disc_name, find_levels, level_map, level_name,
                          level_number, read_disc_label)

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # the working grid: 1 mm SI (first axis, superior +), 1 mm AP, 2 mm RL


def spine(n_si: int, discs_si, cord_rows=None):
    """A straight cord along the first axis and disc blobs 20 mm in front of it at rows ``discs_si``."""
    cord = np.zeros((n_si, 64, 16), np.uint8)
    lo, hi = cord_rows or (0, n_si)
    cord[lo:hi, 30:36, 6:10] = 1
    disc = np.zeros(cord.shape, np.float32)
    for r in discs_si:
        disc[r - 2:r + 3, 8:20, 4:12] = 1.0
    return cord, disc


def test_names_follow_the_spinal_cord_toolbox():
    assert level_number("C2") == 2 and level_number("t1") == 8 and level_number("L1") == 20
    assert level_name(19) == "T12" and disc_name(3) == "C2/C3" and disc_name(8) == "C7/T1"
    with pytest.raises(ValueError, match="unknown vertebral level"):
        level_number("X9")
    assert len(LEVEL_NAMES) == 29


def test_top_of_column_numbers_from_c2_c3_and_maps_the_levels_between_discs():
    # cervical spacing 18 mm; 60 mm of cord above the highest disc (C2, the skull base)
    rows = [240, 222, 204, 186, 168]
    cord, disc = spine(300, rows)
    lv = find_levels(cord, disc, AFFINE)
    assert lv.method == "top of column" and lv.certain
    assert [d.label for d in lv.discs] == [3, 4, 5, 6, 7]
    # between disc 3 (row 240) and disc 4 (row 222) lies vertebra C3 (3); just above disc 3, C2 (2)
    assert lv.level_map[230, 32, 8] == 3
    assert lv.level_map[245, 32, 8] == 2
    assert lv.level_map[175, 32, 8] == 6
    # far above the highest disc the level is unknown (C1, the skull base): 0, not a guess
    assert lv.level_map[295, 32, 8] == 0
    assert set(np.unique(lv.level_map[cord == 0])) == {0}


def test_a_missed_disc_does_not_shift_the_numbers_below_it():
    rows = [240, 222, 186, 168]  # the disc at 204 is missing: a 36 mm gap holds it
    cord, disc = spine(300, rows)
    lv = find_levels(cord, disc, AFFINE)
    assert [d.label for d in lv.discs] == [3, 4, 6, 7]


def test_the_conus_anchors_a_thoracolumbar_field():
    # thoracolumbar spacing ~30 mm; the cord ends at row 40, 40 mm above the field's lower edge
    rows = [250, 220, 190, 160, 130, 100, 70]
    cord, disc = spine(300, rows, cord_rows=(40, 300))
    lv = find_levels(cord, disc, AFFINE)
    assert lv.method == "conus" and not lv.certain
    assert lv.discs[-1].label == CONUS_DISC
    assert [d.label for d in lv.discs] == list(range(CONUS_DISC - 6, CONUS_DISC + 1))
    assert any("conus" in n for n in lv.notes)


def test_a_field_cut_above_and_below_is_uncertain_and_says_so():
    rows = [250, 222, 194, 166, 138, 110, 82, 54]
    cord, disc = spine(270, rows)
    lv = find_levels(cord, disc, AFFINE)
    assert lv.method == "spacing" and not lv.certain
    assert any("--disc-label" in n for n in lv.notes)


def test_the_users_disc_sets_the_numbers():
    rows = [250, 222, 194, 166, 138]
    cord, disc = spine(270, rows)
    point = np.array([194.0, 33.0, 16.0])  # world of row 194 on the cord (x = row, y = 33 mm, z = 8 * 2 mm)
    lv = find_levels(cord, disc, AFFINE, user=(point, 12))
    assert lv.method == "user" and lv.certain
    assert [d.label for d in lv.discs] == [10, 11, 12, 13, 14]


def test_no_cord_and_no_disc_give_an_empty_map_with_a_reason():
    cord, disc = spine(100, [])
    lv = find_levels(np.zeros_like(cord), disc, AFFINE)
    assert lv.method == "none" and not lv.level_map.any() and lv.notes
    lv = find_levels(cord, disc, AFFINE)
    assert lv.method == "none" and not lv.level_map.any()
    assert "no intervertebral disc" in lv.notes[0]


def test_centreline_projection_of_a_tilted_cord():
    cord = np.zeros((100, 80, 16), np.uint8)
    for i in range(100):
        j = 20 + i // 4  # 14 degrees of tilt
        cord[i, j:j + 4, 6:10] = 1
    c = Centreline.from_mask(cord, AFFINE)
    assert c.arc[-1] == pytest.approx(99 * np.hypot(1, 0.25), rel=0.03)
    idx, arc, dist = c.project(np.array([[50.0, 20 + 50 / 4 + 1.5, 16.0]]))
    assert abs(c.slices[idx[0]] - 50) <= 1 and dist[0] < 1.5


@pytest.mark.parametrize("values, message", [
    ((), "found no label"),
    ((4, 5), "found labels 4, 5"),
    ((2,), "not a disc number"),
])
def test_a_bad_disc_label_is_refused_naming_the_file(values, message):
    data = np.zeros((10, 10, 10))
    for i, v in enumerate(values):
        data[i, 5, 5] = v
    with pytest.raises(ValueError, match=message) as err:
        read_disc_label(data, np.eye(4), "given.nii.gz")
    assert "given.nii.gz" in str(err.value)


def test_a_disc_label_blob_gives_its_centre():
    data = np.zeros((10, 10, 10))
    data[4:7, 5, 5] = 5
    point, label = read_disc_label(data, np.diag([2.0, 1.0, 1.0, 1.0]), "x")
    assert label == 5 and point == pytest.approx([10.0, 5.0, 5.0])


def test_generator_disc_truth_numbers_back_through_the_levels_code(tmp_path):
    """The phantom's own disc tissue and tight cord, on the working grid, give back its disc numbers
    where the field shows the top of the column (C2): the conventions of both sides agree."""
    import json

    from imsct.bids import find_cases
    from imsct.geometry import WORKING_SPACING, to_working, working_grid
    from imsct.io import load_volume
    from imsct.labels import CORD_SUFFIX, DISC_LABELS_SUFFIX, DISCS_SUFFIX
    from imsct.phantoms import generate_dataset

    # index 25 of seed 3000 is a C2-T6 field (2D sagittal); 1.2 M voxels keeps it to a few seconds
    generate_dataset(tmp_path, cases=1, seed=3000, start=25, max_voxels=1_200_000, disc_labels=True)
    case = find_cases(tmp_path)[0]
    info = json.loads(next(tmp_path.rglob("*_phantom.json")).read_text())
    assert info["coverage"].startswith("C2")
    cord, discs = (load_volume(case.labels[s], s) for s in (CORD_SUFFIX, DISCS_SUFFIX))
    points = load_volume(case.labels[DISC_LABELS_SUFFIX], "disc labels").data
    in_field = [d["label"] for d in info["discs"] if d["in_field"]]
    assert sorted(np.unique(points[points > 0]).astype(int).tolist()) == sorted(in_field)
    w_shape, w_aff = working_grid(cord.affine, cord.shape, WORKING_SPACING)
    cord_w = to_working((cord.data > 0).astype(np.uint8), cord.affine, w_shape, w_aff, label=True)
    disc_w = to_working((discs.data > 0).astype(np.uint8), cord.affine, w_shape, w_aff, label=True).astype(np.float32)
    lv = find_levels(cord_w, disc_w, w_aff)
    assert lv.method == "top of column"
    truth = {d["label"]: np.asarray(d["world_mm"]) for d in info["discs"] if d["in_field"]}
    matched = 0
    for d in lv.discs:
        near = min(truth, key=lambda k: np.linalg.norm(truth[k] - d.world))
        if np.linalg.norm(truth[near] - d.world) < 10:
            matched += 1
            assert d.label == near
    assert matched >= 5


def test_the_summary_lists_levels_from_top_to_bottom():
    """C1 ... C7, T1 ... T12, L1: by number, not alphabetically (T9 after T10 would hide L1)."""
    rows = list(range(560, 20, -27))[:19]
    cord, disc = spine(600, rows)
    lv = find_levels(cord, disc, AFFINE, user=(np.array([float(rows[0]), 33.0, 16.0]), 3))
    names = lv.summary()["levels"]
    assert names == sorted(names, key=level_number) and names[0] == "C2" and "T10" in names


def test_a_small_detection_above_c2_c3_is_not_taken_for_a_disc():
    """A component a fifth of its neighbours' size (the atlanto-axial joint, say) above the real
    C2/C3 would make every number one too low; it is dropped."""
    rows = [240, 222, 204, 186, 168]
    cord, disc = spine(300, rows)
    disc[255:258, 8:16, 4:8] = 1.0  # 96 voxels, 192 mm3: over the absolute floor, a fifth of a disc
    lv = find_levels(cord, disc, AFFINE)
    assert lv.method == "top of column"
    assert [round(d.arc_mm) for d in lv.discs] == rows  # the arc starts at row 0, 1 mm a row
    assert [d.label for d in lv.discs] == [3, 4, 5, 6, 7]


def test_a_small_disc_cut_by_the_edge_of_the_region_is_kept():
    rows = [240, 222, 204, 186]
    cord, disc = spine(300, rows)
    disc[100:105, 0:2, 4:12] = 1.0  # 160 mm3 against the anterior edge: a disc the field cuts
    cut = len(find_levels(cord, disc, AFFINE).discs)
    disc[100:105, 0:2, 4:12] = 0.0
    disc[100:105, 6:8, 4:12] = 1.0  # the same fragment away from every edge
    inside = len(find_levels(cord, disc, AFFINE).discs)
    assert (cut, inside) == (5, 4)


def test_no_disc_is_read_just_below_the_upper_end_of_a_cord_that_ends_in_the_field():
    """The cord stops 20 mm under the field's top (the medulla above is not labelled cord): the top
    of the column is in the field, and a disc-sized detection 17 mm below the cord's end is not a
    disc, so C2/C3 is the next one down."""
    rows = [240, 222, 204, 186, 168]
    cord, disc = spine(300, rows + [262], cord_rows=(0, 280))
    lv = find_levels(cord, disc, AFFINE)
    assert lv.method == "top of column"
    assert [d.label for d in lv.discs] == [3, 4, 5, 6, 7]
    assert any("C1 and C2" in n for n in lv.notes)
    # the same detection where the cord runs to the field's top is kept (the field cuts the column)
    cord, disc = spine(300, rows + [262])
    assert len(find_levels(cord, disc, AFFINE).discs) == 6


def test_a_whole_spine_field_is_numbered_from_c2_by_its_cervical_spacing():
    """34 mm of cord above C2/C3 is two cervical gaps: the top of the column, though the field's
    median gap (thoracolumbar, 30 mm) is longer than the cord above."""
    rows = [560, 542, 524, 506, 488, 470] + list(range(440, 100, -30))
    cord, disc = spine(600, rows, cord_rows=(0, 594))
    lv = find_levels(cord, disc, AFFINE)
    assert lv.method == "top of column"
    assert [d.label for d in lv.discs] == list(range(3, 3 + len(rows)))
