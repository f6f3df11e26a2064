"""The tiny CLIP: its conv stem, its training (loss falls, resume is exact) and its round trip."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.clip import loader
from pipeline.clip.loader import load_local_dir, save_local_dir
from pipeline.core.errors import PipelineError
from pipeline.core.params import TinyClipParams
from pipeline.datasets.synthetic import IGNORE, caption
from pipeline.tinyclip import fixture
from pipeline.tinyclip import train as train_tiny
from pipeline.tinyclip.model import build_tiny
from tests.conftest import SMOKE

FAST = TinyClipParams(batch_size=6, phase1_steps=24, phase2_steps=6, warmup=2, checkpoint_every=8,
                      dtype="fp32")


@pytest.fixture(scope="module")
def corpus(benchmark_root):
    return train_tiny.load_corpus(benchmark_root / "captions", 128, 16)


def test_conv_stem_keeps_the_patchify_interface():
    vit = build_tiny("tiny-vit", 0).model.visual
    assert vit.conv1(torch.zeros(2, 3, 128, 128)).shape == (2, vit.transformer.width, 8, 8)
    assert vit(torch.zeros(2, 3, 128, 128)).shape == (2, 64)


def test_patch_majority_against_a_plain_loop():
    rng = np.random.default_rng(0)
    label = rng.choice([0, 3, 7, IGNORE], size=(16, 16), p=[0.4, 0.25, 0.15, 0.2]).astype(np.uint8)
    expected = np.zeros((4, 4), np.int64)
    for i in range(4):
        for j in range(4):
            values, counts = np.unique(label[4 * i: 4 * i + 4, 4 * j: 4 * j + 4], return_counts=True)
            order = sorted(zip(-counts, [v if v != IGNORE else 21 for v in values], strict=True))
            best = order[0][1]
            expected[i, j] = IGNORE if best == 21 else best
    assert np.array_equal(train_tiny.patch_majority(label, 4), expected)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-resnet"])
def test_smoke_training_lowers_the_loss_and_round_trips(name, corpus, benchmark_root, tmp_path):
    bundle = build_tiny(name, 0)
    if name == "tiny-resnet":  # one label per layer4 position: 32-px patches
        corpus = train_tiny.load_corpus(benchmark_root / "captions", 64, 32)
    losses, _ = train_tiny.train_phase1(bundle, corpus, FAST, tmp_path / "ckpt")
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    text_losses = train_tiny.train_phase2(bundle, corpus, FAST)
    assert np.isfinite(text_losses).all()
    save_local_dir(bundle, tmp_path / "clip")
    loaded = load_local_dir(tmp_path / "clip")
    images = train_tiny.normalize(corpus.images[:3], bundle)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), bundle.model.encode_image(images))


def test_resume_continues_exactly_where_it_stopped(corpus, tmp_path, monkeypatch):
    whole = build_tiny("tiny-vit", 0)
    train_tiny.train_phase1(whole, corpus, FAST, tmp_path / "whole.ckpt")

    real = train_tiny._checkpoint

    def crash_after_second_save(path, **state):
        real(path, **state)
        if state["step"] == 16:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_tiny, "_checkpoint", crash_after_second_save)
    with pytest.raises(KeyboardInterrupt):
        train_tiny.train_phase1(build_tiny("tiny-vit", 0), corpus, FAST, tmp_path / "cut.ckpt")
    monkeypatch.setattr(train_tiny, "_checkpoint", real)
    resumed = build_tiny("tiny-vit", 0)
    losses, _ = train_tiny.train_phase1(resumed, corpus, FAST, tmp_path / "cut.ckpt")
    assert len(losses) == FAST.phase1_steps
    for (name, a), b in zip(whole.model.visual.state_dict().items(),
                            resumed.model.visual.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_a_fresh_interpreter_loads_the_tiny_vit_folder(tmp_path):
    """Later stages import only the loader: it must know the conv stem by itself."""
    save_local_dir(build_tiny("tiny-vit", 0), tmp_path / "clip")
    code = ("import sys; from pathlib import Path; from pipeline.clip.loader import load_local_dir; "
            "b = load_local_dir(Path(sys.argv[1])); print(type(b.model.visual.conv1).__name__)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "clip")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == "Sequential"


def test_dihedral_moves_images_and_patch_labels_together():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    labels = torch.randint(0, 21, (2, 4, 4))
    out_images, out_labels = train_tiny.dihedral(images, labels, np.random.default_rng(3))
    for i in range(2):
        variants = [torch.rot90(im, k, dims=(-2, -1))
                    for im in (images[i], images[i].flip(-1)) for k in range(4)]
        assert any(torch.equal(out_images[i], v) for v in variants)
        k = next(j for j, v in enumerate(variants) if torch.equal(out_images[i], v))
        lab = labels[i].flip(-1) if k >= 4 else labels[i]
        assert torch.equal(out_labels[i], torch.rot90(lab, k % 4, dims=(-2, -1)))


def test_corpus_captions_rebuild_from_names_and_colours(corpus):
    """Phase 2 rebuilds captions (with or without colours) from the corpus' objects."""
    for i, text in enumerate(corpus.captions):
        assert caption(corpus.names[i], corpus.colours[i]) == text
        bare = caption(corpus.names[i])
        assert all(c not in bare for c in corpus.colours[i]) and bare.startswith("a photo of a")
    assert caption(["arrow", "star"]) == "a photo of an arrow and a star."


def test_fixture_round_trip_installs_only_for_its_params_and_corpus(tmp_path):
    bundle = build_tiny("tiny-vit", 0)
    bundle.model.eval()
    fixture.round_to_fp16(bundle)
    clip, generator = {"model": "tiny-vit", "tiny": FAST.model_dump()}, SMOKE.model_dump()
    provenance = fixture.write(bundle, tmp_path / "tiny-vit", {"clip": clip, "corpus": fixture.corpus_params(
        generator), "metrics": {"zero_shot_top1": 0.9}})
    assert provenance["weights_sha256"] == (tmp_path / "tiny-vit/sha256.txt").read_text().strip()
    assert (tmp_path / "tiny-vit" / loader.WEIGHTS_FILE).stat().st_size < 0.55 * 4 * sum(
        p.numel() for p in bundle.model.parameters())  # fp16 on disk
    installed, shipped = fixture.install(tmp_path / "tiny-vit", clip, generator)
    assert shipped["metrics"] == {"zero_shot_top1": 0.9}
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(installed.model.encode_image(images), bundle.model.encode_image(images))
    assert fixture.install(tmp_path / "tiny-vit", clip, {**generator, "caption_images": 13}) is None
    assert fixture.install(tmp_path / "tiny-vit", {**clip, "tiny": {**clip["tiny"], "seed": 1}},
                           generator) is None
    assert fixture.install(tmp_path / "elsewhere", clip, generator) is None
    fixture.check_reproduces(tmp_path / "tiny-vit", clip, generator, 0.885)
    with pytest.raises(PipelineError, match="not within 0.02 of the shipped 0.900"):
        fixture.check_reproduces(tmp_path / "tiny-vit", clip, generator, 0.87)
