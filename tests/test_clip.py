"""CLIP engine on tiny random open_clip models (ViT and ModifiedResNet towers)."""

from __future__ import annotations

import huggingface_hub.constants
import open_clip
import pytest
import torch
import torch.nn.functional as F

from pipeline.clip import loader
from pipeline.clip.dense import (
    attention_keys,
    dense_features,
    key_smoothing,
    maskclip_labels,
    maskclip_scores,
    prompt_denoising,
    resnet_features,
    vit_tokens,
)
from pipeline.clip.gradcam import softmax_gradcam
from pipeline.clip.prompts import MASKCLIP_TEMPLATES, text_embeddings
from pipeline.core.errors import PipelineError
from tests.conftest import RESNET, VIT, tiny


@pytest.fixture(scope="module")
def vit():
    return tiny(VIT)


@pytest.fixture(scope="module")
def resnet():
    return tiny(RESNET)


@pytest.mark.parametrize(("cfg", "size", "grid"), [(VIT, (32, 32), (4, 4)), (VIT, (40, 56), (5, 7)),
                                                    (RESNET, (64, 64), (2, 2)), (RESNET, (96, 160), (3, 5))])
def test_dense_shapes_for_both_towers_and_any_size(cfg, size, grid):
    model = tiny(cfg)
    text = F.normalize(torch.randn(5, 24), dim=-1)
    images = torch.randn(2, 3, *size)
    feats = dense_features(model.visual, images)
    assert feats.shape == (2, 24, *grid)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2, *grid), atol=1e-5)
    scores = maskclip_scores(model.visual, images, text)
    assert scores.shape == (2, 5, *grid) and scores.abs().max() <= 1 + 1e-5
    labels = maskclip_labels(model.visual, images, text)
    assert labels.shape == (2, *size) and labels.max() < 5


def test_vit_trunk_matches_open_clip_forward_at_native_size(vit):
    images = torch.randn(3, 3, 32, 32)
    x, grid = vit_tokens(vit.visual, images)
    x = vit.visual.transformer.resblocks[-1](x)
    pooled = (vit.visual.ln_post(x[:, 1:]) @ vit.visual.proj).mean(1)
    assert grid == (4, 4)
    assert torch.allclose(pooled, vit.visual(images), atol=1e-5)


def test_resnet_value_path_equals_attention_pool_on_a_1x1_map():
    model = tiny({**RESNET, "vision_cfg": {**RESNET["vision_cfg"], "image_size": 32}})
    pool = model.visual.attnpool
    with torch.no_grad():
        pool.positional_embedding.zero_()
    images = torch.randn(4, 3, 32, 32)
    assert resnet_features(model.visual, images).shape[-2:] == (1, 1)
    expected = F.normalize(pool(resnet_features(model.visual, images)), dim=-1)
    assert torch.allclose(dense_features(model.visual, images)[:, :, 0, 0], expected, atol=1e-5)


def reference_gradcam(model, image, prompts, target):
    """One pair at a time, plain autograd through open_clip's own forward."""
    visual, store = model.visual, {}
    if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
        module = visual.layer4
    else:
        module = visual.transformer.resblocks[-1].ln_1

    def keep(_, __, output):
        output.retain_grad()
        store["a"] = output

    handle = module.register_forward_hook(keep)
    embedding = F.normalize(visual(image[None]), dim=-1)[0]
    handle.remove()
    prob = (model.logit_scale.exp() * prompts @ embedding).softmax(-1)[target]
    prob.backward()
    acts, grads = store["a"][0], store["a"].grad[0]
    if acts.dim() == 3:  # (C, h, w)
        cam = F.relu((acts * grads.mean((1, 2), keepdim=True)).sum(0))
    else:  # (1 + N, D) tokens
        side = int((acts.shape[0] - 1) ** 0.5)
        cam = F.relu((acts[1:] * grads[1:].mean(0)).sum(-1)).view(side, side)
    if cam.max() == cam.min():  # flat map (e.g. all negative before the ReLU): defined as zeros
        return torch.zeros_like(cam)
    return (cam - cam.min()) / (cam.max() - cam.min())


