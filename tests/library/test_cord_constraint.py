"""The intramedullary constraint (issue 12, part 2): a lesion outside the cord region is removed, one
touching it is kept whole, and nothing is removed where there is no cord or the constraint is off."""

from __future__ import annotations

import numpy as np

from imsct.cascade import CORD_MARGIN_MM, Cascade, cord_region
from imsct.io import Volume
from imsct.postprocess import keep_touching

SPACING = (1.0, 1.0, 2.0)
AFFINE = np.diag([*SPACING, 1.0])


def test_keep_touching_judges_each_lesion_whole():
    region = np.zeros((40, 40, 20), bool)
    region[:, 15:25, 8:12] = True
    lab = np.zeros(region.shape, np.uint8)
    lab[5:15, 18:30, 9:11] = 1  # tumour inside the region ...
    lab[5:15, 30:36, 9:11] = 2  # ... with its edema reaching well beyond it (the same lesion)
    lab[25:35, 0:5, 0:3] = 3  # a cavity-like blob far from the cord
    out = keep_touching(lab, region)
    np.testing.assert_array_equal(out[:20], lab[:20])  # the whole lesion kept, labels untouched
    assert not out[20:].any()
    assert not keep_touching(np.zeros_like(lab), region).any()


def test_cord_region_margin_in_mm():
    cord = np.zeros((30, 30, 15), bool)
    cord[:, 15, 7] = True
    reg = cord_region(cord, SPACING, 5.0)
    assert reg[10, 10, 7] and not reg[10, 9, 7]  # 5 mm anterior-posterior = 5 voxels
    assert reg[10, 15, 7 - 2] and not reg[10, 15, 7 - 3]  # 2 mm right-left voxels: 4 mm in, 6 mm out
    assert CORD_MARGIN_MM == 5.0


def _probs_and_cord():
    """Probabilities on a working-grid box = the whole grid: one lesion touching the cord, one 30 mm away."""
    shape = (60, 60, 20)
    probs = np.zeros((4, *shape), np.float32)
    cord = np.zeros(shape, np.uint8)
    cord[:, 26:34, 8:12] = 1
    probs[0, 10:25, 28:40, 8:12] = 0.9  # tumour in the cord, widening it forward
    probs[1, 40:55, 0:6, 0:6] = 0.9  # "edema" in the posterior neck, outside the cord region
    probs[3] = probs[:3].max(0)
    return probs, cord


def test_cascade_removes_lesions_outside_the_cord_before_the_volume_thresholds():
    probs, cord = _probs_and_cord()
    t2 = Volume(np.zeros(probs.shape[1:], np.float32), AFFINE)
    box = (np.zeros(3, int), np.asarray(probs.shape[1:]))
    on = Cascade(None, None)
    assert on.cord_constraint and on.cord_margin_mm == CORD_MARGIN_MM
    lab, _ = on.to_native(probs, box, AFFINE, t2, cord=cord)
    assert (lab == 1).sum() == 15 * 12 * 4 and not (lab == 2).any()
    # without a cord (stage 1 found none) or with the constraint off, everything is kept
    for lab2 in (on.to_native(probs, box, AFFINE, t2)[0], on.to_native(probs, box, AFFINE, t2, cord=np.zeros_like(cord))[0]):
        assert (lab2 == 1).any() and (lab2 == 2).sum() == 15 * 6 * 6
    # the bundle and the command line expose the option
    import json

    from support.paths import BUNDLE

    conf = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    assert conf["cord_constraint"] is True and conf["cascade"]["cord_constraint"] == "@cord_constraint"
    assert conf["cord_margin_mm"] == CORD_MARGIN_MM
    assert conf["tight_cord_margin_mm"] == Cascade(None, None).tight_cord_margin_mm
    assert conf["cascade"]["tight_cord_margin_mm"] == "@tight_cord_margin_mm"


