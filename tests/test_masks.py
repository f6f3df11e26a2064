"""Pseudo-masks: MaskCLIP distillation and the self-supported refiner (LFSS Eqs. 2-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.tensors import masked_average_pooling
from pipeline.pseudomasks.refine import background_prototypes, initial_masks, refine_masks


def test_masked_average_pooling_against_a_loop():
    torch.manual_seed(0)
    feats, masks = torch.randn(3, 5, 4, 6), torch.rand(3, 4, 6)
    masks[2] = 0  # empty: a zero prototype
    got = masked_average_pooling(feats, masks)
    for b in range(2):
        num = sum(feats[b, :, i, j] * masks[b, i, j] for i in range(4) for j in range(6))
        assert torch.allclose(got[b], num / masks[b].sum(), atol=1e-5)
    assert torch.equal(got[2], torch.zeros(5))


@pytest.mark.parametrize("temperature", [None, 0.1])
def test_background_prototypes_against_a_loop(temperature):
    torch.manual_seed(1)
    feats, masks = torch.randn(2, 3, 2, 3), (torch.rand(2, 2, 3) > 0.5).float()
    got = background_prototypes(feats, masks, temperature)
    for b in range(2):
        f = feats[b].flatten(1).T  # (N, C)
        f_b = f * (1 - masks[b].flatten())[:, None]
        for i in range(6):
            if temperature is None:  # Eq. 4 as printed: dot products
                logits = torch.stack([f_b[i] @ f[j] for j in range(6)])
            else:  # cosines / temperature (0 for a zeroed position)
                logits = torch.stack([f_b[i] @ f[j] / (f_b[i].norm().clamp(min=1e-6) * f[j].norm())
                                      for j in range(6)]) / temperature
            expected = (logits.softmax(0)[:, None] * f_b).sum(0)
            assert torch.allclose(got[b, :, i // 3, i % 3], expected, atol=1e-5)


def scene(seed: int, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with an object (direction a) in a 12x12 background (direction b), and its mask."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.zeros(16), torch.zeros(16)
    a[0], b[1] = 4.0, 4.0
    truth = torch.zeros(12, 12, dtype=torch.bool)
    top, left = (int(v) for v in torch.randint(0, 6, (2,), generator=g))
    truth[top: top + 5, left: left + 5] = True
    feats = torch.where(truth, a[:, None, None], b[:, None, None])
    feats = feats + noise * torch.randn(16, 12, 12, generator=g)
    return feats, truth


@pytest.mark.parametrize("temperature", [None, 0.1])
def test_refiner_removes_false_positives_and_keeps_the_object(temperature):
    shots = [scene(s) for s in range(3)]
    query_feats, query_truth = scene(7)
    corrupted = []
    for _, truth in [*shots, (None, query_truth)]:
        noisy = truth.clone()
        noisy[(truth.nonzero()[0, 0] + 6) % 12, :4] = True  # a false-positive stripe in the background
        noisy[:, 11] |= ~truth[:, 11]
        corrupted.append(noisy)
    s_feats = torch.stack([f for f, _ in shots])[None]
    s_masks = torch.stack(corrupted[:3])[None]
    refined_s, refined_q = refine_masks(s_feats, s_masks, query_feats[None], corrupted[3][None],
                                        alpha=0.5, temperature=temperature)
    assert torch.equal(refined_q[0], query_truth)
    for k, (_, truth) in enumerate(shots):
        assert torch.equal(refined_s[0, k], truth), k
    assert not torch.equal(corrupted[3], query_truth)  # there was something to remove


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_decides_whose_prototype_counts(alpha):
    torch.manual_seed(3)
    s_feats, q_feats = torch.randn(2, 2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    s_masks, q_masks = torch.rand(2, 2, 12, 12) > 0.5, torch.rand(2, 12, 12) > 0.5
    base = refine_masks(s_feats, s_masks, q_feats, q_masks, alpha=alpha, temperature=None)
    if alpha == 1.0:  # P_m = P_s: the supports' refinement ignores the query's initial mask
        other = refine_masks(s_feats, s_masks, q_feats, ~q_masks, alpha=alpha, temperature=None)
        assert torch.equal(base[0], other[0]) and not torch.equal(base[1], other[1])
    else:  # P_m = P_q: the query's refinement ignores the supports' initial masks
        other = refine_masks(s_feats, ~s_masks, q_feats, q_masks, alpha=alpha, temperature=None)
        assert torch.equal(base[1], other[1]) and not torch.equal(base[0], other[0])


def test_refined_masks_have_the_initial_masks_size():
    s, q = refine_masks(torch.randn(3, 5, 4, 2, 2), torch.rand(3, 5, 9, 7) > 0.5, torch.randn(3, 4, 2, 2),
                        torch.rand(3, 9, 7) > 0.5, alpha=0.5, temperature=0.1)
    assert s.shape == (3, 5, 9, 7) and q.shape == (3, 9, 7) and s.dtype == torch.bool


def test_initial_masks_from_labels_and_vtp():
    labels = torch.tensor([[[1, 2], [2, 2]], [[3, 3], [1, 3]]])
    classes = torch.tensor([2, 3])
    no_vtp = initial_masks(labels, classes, None, vtp_threshold=None)
    assert no_vtp.tolist() == [[[False, True], [True, True]],
                                                       [[True, True], [False, True]]]
    vtp = torch.tensor([[[0.9, 0.1], [0.9, 0.1]], [[1.0, 1.0], [1.0, 1.0]]])
    with_vtp = initial_masks(labels, classes, vtp, vtp_threshold=0.5)
    assert with_vtp.tolist() == [[[False, False], [True, False]], [[True, True], [False, True]]]


def test_pseudo_mask_shards_are_sized_by_memory():
    from pipeline.pseudomasks.store import MAX_SHARD, episode_bytes, shard_episodes, shards_at_once

    pascal = (1536, 60, 60)  # ResNet-50 at 473 px
    # what a shard keeps is a float32 grid and a packed mask per image and episode: the cap, for
    # any real grid
    assert shard_episodes(5, (192, 16, 16), 256, 4 * 2**30) == shard_episodes(5, pascal, 473, 0) == MAX_SHARD
    assert shard_episodes(5, (1536, 4000, 4000), 473, 0) == 2**30 // (6 * (4 * 4000**2 + 27_966))
    assert shard_episodes(5, (1, 20_000, 20_000), 473, 0) == 1  # never less than one episode
    # a batch in flight: per image float32 features (and two working copies) and six masks
    assert episode_bytes(5, pascal, 473) == 6 * (12 * 1536 * 3600 + 6 * 473**2)
    # the embedded benchmark (64 episodes a batch, 4 GiB): 9 tasks fit, so the CPU count runs
    assert shards_at_once(MAX_SHARD, 64, 5, (192, 16, 16), 256, 4 * 2**30) == 9
    # PASCAL-shaped: a task of 2 episodes a batch (0.9 GB with its shard) fits 4 GiB four times;
    # one of 64 (26 GB) does not fit at all, and runs alone
    assert shards_at_once(MAX_SHARD, 2, 5, pascal, 473, 4 * 2**30) == 4
    assert shards_at_once(MAX_SHARD, 64, 5, pascal, 473, 4 * 2**30) == 1


def test_feature_shards_are_sized_by_memory():
    from pipeline.features.store import MAX_SHARD, SHARD_BYTES, shard_images

    assert shard_images(192, (16, 16)) == MAX_SHARD  # the embedded benchmark: unchanged layout
    pascal = shard_images(1536, (60, 60))  # ResNet-50 at 473 px: 10.6 MB per image
    assert pascal * 2 * 1536 * 3600 <= SHARD_BYTES < (pascal + 1) * 2 * 1536 * 3600


@pytest.mark.parametrize("size", [7, 16])  # 49 pixels: the last byte is partly padding
def test_kept_initial_masks_round_trip_through_their_bits(size):
    from pipeline.pseudomasks.shards import pack_masks, unpack_masks

    masks = torch.rand(5, size, size, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_masks(masks)
    assert packed.shape == (5, -(-size * size // 8)) and packed.dtype == np.uint8
    assert torch.equal(unpack_masks(packed[[3, 0, 3]], size), masks[[3, 0, 3]])


def test_mask_quality_counts_the_masks_that_miss_their_target():
    """Pixel sums hide a mask that misses its object: ``missed`` counts them per episode."""
    from pipeline.core.metrics import FewShotMeter
    from pipeline.pseudomasks.quality import figures

    target = torch.zeros(4, 10, 10, dtype=torch.uint8)
    target[:, 2:8, 2:8] = 1  # 36 px each
    pred = torch.zeros(4, 10, 10, dtype=torch.bool)
    pred[0, 2:8, 2:8] = True  # perfect
    pred[1, 2:8, 2:5] = True  # half
    pred[2, 0, 0:3] = True  # elsewhere: missed
    pred[3, 2, 2] = True  # 1 of 36 px < 10 %: missed
    meter = FewShotMeter(1, per_episode=True)
    meter.update(pred, target, torch.ones(4, dtype=torch.long))
    got = figures({"query_refined": meter})
    assert got["query_refined_missed"] == 50.0
    assert got["query_refined_recall"] == pytest.approx(100 * (36 + 18 + 0 + 1) / 144, abs=0.01)
