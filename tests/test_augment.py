"""Random views (the papers' augmentation): geometry, and that image, label and priors follow
the same view."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.core.metrics import IGNORE
from pipeline.fewshot.augment import letterbox_views, random_views, warp, warp_labels


def test_a_view_without_zoom_rotation_or_flip_is_the_identity():
    theta = random_views(torch.Generator().manual_seed(0), [(30, 50)], scale=(1.0, 1.0), rotate=0, flip=False)
    maps = torch.rand(1, 3, 30, 50)
    assert torch.allclose(warp(maps, theta, (30, 50)), maps, atol=1e-5)  # float grid coordinates
    label = torch.randint(0, 5, (30, 50), dtype=torch.uint8)
    assert torch.equal(warp_labels([label], theta, (30, 50))[0], label)


@pytest.mark.parametrize("size", [(40, 80), (75, 50)])
def test_views_rotate_and_zoom_the_image_plane_itself_whatever_its_aspect(size):
    height, width = size
    thetas = random_views(torch.Generator().manual_seed(1), [size] * 50, scale=(0.8, 1.25), rotate=10)
    to_pixels = torch.diag(torch.tensor([width / 2, height / 2]))
    for theta in thetas:
        physical = to_pixels @ theta[:, :2] @ torch.linalg.inv(to_pixels)  # in the image's own pixels
        zoom = 1 / math.sqrt(abs(float(torch.linalg.det(physical))))
        assert 0.8 - 1e-5 <= zoom <= 1.25 + 1e-5
        rotation = physical * zoom
        assert torch.allclose(rotation @ rotation.T, torch.eye(2), atol=1e-5)  # a rotation (or mirror)
        assert abs(math.degrees(math.atan2(float(rotation[1, 0]), float(rotation[1, 1])))) <= 10 + 1e-4
        assert (theta[:, 2].abs() <= max(0.0, 1 - 1 / zoom) + 1e-6).all()  # the window stays on the image
    assert {float(torch.sign(torch.linalg.det(t[:, :2]))) for t in thetas} == {-1.0, 1.0}  # some flipped


def test_label_and_maps_follow_one_view_and_outside_is_ignored():
    label = torch.zeros(60, 90, dtype=torch.uint8)
    label[10:30, 20:50] = 3
    mirror_and_zoom_out = torch.tensor([[[-2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])  # half size, flipped
    seen = warp_labels([label], mirror_and_zoom_out, (60, 90))[0]
    assert (seen[:14] == IGNORE).all() and (seen[:, :22] == IGNORE).all()  # outside the image
    assert (seen[15:45, 23:67] != IGNORE).all()
    # a prior at another resolution (the CLIP grid) that marks the object lands where the label's does
    prior = torch.nn.functional.interpolate((label == 3).float()[None, None], size=(12, 18), mode="area")
    seen_prior = warp(prior, mirror_and_zoom_out, (12, 18))[0, 0]
    on_label = torch.nn.functional.interpolate((seen == 3).float()[None, None], size=(12, 18), mode="area")
    assert torch.corrcoef(torch.stack([seen_prior.flatten(), on_label.flatten()]))[0, 1] > 0.9


def test_letterbox_puts_the_whole_image_top_left_with_its_aspect_ratio():
    label = torch.randint(0, 5, (30, 50), dtype=torch.uint8)
    canvas = warp_labels([label], letterbox_views([(30, 50)]), (50, 50))[0]
    assert torch.equal(canvas[:30], label) and (canvas[30:] == IGNORE).all()
    tall = torch.randint(0, 5, (40, 20), dtype=torch.uint8)
    canvas = warp_labels([tall], letterbox_views([(40, 20)]), (40, 40))[0]
    assert torch.equal(canvas[:, :20], tall) and (canvas[:, 20:] == IGNORE).all()


@pytest.mark.parametrize("resize", ["original", "hsnet", "pfenet"])
def test_a_perfect_prediction_scores_100_under_every_evaluation_protocol(resize):
    from pipeline.core.metrics import FewShotMeter
    from pipeline.fewshot.evaluate import Scoring, score

    side = 240  # every upsampling below is by a whole factor: exact
    labels = [torch.zeros(30, 60, dtype=torch.uint8), torch.zeros(48, 40, dtype=torch.uint8)]
    labels[0][5:20, 10:40], labels[1][10:40, 3:20] = 1, 2
    classes = torch.tensor([1, 2])
    scoring = Scoring(resize, side, *((object(), object()) if resize == "pfenet" else ()))
    # a perfect model's probabilities, on the grid it predicts on, that upsample exactly to the truth
    if resize == "pfenet":  # the model sees the letterboxed image: it predicts on that canvas
        seen = warp_labels(labels, letterbox_views([tuple(lab.shape) for lab in labels]), (side, side))
    elif resize == "hsnet":
        seen = torch.stack([torch.from_numpy(np.array(scoring.label(lab.numpy()))) for lab in labels])
    else:  # a 240 x 240 grid: its bilinear samples at 30, 60, 48 or 40 px fall inside single cells
        seen = torch.stack([torch.nn.functional.interpolate(lab[None, None].float(), size=(240, 240),
                                                            mode="nearest")[0, 0] for lab in labels])
    probs = (seen == classes[:, None, None]).float()
    meter = FewShotMeter(2)
    score(meter, probs, [lab.numpy() for lab in labels], classes, scoring=scoring)
    assert meter.miou() == pytest.approx(100)
    expected = {"original": "the prediction", "hsnet": "label and prediction at 240x240",
                "pfenet": "input letterboxed to 240 px"}
    assert scoring.description.startswith(expected[resize])