@pytest.mark.parametrize("cfg", [VIT, RESNET], ids=["vit", "resnet"])
def test_batched_gradcam_equals_one_pair_at_a_time(cfg):
    model = tiny(cfg, seed=1)
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(3, 3, size, size)
    image_index = torch.tensor([0, 0, 1, 2, 2])
    prompts = F.normalize(torch.randn(5, 4, 24), dim=-1)
    target = torch.tensor([0, 3, 1, 2, 0])
    cams = softmax_gradcam(model.visual, images, image_index, prompts, target, model.logit_scale.exp().item())
    assert cams.shape[0] == 5 and cams.min() >= 0 and cams.max() <= 1
    real_maps = 0
    for p in range(5):
        expected = reference_gradcam(model, images[image_index[p]], prompts[p], target[p])
        assert torch.allclose(cams[p], expected, atol=1e-4), p
        real_maps += int(expected.max() == 1)
    assert real_maps >= 3  # the comparison is not between flat maps


def test_local_dir_round_trip_gives_identical_embeddings(vit, tmp_path):
    bundle = loader.ClipBundle(vit, VIT, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32)
    sha = loader.save_local_dir(bundle, tmp_path / "clip")
    loaded = loader.load_local_dir(tmp_path / "clip")
    assert loaded.sha256 == sha and loaded.image_size == 32 and loaded.mean == (0.5, 0.5, 0.5)
    images, tokens = torch.randn(2, 3, 32, 32), bundle.tokenizer()(["a photo of a star."])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), vit.encode_image(images))
        assert torch.equal(loaded.model.encode_text(tokens), vit.encode_text(tokens))
    # also readable by open_clip itself
    again = open_clip.create_model(f"local-dir:{tmp_path / 'clip'}").eval()
    with torch.no_grad():
        assert torch.allclose(again.encode_image(images), vit.encode_image(images))


def test_damaged_or_missing_local_dir(vit, tmp_path):
    bundle = loader.ClipBundle(vit, VIT, (0.5,) * 3, (0.25,) * 3, 32)
    loader.save_local_dir(bundle, tmp_path / "clip")
    weights = tmp_path / "clip" / loader.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(PipelineError, match="sha256 .* differs"):
        loader.load_local_dir(tmp_path / "clip")
    with pytest.raises(PipelineError, match="missing .run the clip_model stage"):
        loader.load_local_dir(tmp_path / "nowhere")


def test_missing_pretrained_weights_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError) as err:
        loader.load_pretrained("RN50", "openai", str(tmp_path / "cache"))
    message = str(err.value)
    assert "\n" not in message and "weights for RN50 are not cached" in message
    assert "local checkpoint path" in message and str(tmp_path / "cache") in message
    with pytest.raises(PipelineError, match="neither a pretrained tag of RN50"):
        loader.load_pretrained("RN50", str(tmp_path / "nope.pt"))
    with pytest.raises(PipelineError, match="not an open_clip model"):
        loader.load_pretrained("ViT-Nope", None)


def test_openai_weights_use_quick_gelu():
    assert loader._uses_quick_gelu("ViT-B-16", "openai")
    assert loader._uses_quick_gelu("ViT-B-16-quickgelu", None)
    assert not loader._uses_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")


def test_text_embeddings_average_normalised_templates_and_cache(vit, tmp_path):
    assert len(MASKCLIP_TEMPLATES) == 85
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    templates = MASKCLIP_TEMPLATES[:3]
    emb = text_embeddings(vit, tokenizer, ["star", "ring"], templates, tmp_path, "sha")
    assert emb.shape == (2, 24) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        per = F.normalize(vit.encode_text(tokenizer([t.format("ring") for t in templates])), dim=-1)
    assert torch.allclose(emb[1], F.normalize(per.mean(0), dim=0), atol=1e-6)
    assert len(list(tmp_path.glob("text-*.pt"))) == 1
    assert torch.equal(text_embeddings(vit, tokenizer, ["star", "ring"], templates, tmp_path, "sha"), emb)
    text_embeddings(vit, tokenizer, ["star", "ring"], templates, tmp_path, "other-weights")
    assert len(list(tmp_path.glob("text-*.pt"))) == 2


