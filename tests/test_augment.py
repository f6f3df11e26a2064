"""Random views (the papers' augmentation): geometry, and that image, label and priors follow
the same view."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.fewshot.augment import random_views, warp, warp_labels
from pipeline.fewshot.metrics import IGNORE


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
