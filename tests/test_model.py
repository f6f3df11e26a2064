"""The LFSS model: DPS and CCM against their equations, the assembly's switches, frozen parts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipeline.core.params import ModelParams
from pipeline.model import ccm, dps
from pipeline.model.lfss import LFSS, Episodes, circle, guide_channels, predict


def blob_masks() -> torch.Tensor:
    """Three 16x16 masks: a rectangle, an L shape, a disc touching the image border."""
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 3:11, 2:14] = True
    masks[1, 2:14, 2:6] = True
    masks[1, 10:14, 2:13] = True
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    masks[2] = (ys - 3) ** 2 + (xs - 12) ** 2 <= 20
    return masks


def edt_with_border(mask: np.ndarray) -> np.ndarray:
    """scipy's Euclidean distance to the nearest background cell, the image border counting as
    background (a one-cell frame of zeros)."""
    return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def test_seeds_lie_inside_the_mask_and_away_from_its_border():
    masks = blob_masks()
    seeds = dps.place_seeds(masks, 5)
    for mask, chosen in zip(masks.numpy(), seeds.tolist(), strict=True):
        ys, xs = np.divmod(np.array(chosen), 16)
        assert mask[ys, xs].all()  # inside
        assert len(set(chosen)) == 5  # distinct while the mask has room
        edt = edt_with_border(mask)
        assert edt[ys[0], xs[0]] == pytest.approx(edt.max())  # the first seed is the deepest cell
        assert (edt[ys, xs] >= 2).all()  # none on the mask's border


def test_each_seed_is_the_farthest_from_background_and_earlier_seeds():
    mask = blob_masks()[0].numpy()
    seeds = dps.place_seeds(torch.from_numpy(mask)[None], 4)[0].tolist()
    taken = mask.copy()
    for seed in seeds:
        edt = edt_with_border(taken)
        assert edt.flat[seed] == pytest.approx(edt.max())
        taken.flat[seed] = False  # the seed becomes a blocked point


def test_seed_region_keeps_a_small_object():
    soft = torch.zeros(2, 8, 8)
    soft[0, 2, 3] = 0.3  # an object smaller than half a cell
    soft[1, 1:5, 1:5] = 0.9
    region = dps.seed_region(soft)
    assert region[0].sum() == 1 and region[0, 2, 3]
    assert region[1].sum() == 16
    assert not dps.seed_region(torch.zeros(1, 8, 8)).any()


def test_rectification_moves_each_seed_to_the_most_query_like_neighbour():
    feats = torch.randn(1, 8, 6, 6)
    prototype = torch.randn(1, 8)
    feats[0, :, 2, 4] = prototype[0] * 3  # cosine 1, next to seed (2, 3)
    seeds = torch.tensor([[2 * 6 + 3, 0]])  # (2, 3) and the corner (0, 0)
    moved = dps.rectify_seeds(feats, seeds, prototype, window=3)
    assert moved[0, 0] == 2 * 6 + 4
    sim = F.cosine_similarity(feats[0], prototype[0][:, None, None], dim=0)
    corner = sim[:2, :2]  # the corner's window, clipped to the image
    assert moved[0, 1] == int(corner.flatten().argmax() // 2 * 6 + corner.flatten().argmax() % 2)


def reference_cluster(feats, weights, seeds, r, iterations):
    """Eqs. 9-11 written out per pixel and seed."""
    c, h, w = feats.shape
    unit = [feats[:, y, x] / feats[:, y, x].norm() for y in range(h) for x in range(w)]
    coords = [torch.tensor([y / max(h, w), x / max(h, w)]) for y in range(h) for x in range(w)]
    cf = [unit[s].clone() for s in seeds]
    cs = [coords[s].clone() for s in seeds]
    for _ in range(iterations):
        new_f, new_s = [], []
        for i in range(len(seeds)):
            total, acc_f, acc_s = 0.0, torch.zeros(c), torch.zeros(2)
            for p in range(h * w):
                q = math.sqrt(
                    float((unit[p] - cf[i]).square().sum()) + float((coords[p] - cs[i]).square().sum()) / r**2
                )
                weight = math.exp(-q) * float(weights.flatten()[p])
                total += weight
                acc_f += weight * unit[p]
                acc_s += weight * coords[p]
            new_f.append(acc_f / max(total, 1e-6))
            new_s.append(acc_s / max(total, 1e-6))
        cf, cs = new_f, new_s
    return torch.stack(cf)


def test_clustering_equals_a_plain_reference():
    torch.manual_seed(0)
    feats = torch.randn(2, 6, 5, 7)
    weights = (torch.rand(2, 5, 7) > 0.4).float() * torch.rand(2, 5, 7)
    seeds = torch.tensor([[3, 17, 30], [0, 12, 22]])
    got = dps.cluster(feats, weights, seeds, r=0.4, iterations=3)
    for b in range(2):
        expected = reference_cluster(feats[b], weights[b], seeds[b].tolist(), 0.4, 3)
        assert torch.allclose(got[b], expected, atol=1e-5)


def test_association_map_sums_the_prototypes_cosines():
    torch.manual_seed(1)
    protos, feats = torch.randn(2, 3, 4), torch.randn(2, 4, 5, 5)
    got = dps.association_map(protos, feats)
    expected = sum(F.cosine_similarity(feats, protos[:, i, :, None, None], dim=1) for i in range(3))
    assert got.shape == (2, 1, 5, 5) and torch.allclose(got[:, 0], expected, atol=1e-5)


def test_dps_prototypes_of_an_empty_mask_are_zero():
    feats = torch.randn(2, 4, 6, 6)
    masks = torch.zeros(2, 6, 6)
    masks[0, 1:4, 1:4] = 1
    protos = dps.dps_prototypes(feats, masks, torch.randn(2, 4), count=3, window=3, r=0.5, iterations=5)
    assert protos[0].abs().sum() > 0 and protos[1].abs().sum() == 0


def reference_ccm(fq, mq, fs, ms, tau):
    """Eqs. 13-16 on one episode, cell by cell."""
    c, h, w = fq.shape
    q = [fq[:, i // w, i % w] * mq.flatten()[i] for i in range(h * w)]
    s = [fs[:, j // w, j % w] * ms.flatten()[j] for j in range(h * w)]

    def cos(a, b):
        return float(a @ b) / (max(float(a.norm()), 1e-6) * max(float(b.norm()), 1e-6))

    rows = [i for i in range(h * w) if mq.flatten()[i] > 0] or list(range(h * w))
    attention = {
        i: torch.softmax(torch.tensor([cos(q[i], s[j]) / tau for j in range(h * w)]), 0) for i in rows
    }
    weights = [
        sum(float(mq.flatten()[i] if mq.sum() > 0 else 1) * float(attention[i][j]) for i in rows)
        / sum(float(mq.flatten()[i] if mq.sum() > 0 else 1) for i in rows)
        for j in range(h * w)
    ]
    p_a = sum(weights[j] * s[j] for j in range(h * w)) / max(float(ms.sum()), 1e-6)
    rcm = torch.tensor([cos(p_a, q[i]) for i in range(h * w)]).view(h, w)
    fcm = torch.tensor([cos(p_a, fq[:, i // w, i % w]) for i in range(h * w)]).view(h, w)
    return p_a, rcm, fcm


@pytest.mark.parametrize("query_mask_empty", [False, True])
def test_ccm_matches_its_equations(query_mask_empty):
    torch.manual_seed(2)
    fq, fs = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    mq, ms = (torch.rand(2, 4, 4) > 0.5).float(), torch.rand(2, 4, 4)
    if query_mask_empty:
        mq[1] = 0
    p_a = ccm.attended_prototype(fq, mq, fs, ms, temperature=0.5)
    maps = ccm.correlation_maps(fq, mq, p_a)
    for b in range(2):
        ref_p, ref_rcm, ref_fcm = reference_ccm(fq[b], mq[b], fs[b], ms[b], 0.5)
        assert torch.allclose(p_a[b], ref_p, atol=1e-5)
        assert torch.allclose(maps[b, 0], ref_rcm, atol=1e-5) and torch.allclose(
            maps[b, 1], ref_fcm, atol=1e-5
        )
    assert (maps[:, 0][mq == 0] == 0).all()  # RCM lives inside the query mask


def random_episodes(b: int = 3, c: int = 12, side: int = 8, prior_side: int = 4, d: int = 6) -> Episodes:
    g = torch.Generator().manual_seed(3)
    masks = (torch.rand(2, b, side, side, generator=g) > 0.6).float()
    return Episodes(
        query=torch.randn(b, c, side, side, generator=g),
        query_mask=masks[0],
        support=torch.randn(b, c, side, side, generator=g),
        support_mask=masks[1],
        query_vtp=torch.rand(b, prior_side, prior_side, generator=g),
        support_vtp=torch.rand(b, prior_side, prior_side, generator=g),
        query_tokens=torch.randn(b, 2, prior_side**2, d, generator=g),
        support_tokens=torch.randn(b, 2, prior_side**2, d, generator=g),
    )


@pytest.mark.parametrize(
    ("switches", "channels"),
    [
        ({}, 6),
        ({"dps": False}, 6),
        ({"rcm": False}, 5),
        ({"ccm": False}, 5),
        ({"rcm": False, "ccm": False}, 4),
        ({"vtp": False}, 5),
        ({"vvp": False}, 4),
        ({"dps": False, "rcm": False, "ccm": False, "vtp": False, "vvp": False}, 1),
    ],
)
def test_every_switch_changes_what_the_decoder_sees(switches, channels):
    cfg = ModelParams(hidden=8, **switches)
    model = LFSS(12, cfg)
    x = random_episodes()
    guides = model.guides(x)
    assert guides.shape == (3, channels, 8, 8) and guide_channels(cfg) == channels
    assert model(x).shape == (3, 8, 8)
    if not cfg.dps:  # the paper's baseline: the global prototype's cosine
        proto = (x.support * x.support_mask[:, None]).sum((2, 3)) / x.support_mask.sum((1, 2))[:, None]
        assert torch.allclose(
            guides[:, 0], F.cosine_similarity(x.query, proto[..., None, None], dim=1), atol=1e-5
        )
    if cfg.vtp:  # the VTP channel is the query's VTP, upsampled
        vtp = F.interpolate(x.query_vtp[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
        assert torch.allclose(guides[:, 1 + cfg.rcm + cfg.ccm], vtp)


def test_circle_uses_the_predicted_support_mask():
    torch.manual_seed(0)
    model = LFSS(12, ModelParams(hidden=8)).eval()
    x = random_episodes()
    support_logits, query_logits = circle(model, x)
    assert torch.allclose(support_logits, model(x.support_as_query()))
    from dataclasses import replace

    assert torch.allclose(query_logits, model(replace(x, support_mask=torch.sigmoid(support_logits))))
    probs = predict(model, [x, x], circle_inference=True)  # two identical shots: the same as one
    assert torch.allclose(probs, predict(model, [x], circle_inference=True), atol=1e-6)
    assert ((probs >= 0) & (probs <= 1)).all()


def test_params_reject_an_even_window():
    from pipeline.core.errors import PipelineError
    from pipeline.core.params import parse_params

    with pytest.raises(PipelineError, match="model.window = 4: must be odd"):
        parse_params({"model": {"window": 4}})
