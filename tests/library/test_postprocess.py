import numpy as np

from imsct.labels import MIN_VOLUME_CM3
from imsct.postprocess import labelmap_from_probabilities, largest_component, postprocess_labelmap, remove_small


def _block(lab, corner, size, value):
    sl = tuple(slice(c, c + s) for c, s in zip(corner, size))
    lab[sl] = value


def test_volume_thresholds_in_cm3():
    voxel_mm3 = 0.5 * 0.5 * 3.0  # 0.75 mm3: 1 cm3 = 1333.3 voxels
    lab = np.zeros((200, 200, 20), np.uint8)
    _block(lab, (5, 5, 2), (10, 10, 2), 1)  # 200 voxels = 0.15 cm3 tumour -> removed (< 0.2)
    _block(lab, (30, 5, 2), (10, 10, 4), 1)  # 400 voxels = 0.30 cm3 tumour -> kept
    _block(lab, (60, 5, 2), (10, 10, 5), 2)  # 500 voxels = 0.375 cm3 edema -> removed (< 0.5)
    _block(lab, (90, 5, 2), (10, 10, 8), 2)  # 800 voxels = 0.6 cm3 edema -> kept
    _block(lab, (120, 5, 2), (10, 10, 6), 3)  # 600 voxels = 0.45 cm3 cavity -> removed
    _block(lab, (150, 5, 2), (10, 10, 9), 3)  # 900 voxels = 0.675 cm3 cavity -> kept
    out = postprocess_labelmap(lab, voxel_mm3, MIN_VOLUME_CM3, fill_holes=False)
    assert out[5:15, 5:15, 2:4].max() == 0
    assert (out[30:40, 5:15, 2:6] == 1).all()
    assert out[60:70, 5:15, 2:7].max() == 0
    assert (out[90:100, 5:15, 2:10] == 2).all()
    assert out[120:130, 5:15, 2:8].max() == 0
    assert (out[150:160, 5:15, 2:11] == 3).all()
    # the same voxels are kept when the voxels are 8x bigger and thresholds scale with them
    big = postprocess_labelmap(lab, voxel_mm3 * 8, MIN_VOLUME_CM3, fill_holes=False)
    assert (big > 0).sum() == (lab > 0).sum()


def test_thresholds_are_configurable():
    lab = np.zeros((40, 40, 10), np.uint8)
    _block(lab, (5, 5, 2), (10, 10, 4), 1)  # 400 mm3 at 1 mm3
    assert postprocess_labelmap(lab, 1.0, {"tumor": 0.5}, False).max() == 0
    assert postprocess_labelmap(lab, 1.0, {"tumor": 0.3}, False).max() == 1


def test_fill_holes_takes_surrounding_class():
    lab = np.zeros((30, 30, 30), np.uint8)
    lab[5:25, 5:25, 5:25] = 2
    lab[12:18, 12:18, 12:18] = 0  # enclosed hole in edema
    out = postprocess_labelmap(lab, 1.0, {}, fill_holes=True)
    assert (out[12:18, 12:18, 12:18] == 2).all()
    assert out[0, 0, 0] == 0


def test_labelmap_whole_tumour_is_union_and_argmax():
    p = np.zeros((4, 3, 1, 1), np.float32)
    p[:, 0, 0, 0] = [0.7, 0.6, 0.1, 0.9]  # tumour wins
    p[:, 1, 0, 0] = [0.3, 0.4, 0.2, 0.8]  # only whole tumour passes: most probable class, edema
    p[:, 2, 0, 0] = [0.1, 0.2, 0.3, 0.2]  # background
    assert labelmap_from_probabilities(p).ravel().tolist() == [1, 2, 0]


def test_largest_component_and_remove_small():
    m = np.zeros((20, 20, 20), bool)
    m[1:3, 1:3, 1:3] = True
    m[10:16, 10:16, 10:16] = True
    assert largest_component(m).sum() == 216
    assert remove_small(m, 9).sum() == 216 and remove_small(m, 8).sum() == 224
    assert not largest_component(np.zeros((4, 4, 4), bool)).any()


def test_localiser_field_is_fitted_to_the_image():
    from imsct.cascade import STAGE1_FIELD, fitted_field

    assert fitted_field((273, 272, 30)) == (288, 256, 32)  # rounded up to 16, never above the field
    assert fitted_field((600, 100, 12)) == (512, 112, 16)
    assert all(v % 16 == 0 for v in fitted_field((17, 33, 49)))
    assert fitted_field((1000, 1000, 1000)) == STAGE1_FIELD
