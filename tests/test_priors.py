"""PI-CLIP priors against plain references, on tiny random open_clip towers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipeline.clip.dense import vit_embed, vit_tokens
from pipeline.clip.gradcam import softmax_gradcam
from pipeline.core.tensors import mask_to_grid, minmax
from pipeline.priors.extract import extract_priors
from pipeline.priors.forward import block_with_attention, image_features
from pipeline.priors.pir import box_mask, high_order_affinity, refine
from pipeline.priors.vtp import PromptBank, prompt_sets
from pipeline.priors.vvp import vvp
from tests.conftest import RESNET, VIT, tiny

NUM_CLASSES = 4
# the paper's PIR settings; the project's scaling and boxes, which the plain references below follow
PIR = {"pir_blocks": 8, "pir_threshold": 0.4, "cam_scale": "minmax", "box": "exact"}


@pytest.fixture(scope="module")
def bank():
    torch.manual_seed(1)
    return PromptBank(F.normalize(torch.randn(NUM_CLASSES, 24), dim=-1),
                      F.normalize(torch.randn(NUM_CLASSES, 24), dim=-1))


def plain_vtp(model, image: torch.Tensor, prompts: torch.Tensor, target: int) -> torch.Tensor:
    """Softmax-GradCAM of one (image, prompt set), written out with nothing shared or batched."""
    visual = model.visual
    x, grid = vit_tokens(visual, image[None])
    block = visual.transformer.resblocks[-1]
    a = block.ln_1(x).detach().requires_grad_()
    y = x + block.attn(a, a, a, need_weights=False)[0]
    y = y + block.mlp(block.ln_2(y))
    embedding = F.normalize((visual.ln_post(y[:, 1:]) @ visual.proj).mean(1), dim=-1)
    probs = (model.logit_scale.exp() * embedding @ prompts.T).softmax(-1)
    probs[0, target].backward()
    weights = a.grad[0, 1:].mean(0)
    cam = F.relu((a[0, 1:] * weights).sum(-1)).detach()
    return ((cam - cam.min()) / (cam.max() - cam.min())).view(grid)


@pytest.mark.parametrize("mode", ["target", "image_labels", "all"])
def test_vtp_equals_a_plain_per_pair_reference(mode, bank):
    model = tiny(VIT)
    images = torch.randn(3, 3, 32, 32)
    pair_image, pair_class = torch.tensor([0, 0, 1, 2]), [1, 3, 2, 4]
    labels = [[1, 3], [2, 4], [1, 4]]
    got = extract_priors(model, images, pair_image, pair_class, labels, bank, bank.foreground,
                         prompt_set=mode, **PIR).vtp
    for p, (i, c) in enumerate(zip(pair_image.tolist(), pair_class, strict=True)):
        members = {"target": [c], "image_labels": sorted({c, *labels[i]}),
                   "all": list(range(1, NUM_CLASSES + 1))}[mode]
        rows = torch.tensor(members) - 1
        prompts = torch.cat([bank.foreground[rows], bank.background[rows]])
        expected = plain_vtp(model, images[i], prompts, members.index(c))
        assert torch.allclose(got[p], expected, atol=1e-4), (mode, p)


def test_resnet_vtp_equals_per_pair_gradcam_and_pir_uses_feature_affinity(bank):
    model = tiny(RESNET)
    images = torch.randn(2, 3, 96, 64)
    pair_image, pair_class = torch.tensor([0, 1, 1]), [2, 1, 3]
    got = extract_priors(model, images, pair_image, pair_class, [[2], [1, 3]], bank, bank.foreground,
                         prompt_set="target", **PIR)
    prompts, target, mask = prompt_sets(bank, torch.tensor(pair_class), None, "target")
    expected = softmax_gradcam(model.visual, images, pair_image, prompts, target,
                               model.logit_scale.exp().item(), mask)
    assert got.vtp.shape == (3, 3, 2) and torch.allclose(got.vtp, expected, atol=1e-5)
    assert got.maskclip_labels.shape == (2, 3, 2) and 1 <= got.maskclip_labels.min()
    assert torch.equal(got.maskclip_labels.long(), got.maskclip_scores.argmax(1) + 1)


def test_prompt_sets_are_the_bank_with_a_membership_mask(bank):
    labels = torch.tensor([[False, True, False, False], [True, False, True, True]])
    classes = torch.tensor([2, 1])
    prompts, target, mask = prompt_sets(bank, classes, labels, "image_labels")
    assert prompts.shape == (2, 8, 24) and torch.equal(prompts[1, 4:], bank.background)
    assert target.tolist() == [1, 0] and torch.equal(prompts[0, 1], bank.foreground[1])
    assert mask.tolist() == [[False, True, False, False] * 2, [True, False, True, True] * 2]
    assert prompt_sets(bank, classes, None, "target")[2].sum(1).tolist() == [2, 2]
    assert prompt_sets(bank, classes, None, "all")[2].all()


def test_block_with_attention_matches_the_block_and_a_manual_softmax():
    visual = tiny(VIT).visual
    x, _ = vit_embed(visual, torch.randn(2, 3, 32, 32))
    block = visual.transformer.resblocks[0]
    out, weights = block_with_attention(block, x)
    assert torch.allclose(out, block(x), atol=1e-5)
    attn, width = block.attn, x.shape[-1]
    heads = attn.num_heads
    q, k, _ = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).split(width, -1)
    q, k = (t.view(2, -1, heads, width // heads).transpose(1, 2) for t in (q, k))
    manual = ((q @ k.transpose(-1, -2)) / (width // heads) ** 0.5).softmax(-1).mean(1)
    assert torch.allclose(weights, manual, atol=1e-5)


def test_image_features_reuse_one_forward():
    visual = tiny(VIT).visual
    images = torch.randn(2, 3, 40, 32)
    feats = image_features(visual, images, attention_blocks=8)
    x, grid = vit_tokens(visual, images)
    assert feats.grid == grid == (5, 4)
    assert torch.allclose(feats.trunk, x, atol=1e-5)
    assert torch.allclose(feats.tokens[1], visual.transformer.resblocks[-1](x)[:, 1:], atol=1e-5)
    assert feats.affinity.shape == (2, 20, 20) and (feats.affinity >= 0).all()
    resnet = image_features(tiny(RESNET).visual, torch.randn(2, 3, 64, 96), attention_blocks=8)
    assert resnet.grid == (2, 3) and resnet.affinity.shape == (2, 6, 6)
    assert torch.allclose(resnet.affinity.diagonal(dim1=1, dim2=2), torch.ones(2, 6), atol=1e-5)
    assert [t.shape[:2] for t in resnet.tokens] == [(2, 6), (2, 6)]


def two_groups(h: int = 4, w: int = 4) -> torch.Tensor:
    """Affinity 1 within the left half of a grid, 1 within the right half, 0 across."""
    left = (torch.arange(h * w) % w < w // 2).float()
    same = left[:, None] * left[None] + (1 - left)[:, None] * (1 - left)[None]
    return same[None]


def test_high_order_affinity_of_two_groups_is_uniform_within_each():
    t_star = high_order_affinity(two_groups())[0]
    left = torch.arange(16) % 4 < 2
    assert torch.allclose(t_star[left][:, left], torch.full((8, 8), 1 / 8))
    assert torch.allclose(t_star[left][:, ~left], torch.zeros(8, 8))


def test_pir_spreads_the_prior_over_its_group_and_drops_what_lies_outside_the_boxes():
    vtp = torch.full((1, 4, 4), 0.1)
    vtp[0, 0, 0] = 1.0  # the peak, in the left group
    vtp[0, 3, 3] = 0.3  # below 0.4 * max: outside every box
    refined = refine(high_order_affinity(two_groups()), vtp, threshold=0.4)[0]
    left = (torch.arange(16) % 4 < 2).view(4, 4)
    assert torch.allclose(refined[left], torch.ones(8)) and torch.allclose(refined[~left], torch.zeros(8))


def test_box_mask_is_the_union_of_region_boxes():
    maps = torch.zeros(1, 6, 6)
    maps[0, 0, 0:3] = 1
    maps[0, 1:3, 0] = 1  # an L-shaped region: its box is the 3x3 corner
    maps[0, 5, 5] = 0.9  # a second region
    maps[0, 4, 1] = 0.2  # too weak
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0:3, 0:3] = True
    expected[5, 5] = True
    assert torch.equal(box_mask(maps, 0.4)[0], expected)


def test_box_mask_joins_diagonal_neighbours_as_pi_clip_does():
    """PI-CLIP boxes the contours of the thresholded CAM (8-connected): two blobs touching at a
    corner are one region with one box, not two boxes."""
    maps = torch.zeros(1, 6, 6)
    maps[0, 0:2, 0:2] = 1
    maps[0, 2:4, 2:4] = 1  # touches the first blob only at the corner (1, 1) - (2, 2)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0:4, 0:4] = True  # 4-connected regions would leave (0:2, 2:4) and (2:4, 0:2) out
    assert torch.equal(box_mask(maps, 0.4)[0], expected)


def scipy_boxes(maps: torch.Tensor, threshold: float) -> np.ndarray:
    """The reference: scipy's 8-connected components (3x3 structure) and their bounding boxes."""
    expected = np.zeros(maps.shape, bool)
    for p, m in enumerate(maps.numpy()):
        regions, _ = ndimage.label(m >= threshold * m.max(), structure=np.ones((3, 3)))
        for box in ndimage.find_objects(regions):
            expected[p][box] = True
    return expected


