"""`clip_model`: the CLIP every later stage uses, as an open_clip local-dir folder.

* ``tiny-vit`` / ``tiny-resnet``: installed from the shipped fixture (``fixtures/<model>``, see
  ``pipeline/tinyclip/fixture.py``) when it was made with the same params and caption corpus, else
  trained here on the synthetic caption corpus, rendered first (in shards, from the generator
  params in ``data/synthetic/meta.json``) and deleted after (two phases, checkpointed: a crashed
  run resumes); then evaluated: zero-shot top-1 on held-out single-object images and MaskCLIP dense
  mIoU on benchmark val images, with chance levels. ``--retrain --write-fixture`` (``make
  tiny-clip``) retrains from scratch and rewrites the fixture.
* any open_clip model: loaded with its pretrained tag or checkpoint, verified, saved.

Writes ``data/models/clip/`` (config, weights, sha256) and ``data/metrics/clip.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from prefect import flow, task

from pipeline.clip.loader import ClipBundle, load_pretrained, save_local_dir
from pipeline.core.artifacts import Staging, fingerprint, write_json
from pipeline.core.dtype import resolve
from pipeline.core.errors import PipelineError
from pipeline.core.orchestration import run_flow, run_shards
from pipeline.core.params import ClipParams, Params, SyntheticParams
from pipeline.datasets import synthetic_writer
from pipeline.datasets.synthetic_writer import CAPTIONS_DIR, VOC_DIR
from pipeline.tinyclip import evaluate as evaluate_tiny
from pipeline.tinyclip import fixture
from pipeline.tinyclip import model as tiny
from pipeline.tinyclip import train as train_tiny
from stages._common import stage_main


def _val_images(synthetic: Path, n: int) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """The first ``n`` val images ``(3, H, W)`` uint8 and labels, each at its own size."""
    voc = synthetic / VOC_DIR
    ids = (voc / "ImageSets/Segmentation/val.txt").read_text().split()[:n]
    rgb = [np.array(Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB")) for i in ids]
    images = [torch.from_numpy(x).permute(2, 0, 1) for x in rgb]
    return images, [np.asarray(Image.open(voc / "SegmentationClassAug" / f"{i}.png")) for i in ids]


@task
def caption_shard(root: Path, name: str, indices: range, cfg: SyntheticParams) -> str:
    synthetic_writer.write_caption_shard(root, indices, cfg)
    return name


def render_corpus(staging: Staging, generator: dict) -> Path:
    """Render the caption corpus of the synthetic benchmark's ``generator`` params into the
    staging folder, shard by shard (finished shards survive a crash), and return its folder."""
    cfg = SyntheticParams(**generator)
    shards = {f"captions-{start:06d}": range(start, min(start + cfg.shard_size, cfg.caption_images))
              for start in range(0, cfg.caption_images, cfg.shard_size)}
    run_shards(staging, lambda name: caption_shard.submit(staging.path, name, shards[name], cfg), shards,
               "caption corpus shards",
               lambda name: [synthetic_writer.caption_shard_file(staging.path, shards[name])])
    return staging.path / CAPTIONS_DIR


def train(cfg: ClipParams, generator: dict, staging: Staging) -> tuple[ClipBundle, dict, Any]:
    """Train the tiny CLIP on the caption corpus: the model, its training figures, its phase-1 heads."""
    bundle = tiny.build_tiny(cfg.model, cfg.tiny.seed)
    patch = bundle.model_cfg["vision_cfg"].get("patch_size", 32)  # ResNet: layer4 stride
    corpus_dir = render_corpus(staging, generator)
    corpus = train_tiny.load_corpus(corpus_dir, bundle.image_size, patch)
    start = time.perf_counter()
    phase1, heads = train_tiny.train_phase1(bundle, corpus, cfg.tiny, staging.path / "phase1.ckpt")
    phase2 = train_tiny.train_phase2(bundle, corpus, cfg.tiny)
    seconds = time.perf_counter() - start
    (staging.path / "phase1.ckpt").unlink()
    shutil.rmtree(corpus_dir)  # kept until here: a run resumed from phase1.ckpt (its shards marked
    # done) reads it again
    return bundle, {
        "train_seconds": round(seconds, 1),
        "dtype": resolve(cfg.tiny.dtype, "cpu"),
        "loss": {"phase1_first": float(np.mean(phase1[:50])), "phase1_last": float(np.mean(phase1[-50:])),
                 "phase2_first": float(np.mean(phase2[:20])), "phase2_last": float(np.mean(phase2[-20:]))},
    }, heads


def evaluate(bundle: ClipBundle, cfg: ClipParams, synthetic: Path, heads: Any = None) -> dict:
    heldout = evaluate_tiny.heldout_images(cfg.zero_shot_images)
    images, labels = _val_images(synthetic, cfg.dense_eval_images)
    dense = evaluate_tiny.dense_miou(bundle, images, labels)
    metrics = {"zero_shot_top1": evaluate_tiny.zero_shot_accuracy(bundle, *heldout),
               "zero_shot_chance": 1 / 20,
               "dense_maskclip_miou": dense["miou"], "dense_chance_miou": dense["chance"]}
    if heads is not None:
        metrics["image_head_top1"] = evaluate_tiny.head_accuracy(bundle, heads, *heldout)
    return metrics


@flow(name="clip-model")
def build_clip(cfg: ClipParams, synthetic: Path, out: Path, metrics_path: Path, fixtures: Path,
               retrain: bool = False, write_fixture: bool = False) -> dict:
    generator = None
    if cfg.model in tiny.TINY_MODELS:
        meta = synthetic / "meta.json"
        if not meta.is_file():
            raise PipelineError(f"clip.model = {cfg.model!r} is made from the synthetic benchmark's caption "
                                f"corpus ({meta} is missing: set dataset.name: synthetic)")
        generator = json.loads(meta.read_text())["generator"]
    bundle = None
    if generator is None:  # before the staging folder: weights that fail to load leave nothing behind
        bundle = load_pretrained(cfg.model, cfg.pretrained, cfg.cache_dir)
    staging = Staging(out, fingerprint([cfg.model_dump(), generator]))
    metrics: dict[str, Any] = {}
    if generator is not None:
        clip_key = {"model": cfg.model, "tiny": cfg.tiny.model_dump()}
        installed = None if retrain else fixture.install(fixtures / cfg.model, clip_key, generator)
        if installed is not None:
            bundle, provenance = installed
            metrics |= evaluate(bundle, cfg, synthetic)
            metrics["source"] = {"fixture": str(fixtures / cfg.model), **provenance}
        else:
            bundle, training, heads = train(cfg, generator, staging)
            if write_fixture:
                fixture.round_to_fp16(bundle)
            metrics |= evaluate(bundle, cfg, synthetic, heads) | training
            metrics["source"] = "trained"
            if write_fixture:
                fixture.check_reproduces(fixtures / cfg.model, clip_key, generator, metrics["zero_shot_top1"])
                command = "make tiny-clip  # python -m stages.clip_model --retrain --write-fixture"
                metrics["source"] = {"fixture": str(fixtures / cfg.model), **fixture.write(
                    bundle, fixtures / cfg.model, {"command": command, "clip": clip_key,
                                                   "corpus": fixture.corpus_params(generator),
                                                   "metrics": dict(metrics)})}
    sha = save_local_dir(bundle, staging.path)
    metrics |= {"model": cfg.model, "pretrained": cfg.pretrained, "sha256": sha,
                "preprocess": bundle.preprocess_cfg}
    staging.commit()
    write_json(metrics_path, metrics)
    return metrics


def run(params: Params, args: argparse.Namespace) -> None:
    metrics = run_flow(build_clip, params.orchestration, cfg=params.clip, synthetic=Path(args.synthetic),
                       out=Path(args.out), metrics_path=Path(args.metrics), fixtures=Path(args.fixtures),
                       retrain=args.retrain, write_fixture=args.write_fixture)
    shown = {k: v for k, v in metrics.items() if k in ("zero_shot_top1", "dense_maskclip_miou",
                                                        "dense_chance_miou", "sha256")}
    source = metrics.get("source")
    print(f"clip_model: {metrics['model']} ({'fixture' if isinstance(source, dict) else source}): {shown}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("clip_model", run, {"synthetic": "data/synthetic", "out": "data/models/clip",
                                          "metrics": "data/metrics/clip.json", "fixtures": "fixtures"},
                      argv, flags={"retrain": "train the tiny CLIP even if a matching fixture is shipped",
                                   "write_fixture": "round the trained tiny CLIP to fp16 and write it, "
                                                    "with its provenance, to FIXTURES/MODEL"})


if __name__ == "__main__":
    raise SystemExit(main())