def test_cascade_call_applies_the_constraint_with_a_given_cord():
    """Through __call__: a segmenter that answers 'lesion' at two fixed places, a given cord mask."""
    import torch

    probs, cord = _probs_and_cord()
    logits = torch.from_numpy(np.where(probs > 0.5, 8.0, -8.0).astype(np.float32))

    class Fixed(torch.nn.Module):
        accepts_validity = False

        def forward(self, x):
            return logits[None].expand(x.shape[0], -1, -1, -1, -1)[..., : x.shape[2], : x.shape[3], : x.shape[4]]

    # a T2w stored on its own working grid (SI x AP x RL, 1 x 1 x 2 mm), so that the fixed answer lands where drawn
    working = np.array([[0, 0, 2.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    t2 = Volume(np.random.default_rng(0).uniform(1, 2, probs.shape[1:]).astype(np.float32), working, "t2")
    for constraint, edema in ((True, 0), (False, 15 * 6 * 6)):
        c = Cascade(None, Fixed(), t2_only=True, cord_constraint=constraint)
        c.inferer = type("I", (), {"roi_size": probs.shape[1:], "with_progress": lambda self: self,
                                   "__call__": lambda self, x, net: net(x)})()
        res = c(t2, None, cord=cord)
        assert (res.labelmap == 1).any() and int((res.labelmap == 2).sum()) == edema
        assert res.cord_constraint is constraint


def test_cascade_call_uses_the_anatomy_networks_tight_cord(caplog):
    """With the anatomy network and no given cord, the region is its tight cord dilated by
    TIGHT_CORD_MARGIN_MM (2 mm): a lesion that touches the cord is kept whole, one 6 mm in front of
    it (inside the 30 mm stage-1 cylinder, where the medulla and the thecal sac lie) is removed; a
    given cord still takes precedence."""
    import torch

    from imsct.cascade import TIGHT_CORD_MARGIN_MM

    shape = (60, 60, 20)
    lesion = np.zeros((4, *shape), np.float32)
    lesion[0, 10:25, 28:40, 8:12] = 1  # tumour in the cord, widening it forward
    lesion[1, 40:55, 40:46, 8:12] = 1  # "edema" 6 mm in front of the cord (AP 34 -> 40), 0.72 cm3
    lesion[3] = lesion[:3].max(0)
    tight = np.zeros(shape, np.float32)
    tight[:, 26:34, 8:12] = 1

    def fixed(target):
        logits = torch.from_numpy(np.where(target > 0.5, 8.0, -8.0).astype(np.float32))

        class Fixed(torch.nn.Module):
            accepts_validity = False

            def forward(self, x):
                return logits[None].expand(x.shape[0], -1, -1, -1, -1)[..., : x.shape[2], : x.shape[3], : x.shape[4]]

        return Fixed()

    working = np.array([[0, 0, 2.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    t2 = Volume(np.random.default_rng(0).uniform(1, 2, shape).astype(np.float32), working, "t2")
    c = Cascade(None, fixed(lesion), t2_only=True, anatomy=fixed(np.stack([tight, np.zeros(shape, np.float32)])))
    c.inferer = type("I", (), {"roi_size": shape, "with_progress": lambda self: self, "__call__": lambda self, x, net: net(x)})()
    assert c.tight_cord_margin_mm == TIGHT_CORD_MARGIN_MM == 2.0
    res = c(t2, None)
    assert res.cord_constraint and res.cord_constraint_region == "tight cord"
    assert int((res.labelmap == 1).sum()) == 15 * 12 * 4 and not (res.labelmap == 2).any()
    assert res.anatomy is not None and res.anatomy.cord.sum() == 60 * 8 * 4
    # a wider margin reaches the edema; a given cord replaces the tight cord (its 5 mm margin: not reached either)
    c.tight_cord_margin_mm = 7.0
    assert int((c(t2, None).labelmap == 2).sum()) == 15 * 6 * 4
    c.tight_cord_margin_mm = TIGHT_CORD_MARGIN_MM
    given = c(t2, None, cord=tight.astype(np.uint8))
    assert given.cord_constraint_region == "given cord" and not (given.labelmap == 2).any()
    # the constraint off: everything kept
    c.cord_constraint = False
    off = c(t2, None)
    assert not off.cord_constraint and off.cord_constraint_region is None and int((off.labelmap == 2).sum()) == 15 * 6 * 4
    # the constraint on, but the anatomy network finds no cord (and no localiser): kept, and said so
    c.cord_constraint = True
    c.anatomy = fixed(np.zeros((2, *shape), np.float32))
    with caplog.at_level("WARNING", logger="imsct.cascade"):
        none = c(t2, None)
    assert none.cord_constraint_region is None and int((none.labelmap == 2).sum()) == 15 * 6 * 4
    assert "no cord found by the anatomy network; lesions kept without the cord constraint" in caplog.text
