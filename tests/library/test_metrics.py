import math

import numpy as np
import pytest

from imsct.metrics import box_coverage, case_metrics, detection_rates, dice, precision_recall, volume_difference


def test_dice_hand_computed():
    p = np.zeros((10, 10, 10), bool)
    t = np.zeros_like(p)
    p[0:4, 0, 0] = True  # 4 voxels
    t[2:8, 0, 0] = True  # 6 voxels, 2 shared
    assert dice(p, t) == pytest.approx(2 * 2 / 10)
    assert dice(np.zeros_like(p), np.zeros_like(t)) == 1.0
    assert dice(p, np.zeros_like(t)) == 0.0 and dice(np.zeros_like(p), t) == 0.0


def test_precision_recall_and_volume_difference():
    p = np.zeros((10, 10, 10), bool)
    t = np.zeros_like(p)
    p[0:4, 0, 0] = True
    t[2:8, 0, 0] = True
    assert precision_recall(p, t) == pytest.approx((0.5, 1 / 3))
    rvd, avd = volume_difference(p, t)
    assert rvd == pytest.approx((6 - 4) / 6) and avd == pytest.approx(2 / 6)
    rvd, avd = volume_difference(t, p)  # over-segmentation is negative
    assert rvd == pytest.approx((4 - 6) / 4) and avd == pytest.approx(0.5)
    empty = np.zeros_like(p)
    assert volume_difference(empty, empty) == (0.0, 0.0)
    assert all(math.isnan(v) for v in volume_difference(p, empty))  # empty truth
    prec, rec = precision_recall(empty, t)  # empty prediction
    assert math.isnan(prec) and rec == 0.0
    prec, rec = precision_recall(p, empty)
    assert prec == 0.0 and math.isnan(rec)


def test_detection_uses_6_mm3_overlap():
    t = np.zeros((30, 30, 30), bool)
    p = np.zeros_like(t)
    t[0:5, 0:5, 0:5] = True  # structure A
    t[20:25, 20:25, 20:25] = True  # structure B
    p[0:2, 0:3, 0:1] = True  # overlaps A by 6 voxels
    p[20:21, 20:25, 20:21] = True  # overlaps B by 5 voxels
    p[10:12, 10:12, 10:12] = True  # false positive
    tpr, fpr, nt, npred = detection_rates(p, t, voxel_mm3=1.0)
    assert (nt, npred) == (2, 3)
    assert tpr == pytest.approx(0.5) and fpr == pytest.approx(2 / 3)
    # with 2 mm3 voxels, 5 voxels = 10 mm3 is enough
    tpr, fpr, _, _ = detection_rates(p, t, voxel_mm3=2.0)
    assert tpr == 1.0 and fpr == pytest.approx(1 / 3)
    tpr, fpr, nt, npred = detection_rates(np.zeros_like(p), np.zeros_like(t), 1.0)
    assert math.isnan(tpr) and math.isnan(fpr) and nt == npred == 0


def test_case_metrics_per_class():
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[2:6, 2:6, 2:6] = 1
    truth[6:10, 2:6, 2:6] = 2
    pred = truth.copy()
    pred[6:10, 2:6, 2:6] = 3  # edema predicted as cavity
    m = case_metrics(pred, truth, 1.0)
    assert m["tumor_dice"] == 1.0 and m["edema_dice"] == 0.0 and m["cavity_dice"] == 0.0
    assert m["whole-tumor_dice"] == 1.0
    assert m["edema_tpr_detection"] == 0.0 and m["cavity_fpr_detection"] == 1.0
    assert m["tumor_vol_true_mm3"] == 64.0


def test_box_coverage():
    m = np.zeros((10, 10, 10), bool)
    m[2:6, 2:4, 2:4] = True
    assert box_coverage(m, np.array([0, 0, 0]), np.array([4, 10, 10])) == 0.5
    assert box_coverage(np.zeros_like(m), np.zeros(3, int), np.ones(3, int)) == 1.0


def test_summary_reports_what_healthy_subjects_get():
    """The no-invented-lesions targets: share of healthy subjects with no lesion at all and their
    mean false-positive whole-tumour volume; lesion subjects are left out of both."""
    from imsct.evaluation import summarise

    shape, vox = (20, 20, 20), 2.0  # 2 mm3 voxels
    empty = np.zeros(shape, np.uint8)
    invented = empty.copy()
    invented[2:7, 2:7, 2:6] = 1  # 100 voxels of "tumor" = 0.2 cm3
    lesion = empty.copy()
    lesion[10:15, 10:15, 10:15] = 1

    def row(pred, truth):
        r = case_metrics(pred, truth, vox)
        r.update(stage1_dice=math.nan, box_lesion_voxels_in=0, box_lesion_voxels=0, box_lesion_coverage=1.0, seconds=1.0)
        return r

    s = summarise([row(invented, empty), row(empty, empty), row(invented, lesion)])
    assert s["healthy_cases"] == 2
    assert s["healthy_no_lesion_fraction"] == pytest.approx(0.5)
    assert s["healthy_fp_whole_cm3_mean"] == pytest.approx(0.1)
    assert summarise([row(empty, lesion)])["healthy_no_lesion_fraction"] is None
