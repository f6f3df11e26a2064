"""The reference implementations' conventions (docs/method.md#reference-conventions): each variant's
value on an input where the variants differ, worked out by hand here."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.params import parse_params
from pipeline.fewshot.protocol import conventions, protocol_name, protocol_record


def test_the_protocol_is_named_from_the_evaluation_conventions():
    defaults = parse_params({})
    assert protocol_record(defaults) == {"name": "custom", "conventions": {
        "episodes.protocol": "pfenet", "evaluate.resize": "original", "evaluate.absent_class": "zero",
        "split.novel_in_train": "drop", "priors.cam_scale": "pi-clip", "priors.box": "pi-clip"}}
    hsnet = parse_params({"episodes": {"protocol": "hsnet"}, "evaluate": {"resize": "hsnet"}})
    assert protocol_name(conventions(hsnet)) == "hsnet"
    pfenet = parse_params({"evaluate": {"resize": "pfenet"}})
    assert protocol_name(conventions(pfenet)) == "pfenet"
    skipping = parse_params({"evaluate": {"resize": "pfenet", "absent_class": "skip"}})
    assert protocol_name(conventions(skipping)) == "custom"  # PFENet's code counts an absent class 0
    coco = parse_params({"dataset": {"name": "coco", "root": "/x"}})
    assert conventions(coco)["dataset.coco_crowd"] == "background"


# --- priors.cam_scale: PI-CLIP's (x - min) / (max(x - min) + 1e-7) against min-max -------------------

def test_pi_clip_scaling_keeps_a_saturated_map_below_one():
    """A CAM of range 4e-8 (a saturated softmax's): min-max stretches it to 1; scale_cam divides by
    4e-8 + 1e-7 = 1.4e-7, so its peak is 4 / 14; an ordinary map (range 2) is the same both ways
    (within 1e-7 / 2, below float32's resolution there)."""
    from pipeline.core.tensors import minmax, scale_cam, scale_maps

    flat = torch.tensor([[0.0, 1e-8], [2e-8, 4e-8]])[None]
    assert torch.allclose(minmax(flat), torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    assert torch.allclose(scale_cam(flat), torch.tensor([[[0.0, 1 / 14], [2 / 14, 4 / 14]]]), rtol=1e-5)
    assert torch.equal(scale_maps(flat, "pi-clip"), scale_cam(flat))
    assert torch.equal(scale_maps(flat, "minmax"), minmax(flat))
    ordinary = torch.tensor([[[1.0, 2.0], [3.0, 2.0]]])
    assert torch.allclose(scale_cam(ordinary), minmax(ordinary), atol=1e-7)


def test_pi_clip_gradcam_is_scaled_twice_as_base_cam_does():
    """pytorch_grad_cam's BaseCAM scales its target layer's CAM, then the mean over its one layer again.
    A CAM of range r = 1e-13 (one channel, gradient 1, so CAM = activation): the first pass peaks at
    m = r / (r + 1e-7) ~ 1e-6, the second at m / (m + 1e-7) ~ 10 / 11. min-max divides by
    max(r, 1e-12): peak 0.1. An ordinary CAM is the same both ways."""
    from pipeline.clip.gradcam import _cam

    acts = torch.tensor([0.0, 2.5e-14, 5e-14, 1e-13]).view(1, 4, 1)
    grads = torch.ones_like(acts)
    shape = torch.tensor([[0.0, 0.25, 0.5, 1.0]])
    m = 1e-13 / (1e-13 + 1e-7)
    assert torch.allclose(_cam(acts, grads, "minmax"), shape / 10, rtol=1e-5)
    assert torch.allclose(_cam(acts, grads, "pi-clip"), shape * m / (m + 1e-7), rtol=1e-4)
    assert _cam(acts, grads, "pi-clip").max() == pytest.approx(10 / 11, abs=1e-3)
    ordinary = torch.tensor([0.0, 1.0, 2.0, 4.0]).view(1, 4, 1)
    assert torch.allclose(_cam(ordinary, grads, "pi-clip"), _cam(ordinary, grads, "minmax"), atol=1e-6)


# --- priors.box: PI-CLIP's scoremap2bbox against whole boxes of VTP >= threshold * max ----------------

def test_pi_clip_boxes_threshold_a_uint8_copy_strictly():
    """Max 1.0 -> uint8 255, cut floor(0.4 * 255) = 102. 0.4 -> uint8 102, not > 102: out under
    pi-clip, in under exact (0.4 >= 0.4). 0.9 at the last column: its box [4, 5) ends at W - 1 = 4
    under pi-clip, so it is empty; the one-pixel region at the last row likewise. Exact: every box
    whole."""
    from pipeline.priors.pir import above_threshold, box_mask

    vtp = torch.zeros(4, 5)
    vtp[1, 1], vtp[2, 3], vtp[2, 4], vtp[3, 0] = 1.0, 0.4, 0.9, 0.8
    exact = torch.zeros(4, 5, dtype=torch.bool)
    exact[1, 1] = exact[2, 3] = exact[2, 4] = exact[3, 0] = True
    assert torch.equal(above_threshold(vtp[None], 0.4, "exact")[0], exact)
    assert torch.equal(box_mask(vtp[None], 0.4, "exact")[0], exact)
    on = exact.clone()
    on[2, 3] = False  # 102 is not > 102
    assert torch.equal(above_threshold(vtp[None], 0.4, "pi-clip")[0], on)
    pi_clip = torch.zeros(4, 5, dtype=torch.bool)
    pi_clip[1, 1] = True  # the only box not cut off by the clipped ends
    assert torch.equal(box_mask(vtp[None], 0.4, "pi-clip")[0], pi_clip)


def test_pi_clip_boxes_lose_their_last_row_and_column():
    """One 8-connected region at (0, 2), (1, 1), (1, 2), (2, 2): box rows 0-2 x columns 1-2 (exact, 6
    cells); PI-CLIP's ends min(3, 2) = 2: rows 0-1 x column 1 (2 cells)."""
    from pipeline.priors.pir import box_mask

    vtp = torch.zeros(3, 3)
    vtp[0, 2] = vtp[1, 1] = vtp[1, 2] = vtp[2, 2] = 1.0
    exact = torch.zeros(3, 3, dtype=torch.bool)
    exact[0:3, 1:3] = True
    pi_clip = torch.zeros(3, 3, dtype=torch.bool)
    pi_clip[0:2, 1:2] = True
    assert torch.equal(box_mask(vtp[None], 0.4, "exact")[0], exact)
    assert torch.equal(box_mask(vtp[None], 0.4, "pi-clip")[0], pi_clip)


def test_refine_scales_and_boxes_as_asked():
    """T* = identity: the refined map is the VTP inside the boxes, scaled. The 3 x 3 map above with
    values 1, 1, 1e-8 (a tiny peak elsewhere is outside every box): pi-clip keeps (0, 1) and (1, 1)
    only, of which (1, 1) = 1 -> scale_cam: 1 / (1 + 1e-7); exact keeps the 6-cell box."""
    from pipeline.priors.pir import refine

    vtp = torch.zeros(1, 3, 3)
    vtp[0, 0, 2] = vtp[0, 1, 1] = vtp[0, 1, 2] = vtp[0, 2, 2] = 1.0
    eye = torch.eye(9)[None]
    exact = refine(eye, vtp, threshold=0.4, box="exact", scale="minmax")
    assert torch.equal(exact, vtp)
    pi_clip = refine(eye, vtp, threshold=0.4, box="pi-clip", scale="pi-clip")
    expected = torch.zeros(1, 3, 3)
    expected[0, 1, 1] = 1 / (1 + 1e-7)
    assert torch.allclose(pi_clip, expected, atol=1e-8)


def test_pi_clip_boxes_equal_a_numpy_scipy_reference_on_random_maps():
    """The pi-clip rule against numpy's uint8 copy and integer cut (``astype(np.uint8)``,
    ``int(threshold * max)``) and scipy's 8-connected regions, each slice's end clipped to W-1 / H-1."""
    import numpy as np
    from scipy import ndimage

    from pipeline.priors.pir import box_mask

    torch.manual_seed(0)
    maps = torch.rand(60, 7, 9) ** 3
    maps[0] = 0.5  # one region covering everything: loses its last row and column
    expected = np.zeros(maps.shape, bool)
    for p, m in enumerate(maps.numpy()):
        u8 = (m * 255).astype(np.uint8)
        regions, _ = ndimage.label(u8 > int(0.4 * u8.max()), structure=np.ones((3, 3)))
        for rows, cols in ndimage.find_objects(regions):
            expected[p, rows.start:min(rows.stop, 6), cols.start:min(cols.stop, 8)] = True
    got = box_mask(maps, 0.4, "pi-clip").numpy()
    assert np.array_equal(got, expected)
    assert got[0].sum() == 6 * 8 and not np.array_equal(got, box_mask(maps, 0.4, "exact").numpy())