def test_box_mask_equals_scipy_on_random_maps():
    """Label propagation + prefix sums against scipy's connected components and find_objects,
    on sparse random maps (many diagonal contacts) and on diagonal chains of single cells."""
    torch.manual_seed(0)
    maps = torch.rand(40, 7, 9) ** 3
    maps[0] = 0.5  # one region covering everything
    chains = torch.zeros(8, 7, 9)
    for p in range(8):  # a staircase of cells touching only at corners, and a stray cell
        for i in range(p % 6 + 2):
            chains[p, i, (i + p) % 9] = 1
        chains[p, 6, 8 - p] = 0.8
    maps = torch.cat([maps, chains])
    assert np.array_equal(box_mask(maps, 0.4).numpy(), scipy_boxes(maps, 0.4))


def test_vvp_equals_a_brute_force_cosine_max():
    torch.manual_seed(0)
    grid = (3, 4)
    query, support = torch.randn(2, 12, 8), torch.randn(2, 3, 12, 8)
    masks = (torch.rand(2, 3, 12) > 0.5).float() * torch.rand(2, 3, 12)
    masks[1, 2] = 0  # an empty support mask
    got = vvp(query, support, masks, grid)
    for b in range(2):
        for k in range(3):
            best = torch.full((12,), -2.0)
            for i in range(12):
                for j in range(12):
                    s = support[b, k, j] * masks[b, k, j]
                    cos = 0.0 if s.norm() == 0 else float(F.cosine_similarity(query[b, i], s, dim=0))
                    best[i] = max(best[i], cos)
            spread = best.max() - best.min()
            expected = torch.zeros(12) if spread == 0 else (best - best.min()) / spread
            assert torch.allclose(got[b, k].flatten(), expected, atol=1e-5), (b, k)


def test_mask_to_grid_is_the_covered_fraction():
    mask = torch.zeros(8, 8)
    mask[:4, :2] = 1
    assert torch.equal(mask_to_grid(mask, (2, 2)), torch.tensor([[0.5, 0.0], [0.0, 0.0]]))


def test_minmax_handles_a_constant_map():
    assert torch.equal(minmax(torch.ones(1, 2, 2)), torch.zeros(1, 2, 2))
    assert np.allclose(minmax(torch.tensor([[[1.0, 3.0]]])).numpy(), [[[0.0, 1.0]]])