def test_key_smoothing_against_a_plain_loop():
    torch.manual_seed(0)
    scores, key_features = torch.randn(2, 3, 2, 3), torch.randn(2, 6, 5)
    smoothed = key_smoothing(scores, key_features)
    for b in range(2):
        k = F.normalize(key_features[b], dim=-1)
        flat = scores[b].flatten(1)
        for n in range(6):
            weights = [max(0.0, float(k[n] @ k[m])) for m in range(6)]
            expected = sum(w * flat[:, m] for m, w in enumerate(weights)) / sum(weights)
            assert torch.allclose(smoothed[b].flatten(1)[:, n], expected, atol=1e-5)


def test_prompt_denoising_drops_classes_never_confident():
    scores = torch.zeros(1, 3, 2, 2)
    scores[0, 0] = 0.3  # confident everywhere
    scores[0, 1, 0, 0] = 0.31  # confident at one position
    denoised = prompt_denoising(scores, threshold=0.5)
    assert torch.isinf(denoised[0, 2]).all() and not torch.isinf(denoised[0, :2]).any()
    assert not torch.isinf(prompt_denoising(torch.zeros(1, 3, 2, 2), threshold=0.9)[0, 0]).any()


@pytest.mark.parametrize("cfg", [VIT, RESNET], ids=["vit", "resnet"])
def test_options_keep_shapes(cfg):
    model = tiny(cfg)
    images, text = torch.randn(2, 3, 64, 64), F.normalize(torch.randn(4, 24), dim=-1)
    plain = maskclip_scores(model.visual, images, text)
    smoothed = maskclip_scores(model.visual, images, text, smooth_keys=True, denoise_threshold=0.3)
    assert smoothed.shape == plain.shape and not torch.equal(smoothed, plain)
    composed = prompt_denoising(key_smoothing(plain, attention_keys(model.visual, images)), 0.3)
    assert torch.allclose(smoothed, composed, atol=1e-5)
    assert attention_keys(model.visual, images).shape[:2] == (2, plain.shape[-2] * plain.shape[-1])


@pytest.mark.parametrize("shape,size", [((6, 20, 8, 8), (64, 64)), ((3, 81, 7, 9), (45, 60)),
                                        ((2, 5, 16, 16), None), ((2, 1, 4, 4), (9, 9))])
def test_labels_from_scores_equal_the_plain_upsample_then_argmax(shape, size):
    """The running maximum over classes = argmax(1) of the upsampled maps (ties: the first class)."""
    from pipeline.clip.dense import labels_from_scores

    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).half()
    scores[0, -1] = scores[0, 0]  # a tie everywhere: the first class wins, as with argmax
    if size is None:
        plain = scores.float()
    else:  # each class upsampled alone: all-at-once may round a class 1 ulp apart, moving exact ties
        plain = torch.cat([F.interpolate(scores[:, k: k + 1].float(), size=size, mode="bilinear",
                                         align_corners=False) for k in range(shape[1])], 1)
    assert torch.equal(labels_from_scores(scores, size), plain.argmax(1))


def test_labels_from_scores_on_the_benchmark_shape_equal_upsampling_all_classes_at_once():
    """8x8 -> 256 (the embedded benchmark): bit-identical to the one-call upsample + argmax."""
    from pipeline.clip.dense import labels_from_scores

    scores = torch.randn(16, 20, 8, 8, generator=torch.Generator().manual_seed(1)).half()
    at_once = F.interpolate(scores.float(), size=(256, 256), mode="bilinear", align_corners=False)
    assert torch.equal(labels_from_scores(scores, (256, 256)), at_once.argmax(1))


def test_pretrained_weights_come_from_the_cache_first_and_a_failure_keeps_its_whole_cause(monkeypatch):
    """The first lookup is offline (no network, no retries); only if the cache lacks the weights
    is a download tried; its failure's root cause is said whole, on one line."""
    seen = []

    def create_model(*args, **kwargs):
        seen.append(huggingface_hub.constants.HF_HUB_OFFLINE)
        try:
            raise OSError("Connection to huggingface.co timed out.\n(connect timeout=10)")
        except OSError as exc:
            raise RuntimeError("Failed to download file (open_clip_model.safetensors) for timm/x.") from exc

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(open_clip, "create_model", create_model)
    monkeypatch.setattr(loader, "_unreachable", lambda url: None)  # the host answers; the download fails
    with pytest.raises(PipelineError) as err:
        loader.load_pretrained("RN50", "openai")
    assert seen == [True, False] and huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert "(Connection to huggingface.co timed out. (connect timeout=10))" in str(err.value)
    assert "\n" not in str(err.value)
