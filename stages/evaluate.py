"""`evaluate@fold`: score a trained fold on its novel classes.

Reads the fold's model (``data/models/fold{k}``), its test manifests (every shot and seed) and
validation episodes, with the features, priors and pseudo-masks; writes
``data/metrics/fold{k}.json``: per shot, mIoU and FB-IoU (mean ± std over seeds), per-class IoU
and, per seed, the same figures; and the mIoU of the priors alone (the query's VTP thresholded
at the threshold best on the fold's base-class validation episodes, no decoder) under
``prior_miou``, so every run shows what training adds; ``data/metrics/fold{k}_episodes.parquet``:
every test episode's pixel counts (shot, seed, episode, class, intersection, union, ...), what a
paired bootstrap between two models resamples (``pipeline.studies``). Predictions are scored as
``evaluate.resize`` says. ``data/predictions/fold{k}.npz`` keeps the first ``evaluate.samples`` episodes of
the first 1-shot manifest (ids, support mask, prediction) for the report's figures.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.core.artifacts import write_atomic, write_json
from pipeline.core.errors import PipelineError
from pipeline.core.params import ModelParams, Params
from pipeline.core.precision import describe
from pipeline.datasets.episodes import read_manifests
from pipeline.datasets.index import read_index_dir
from pipeline.features.backbone import load_backbone
from pipeline.fewshot.checkpoint import MODEL_FILE, load_model
from pipeline.fewshot.data import EpisodeTable, ImageBank, loader_workers, open_fold_inputs
from pipeline.fewshot.evaluate import (
    Scoring,
    best_prior_threshold,
    evaluate_table,
    prior_meter,
    sample_predictions,
)
from pipeline.fewshot.online import ImageSource
from stages._common import FOLD_INPUTS, stage_main

TEST = re.compile(r"test/fold(?P<fold>\d+)/shot(?P<shot>\d+)_seed(?P<seed>\d+)$")


def summary(per_seed: dict[int, dict]) -> dict:
    """Mean ± sample std over seeds (0 for one seed) of every scalar figure; per-class IoU averaged
    over seeds."""
    seeds = list(per_seed.values())
    out: dict = {}
    for key in ("miou", "fbiou", "prior_miou"):
        values = np.array([s[key] for s in seeds])
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[key], out[f"{key}_std"] = round(float(values.mean()), 2), round(std, 2)
    out["class_iou"] = {
        c: round(float(np.mean([s["class_iou"][c] for s in seeds])), 2) for c in seeds[0]["class_iou"]
    }
    out["seeds"] = {str(seed): s for seed, s in per_seed.items()}
    return out


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


def run(params: Params, args: argparse.Namespace) -> None:
    fold = args.fold
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, saved = load_model(Path(args.models) / f"fold{fold}" / MODEL_FILE, device)
    cfg = ModelParams(**saved["model"])
    index, meta = read_index_dir(Path(args.index))
    names = meta["class_names"]
    manifests = read_manifests(Path(args.episodes))
    tests = sorted(
        (n for n in manifests if (m := TEST.match(n)) and int(m["fold"]) == fold),
        key=lambda n: tuple(int(v) for v in TEST.match(n).groups()),
    )
    if not tests:
        raise PipelineError(f"{args.episodes}: no test manifests for fold {fold}")
    val_name = f"val/fold{fold}"
    inputs = open_fold_inputs(index, manifests, [*tests, val_name], Path(args.features), Path(args.priors),
                              Path(args.pseudo_masks), cache_bytes=params.orchestration.cache_bytes)
    bank, num_classes = inputs.bank, len(names)
    scoring = scoring_of(params, index, bank, Path(args.clip), device)
    val = inputs.episodes(val_name, manifests[val_name], cfg)
    threshold, _ = best_prior_threshold(val, bank, num_classes)  # as trained: validation is never letterboxed
    shots: dict[int, dict[int, dict]] = {}
    episodes: list[pd.DataFrame] = []
    kept: dict[str, np.ndarray] = {}
    sampled = next(
        (n for n in tests if TEST.match(n)["shot"] == "1"), tests[0]
    )  # figures show 1-shot episodes
    for name in tqdm(tests, desc=f"evaluate fold {fold}", file=sys.stderr):
        m = TEST.match(name)
        table = inputs.episodes(name, manifests[name], cfg)

        def keep(
            index: torch.Tensor, probs: torch.Tensor, name: str = name, table: EpisodeTable = table
        ) -> None:
            if not kept:  # the first batch's first episodes
                n = params.evaluate.samples
                kept.update(sample_predictions(name, table, bank, inputs.pseudo, cfg, index[:n], probs[:n],
                                               manifests[name], scoring))

        meter = evaluate_table(
            model,
            table,
            bank,
            num_classes,
            circle_inference=saved["circle"],
            batch_size=params.evaluate.batch_size,
            device=device,
            loader_workers=loader_workers(bank, params.orchestration.loader_workers,
                                          images=params.evaluate.resize == "pfenet"),
            on_batch=keep if name == sampled and params.evaluate.samples else None,
            scoring=scoring,
            per_episode=True,
        )
        counts = meter.episode_counts()
        counts.insert(0, "episode", manifests[name]["episode"].to_numpy())
        counts.insert(0, "seed", int(m["seed"]))
        counts.insert(0, "shot", int(m["shot"]))
        episodes.append(counts)
        classes = sorted(set(table.classes.tolist()))
        shots.setdefault(int(m["shot"]), {})[int(m["seed"])] = {
            "miou": round(meter.miou(classes), 2),
            "fbiou": round(meter.fbiou(), 2),
            "prior_miou": round(prior_meter(table, bank, num_classes, threshold, scoring).miou(classes), 2),
            "class_iou": {names[c - 1]: round(v, 2) for c, v in meter.class_iou(classes).items()},
        }
    metrics = {
        "fold": fold,
        "prior_threshold": threshold,
        "best_val_miou": saved["best_val_miou"],
        "best_epoch": saved["best_epoch"],
        "train_precision": saved.get("precision", "unknown"),
        "compute": {**describe(), "device": device.type},
        "resize": params.evaluate.resize,
        "scored": scoring.description,
    }
    metrics |= {f"shot{shot}": summary(per_seed) for shot, per_seed in sorted(shots.items())}
    write_atomic(Path(args.predictions) / f"fold{fold}.npz", lambda tmp: save_npz(tmp, kept))
    write_atomic(Path(args.metrics) / f"fold{fold}_episodes.parquet",
                 lambda tmp: pd.concat(episodes, ignore_index=True).to_parquet(tmp, index=False))
    write_json(Path(args.metrics) / f"fold{fold}.json", metrics)
    for shot in sorted(shots):
        got = metrics[f"shot{shot}"]
        print(
            f"evaluate: fold {fold}, {shot}-shot: mIoU {got['miou']:.2f} "
            f"(priors alone {got['prior_miou']:.2f})"
        )


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "evaluate",
        run,
        {**FOLD_INPUTS, "clip": "data/models/clip", "metrics": "data/metrics",
         "predictions": "data/predictions"},
        argv,
        options=lambda p: p.add_argument("--fold", type=int, required=True, help="the fold to evaluate"),
    )


if __name__ == "__main__":
    raise SystemExit(main())
