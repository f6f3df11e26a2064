"""A trained fold scored on its test manifests (every shot and test seed): per manifest the model's
mIoU, FB-IoU, per-class IoU and the priors-alone mIoU, the per-episode counts the paired bootstrap
resamples (:mod:`pipeline.report.stats`), and a few predictions kept for the report's figure; per
shot the mean ± sample std over test seeds. A novel class of the fold that no episode of a manifest
draws counts as ``absent`` says (:class:`~pipeline.core.metrics.FewShotMeter`)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline.core.metrics import Absent
from pipeline.core.params import ModelParams
from pipeline.fewshot.data import EpisodeTable, FoldInputs
from pipeline.fewshot.evaluate import Scoring, evaluate_table, prior_meter, sample_predictions

TEST = re.compile(r"test/fold(?P<fold>\d+)/shot(?P<shot>\d+)_seed(?P<seed>\d+)$")


def fold_test_manifests(names: list[str], fold: int) -> list[str]:
    """The fold's test manifests in (shot, seed) order."""
    found = [n for n in names if (m := TEST.match(n)) and int(m["fold"]) == fold]
    return sorted(found, key=lambda n: tuple(int(v) for v in TEST.match(n).groups()))


@dataclass
class FoldScores:
    """What :func:`score_fold` measured."""

    shots: dict[int, dict[int, dict]] = field(default_factory=dict)  # shot -> test seed -> figures
    episodes: list[pd.DataFrame] = field(default_factory=list)  # per manifest: per-episode counts
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # sample predictions (1-shot)

    def summary(self) -> dict[str, dict]:
        """``shot{k}`` -> :func:`summary` of its seeds."""
        return {f"shot{shot}": summary(per_seed) for shot, per_seed in sorted(self.shots.items())}


def summary(per_seed: dict[int, dict]) -> dict:
    """Mean ± sample std over seeds (0 for one seed) of every scalar figure; per-class IoU averaged
    over seeds."""
    seeds = list(per_seed.values())
    out: dict = {}
    for key in ("miou", "fbiou", "prior_miou"):
        values = np.array([s[key] for s in seeds])
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[key], out[f"{key}_std"] = round(float(values.mean()), 2), round(std, 2)
    names = dict.fromkeys(c for s in seeds for c in s["class_iou"])  # a skipped class is absent from a seed
    out["class_iou"] = {
        c: round(float(np.mean([s["class_iou"][c] for s in seeds if c in s["class_iou"]])), 2) for c in names
    }
    out["seeds"] = {str(seed): s for seed, s in per_seed.items()}
    return out


def score_fold(
    model: nn.Module, cfg: ModelParams, inputs: FoldInputs, manifests: dict[str, pd.DataFrame],
    tests: list[str], class_names: list[str], *, circle: bool, prior_threshold: float, scoring: Scoring,
    samples: int, batch_size: int, device: torch.device, loader_workers: int, fold: int,
    novel: list[int] | None = None, absent: Absent = "skip",
) -> FoldScores:
    """Score ``model`` on every manifest of ``tests``; the first 1-shot manifest's first batch gives
    the ``samples`` kept predictions. ``novel``: the fold's test classes, each in the mean even when
    a manifest draws none of its episodes (``absent="zero"``: IoU 0); None, or ``absent="skip"``: the
    classes the manifest draws."""
    bank, num_classes = inputs.bank, len(class_names)
    scores = FoldScores()
    sampled = next((n for n in tests if TEST.match(n)["shot"] == "1"), tests[0])  # figures show 1-shot
    for name in tqdm(tests, desc=f"evaluate fold {fold}", file=sys.stderr):
        m = TEST.match(name)
        table = inputs.episodes(name, manifests[name], cfg)
        keep = _sampler(scores.samples, samples, name, table, inputs, cfg, manifests[name], scoring)
        meter = evaluate_table(model, table, bank, num_classes, circle_inference=circle,
                               batch_size=batch_size, device=device, loader_workers=loader_workers,
                               on_batch=keep if name == sampled and samples else None, scoring=scoring,
                               per_episode=True)
        counts = meter.episode_counts()
        counts.insert(0, "episode", manifests[name]["episode"].to_numpy())
        counts.insert(0, "seed", int(m["seed"]))
        counts.insert(0, "shot", int(m["shot"]))
        scores.episodes.append(counts)
        drawn = sorted(set(table.classes.tolist()))
        classes = sorted(novel) if novel is not None and absent == "zero" else drawn
        priors = prior_meter(table, bank, num_classes, prior_threshold, scoring)
        scores.shots.setdefault(int(m["shot"]), {})[int(m["seed"])] = {
            "miou": round(meter.miou(classes, absent), 2),
            "fbiou": round(meter.fbiou(), 2),
            "prior_miou": round(priors.miou(classes, absent), 2),
            "class_iou": {class_names[c - 1]: round(v, 2)
                          for c, v in meter.class_iou(classes, absent).items()},
            "absent_classes": [class_names[c - 1] for c in sorted(set(novel or drawn) - set(drawn))],
        }
    return scores


def _sampler(kept: dict[str, np.ndarray], n: int, name: str, table: EpisodeTable, inputs: FoldInputs,
             cfg: ModelParams, manifest: pd.DataFrame, scoring: Scoring,
             ) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """An ``on_batch`` hook that keeps the first batch's first ``n`` episodes in ``kept``."""
    def keep(index: torch.Tensor, probs: torch.Tensor) -> None:
        if not kept:
            kept.update(sample_predictions(name, table, inputs.bank, inputs.pseudo, cfg, index[:n], probs[:n],
                                           manifest, scoring))
    return keep
