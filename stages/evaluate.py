"""`evaluate@fold`: score a trained fold on its novel classes.

Reads the fold's model (``data/models/fold{k}``), its test manifests (every shot and seed) and
validation episodes, with the features, priors and pseudo-masks; writes
``data/metrics/fold{k}.json``: per shot, mIoU and FB-IoU (mean ± std over seeds), per-class IoU
and, per seed, the same figures; and the mIoU of the priors alone (the query's VTP thresholded
at the threshold best on the fold's base-class validation episodes, no decoder) under
``prior_miou``, so every run shows what training adds; ``data/metrics/fold{k}_episodes.parquet``:
every test episode's pixel counts (shot, seed, episode, class, intersection, union, ...), what a
paired bootstrap between two models resamples (``pipeline.studies``). Predictions are scored as
``evaluate.resize`` says; a novel class no episode of a manifest draws counts as
``evaluate.absent_class`` says (its classes: ``data/splits/meta.json``). ``protocol`` records the
protocol's name and every convention's value (:mod:`pipeline.fewshot.protocol`).
``data/predictions/fold{k}.npz`` keeps the first ``evaluate.samples`` episodes of
the first 1-shot manifest (ids, support mask, prediction) for the report's figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core.artifacts import write_atomic, write_json
from pipeline.core.dtype import describe
from pipeline.core.errors import PipelineError
from pipeline.core.params import ModelParams, Params
from pipeline.datasets.episodes import read_manifests
from pipeline.datasets.index import read_index_dir
from pipeline.features.backbone import load_backbone
from pipeline.fewshot.checkpoint import MODEL_FILE, load_model
from pipeline.fewshot.data import ImageBank, loader_workers, open_fold_inputs
from pipeline.fewshot.evaluate import Scoring, best_prior_threshold
from pipeline.fewshot.fold_scores import fold_test_manifests, score_fold
from pipeline.fewshot.online import ImageSource
from pipeline.fewshot.protocol import protocol_record
from stages._common import FOLD_INPUTS, stage_main


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
        np.savez_compressed(f, **arrays)


def scoring_of(params: Params, index: pd.DataFrame, bank: ImageBank, clip_dir: Path,
               device: torch.device) -> Scoring:
    """``evaluate.resize`` as a :class:`Scoring` (``pfenet``: with the backbone and the images)."""
    resize, side = params.evaluate.resize, params.backbone.image_size
    if resize != "pfenet":
        return Scoring(resize, side)
    backbone = load_backbone(params.backbone, clip_dir, device)
    return Scoring(resize, side, ImageSource.of_bank(bank, index, side, backbone), backbone)


def fold_novel_classes(path: Path, fold: int) -> list[int]:
    """The class ids fold ``fold`` tests, from the split stage's ``meta.json``."""
    try:
        folds = json.loads(path.read_text())["folds"]
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing (run the split stage first)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: not the split stage's meta.json ({exc!r})") from None
    novel = next((f["novel"] for f in folds if f.get("fold") == fold), None)
    if novel is None:
        raise PipelineError(f"{path}: no fold {fold}")
    return [int(c) for c in novel]


def run(params: Params, args: argparse.Namespace) -> None:
    fold = args.fold
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, saved = load_model(Path(args.models) / f"fold{fold}" / MODEL_FILE, device)
    cfg = ModelParams(**saved["model"])
    index, meta = read_index_dir(Path(args.index))
    manifests = read_manifests(Path(args.episodes))
    tests = fold_test_manifests(list(manifests), fold)
    if not tests:
        raise PipelineError(f"{args.episodes}: no test manifests for fold {fold}")
    novel = fold_novel_classes(Path(args.splits) / "meta.json", fold)
    val_name = f"val/fold{fold}"
    inputs = open_fold_inputs(index, manifests, [*tests, val_name], Path(args.features), Path(args.priors),
                              Path(args.pseudo_masks), cache_bytes=params.orchestration.cache_bytes)
    scoring = scoring_of(params, index, inputs.bank, Path(args.clip), device)
    val = inputs.episodes(val_name, manifests[val_name], cfg)
    # as trained: validation is never letterboxed
    threshold, _ = best_prior_threshold(val, inputs.bank, len(meta["class_names"]))
    workers = loader_workers(inputs.bank, params.orchestration.loader_workers,
                             images=params.evaluate.resize == "pfenet", device=device)
    scores = score_fold(model, cfg, inputs, manifests, tests, meta["class_names"], circle=saved["circle"],
                        prior_threshold=threshold, scoring=scoring, samples=params.evaluate.samples,
                        batch_size=params.evaluate.batch_size, device=device, loader_workers=workers,
                        fold=fold, novel=novel, absent=params.evaluate.absent_class)
    metrics = {
        "fold": fold,
        "prior_threshold": threshold,
        "best_val_miou": saved["best_val_miou"],
        "best_epoch": saved["best_epoch"],
        "train_dtype": saved.get("dtype", "unknown"),
        "compute": {**describe(), "device": device.type},
        "resize": params.evaluate.resize,
        "scored": scoring.description,
        "protocol": protocol_record(params),
    } | scores.summary()
    write_atomic(Path(args.predictions) / f"fold{fold}.npz", lambda tmp: save_npz(tmp, scores.samples))
    write_atomic(Path(args.metrics) / f"fold{fold}_episodes.parquet",
                 lambda tmp: pd.concat(scores.episodes, ignore_index=True).to_parquet(tmp, index=False))
    write_json(Path(args.metrics) / f"fold{fold}.json", metrics)
    for shot in sorted(scores.shots):
        got = metrics[f"shot{shot}"]
        print(f"evaluate: fold {fold}, {shot}-shot: mIoU {got['miou']:.2f} "
              f"(priors alone {got['prior_miou']:.2f})")


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "evaluate",
        run,
        {**FOLD_INPUTS, "splits": "data/splits", "clip": "data/models/clip", "metrics": "data/metrics",
         "predictions": "data/predictions"},
        argv,
        options=lambda p: p.add_argument("--fold", type=int, required=True, help="the fold to evaluate"),
    )


if __name__ == "__main__":
    raise SystemExit(main())
