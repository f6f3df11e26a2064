"""`clip_model`: the CLIP every later stage uses, as an open_clip local-dir folder.

* ``tiny-vit`` / ``tiny-resnet``: trained here on the synthetic caption corpus (two phases,
  checkpointed: a crashed run resumes), then evaluated: zero-shot top-1 on held-out
  single-object images and MaskCLIP dense mIoU on benchmark val images, with chance levels.
* any open_clip model: loaded with its pretrained tag or checkpoint, verified, saved.

Writes ``data/models/clip/`` (config, weights, sha256) and ``data/metrics/clip.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from prefect import flow

from pipeline.clip import evaluate_tiny, tiny, train_tiny
from pipeline.clip.loader import load_pretrained, save_local_dir
from pipeline.datasets.synthetic_writer import CAPTIONS_DIR, VOC_DIR
from pipeline.errors import PipelineError
from pipeline.orchestration import run_flow
from pipeline.params import ClipParams, Params
from pipeline.store import Staging, fingerprint, write_json
from stages._common import stage_main


def _val_images(synthetic: Path, n: int) -> tuple[torch.Tensor, np.ndarray]:
    voc = synthetic / VOC_DIR
    ids = (voc / "ImageSets/Segmentation/val.txt").read_text().split()[:n]
    images = np.stack([np.asarray(Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB")) for i in ids])
    labels = np.stack([np.asarray(Image.open(voc / "SegmentationClassAug" / f"{i}.png")) for i in ids])
    return torch.from_numpy(images).permute(0, 3, 1, 2), labels


@flow(name="clip-model")
def build_clip(cfg: ClipParams, synthetic: Path, out: Path, metrics_path: Path) -> dict:
    corpus_dir = synthetic / CAPTIONS_DIR
    if cfg.model in tiny.TINY_MODELS and not corpus_dir.is_dir():
        raise PipelineError(f"clip.model = {cfg.model!r} trains on the synthetic caption corpus "
                            f"({corpus_dir} is missing: set dataset.name: synthetic)")
    staging = Staging(out, fingerprint(cfg.model_dump()))
    if cfg.model in tiny.TINY_MODELS:
        bundle = tiny.build_tiny(cfg.model, cfg.tiny.seed)
        grid = bundle.image_size // (8 if cfg.model == "tiny-vit" else 32)
        corpus = train_tiny.load_corpus(corpus_dir, bundle.image_size, bundle.image_size // grid)
        start = time.perf_counter()
        phase1, heads = train_tiny.train_phase1(bundle, corpus, cfg.tiny, staging.path / "phase1.ckpt")
        phase2 = train_tiny.train_phase2(bundle, corpus, cfg.tiny)
        seconds = time.perf_counter() - start
        (staging.path / "phase1.ckpt").unlink()
        images, labels = _val_images(synthetic, cfg.dense_eval_images)
        dense = evaluate_tiny.dense_miou(bundle, images, labels)
        heldout = evaluate_tiny.heldout_images(cfg.zero_shot_images)
        metrics = {
            "zero_shot_top1": evaluate_tiny.zero_shot_accuracy(bundle, *heldout),
            "zero_shot_chance": 1 / 20,
            "image_head_top1": evaluate_tiny.head_accuracy(bundle, heads, *heldout),
            "dense_maskclip_miou": dense["miou"], "dense_chance_miou": dense["chance"],
            "train_seconds": round(seconds, 1),
            "loss": {"phase1_first": float(np.mean(phase1[:50])),
                     "phase1_last": float(np.mean(phase1[-50:])),
                     "phase2_first": float(np.mean(phase2[:20])),
                     "phase2_last": float(np.mean(phase2[-20:]))},
        }
    else:
        bundle = load_pretrained(cfg.model, cfg.pretrained, cfg.cache_dir)
        metrics = {}
    sha = save_local_dir(bundle, staging.path)
    metrics |= {"model": cfg.model, "pretrained": cfg.pretrained, "sha256": sha,
                "preprocess": bundle.preprocess_cfg}
    staging.commit()
    write_json(metrics_path, metrics)
    return metrics


def run(params: Params, args: argparse.Namespace) -> None:
    metrics = run_flow(build_clip, params.orchestration, cfg=params.clip, synthetic=Path(args.synthetic),
                       out=Path(args.out), metrics_path=Path(args.metrics))
    shown = {k: v for k, v in metrics.items() if k in ("zero_shot_top1", "dense_maskclip_miou",
                                                        "dense_chance_miou", "sha256")}
    print(f"clip_model: {metrics['model']}: {shown}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("clip_model", run, {"synthetic": "data/synthetic", "out": "data/models/clip",
                                          "metrics": "data/metrics/clip.json"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
