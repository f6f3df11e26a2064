"""Error bars and the paired bootstrap (pipeline.report.stats) against plain references, and the
oracle masks of the mask-quality study (pipeline.pseudomasks.oracle)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.metrics import FewShotMeter
from pipeline.pseudomasks.oracle import truth_mask
from pipeline.report.stats import Scores, paired_bootstrap, resample_weights, summarize


def episodes(seed: int, n: int = 60, test_seeds: int = 3, classes: int = 4,
             quality: float = 0.6) -> pd.DataFrame:
    """A fake evaluation: per episode a class, foreground truth and union, intersection ~ quality."""
    rng = np.random.default_rng(seed)
    union = rng.integers(50, 200, n)
    inter = rng.binomial(union, quality)
    return pd.DataFrame({"seed": np.repeat(np.arange(test_seeds), n // test_seeds),
                         "class_id": np.tile(np.arange(1, classes + 1), n // classes),
                         "inter": inter, "union": union})


def plain_miou(table: pd.DataFrame) -> float:
    """The FSS mIoU of one test seed's episodes, one class at a time."""
    sums = table.groupby("class_id")[["inter", "union"]].sum()
    return float((100 * sums["inter"] / sums["union"]).mean())


def test_mious_equal_a_plain_per_seed_computation_and_the_meter():
    tables = [episodes(s) for s in range(2)]
    scores = Scores.of(tables)
    got = scores.mious()[0]  # (S, T)
    for s, table in enumerate(tables):
        for t in range(3):
            assert got[s, t] == pytest.approx(plain_miou(table[table["seed"] == t]))
    weights = np.zeros((1, 60))
    weights[0, :20] = 1  # only test seed 0's episodes, each once
    assert scores.mious(weights)[0, 0, 0] == pytest.approx(got[0, 0])
    # the meter's per-episode counts are what Scores reads
    meter = FewShotMeter(4, per_episode=True)
    pred = torch.rand(8, 6, 6) < 0.5
    target = (torch.rand(8, 6, 6) < 0.5).to(torch.uint8)
    meter.update(pred, target, torch.arange(8) % 4 + 1)
    counts = meter.episode_counts().assign(seed=0)
    assert Scores.of([counts]).miou() == pytest.approx(meter.miou())


def test_resampling_keeps_each_test_seed_size():
    weights = resample_weights(np.repeat([0, 1, 2], [5, 7, 9]), 50, np.random.default_rng(0))
    assert weights.shape == (50, 21)
    assert (weights[:, :5].sum(1) == 5).all() and (weights[:, 5:12].sum(1) == 7).all()


def test_summary_is_the_mean_and_sample_stds_over_seeds():
    folds = {f: Scores.of([episodes(10 * f + s) for s in range(3)]) for f in range(2)}
    summary = summarize(folds)
    per = np.mean([folds[f].mious()[0] for f in folds], axis=0)  # (S, T)
    assert summary.mean == pytest.approx(per.mean())
    assert summary.train_std == pytest.approx(np.std(per.mean(1), ddof=1))
    assert summary.test_std == pytest.approx(np.mean(np.std(per, axis=1, ddof=1)))
    assert (summary.train_seeds, summary.test_seeds) == (3, 3)


def test_paired_bootstrap_finds_a_real_difference_and_not_noise():
    def config(quality: float, offset: int) -> dict[int, Scores]:
        return {f: Scores.of([episodes(100 * f + s + offset, n=300, quality=quality) for s in range(3)])
                for f in range(2)}

    same = paired_bootstrap(config(0.6, 0), config(0.6, 0), replicates=500)
    assert same.delta == 0 and same.p == 1 and same.mark() == "n.s."
    better = paired_bootstrap(config(0.7, 0), config(0.6, 0), replicates=500)
    assert better.delta == pytest.approx(10, abs=1.5) and better.p < 0.01 and better.mark() == "**"
    assert better.low < better.delta < better.high
    noise = paired_bootstrap(config(0.6, 0), config(0.6, 7), replicates=500)  # same quality, other draws
    assert abs(noise.delta) < 1.5 and noise.low < 0 < noise.high and not noise.significant
    again = paired_bootstrap(config(0.7, 0), config(0.6, 0), replicates=500)
    assert again == better  # seeded: the same result every time


def test_paired_bootstrap_refuses_different_episodes():
    a = {0: Scores.of([episodes(0)])}
    b = {0: Scores.of([episodes(0, n=48)])}
    with pytest.raises(ValueError, match="different episodes"):
        paired_bootstrap(a, b, replicates=10)
    with pytest.raises(ValueError, match="folds differ"):
        paired_bootstrap(a, {1: b[0]}, replicates=10)
    with pytest.raises(ValueError, match="different episodes"):
        Scores.of([episodes(0), episodes(1).assign(class_id=lambda t: t["class_id"][::-1].to_numpy())])


def test_truth_masks_trade_precision_for_recall():
    label = np.zeros((40, 40), np.uint8)
    label[10:30, 5:25] = 3
    label[0:6, 30:40] = 3  # touching the border
    label[9, 5:25] = 255  # an ignore band
    mask = truth_mask(label, 3)
    assert (mask == (label == 3)).all()
    dilated, eroded = truth_mask(label, 3, 2), truth_mask(label, 3, -2)
    assert (dilated >= mask).all() and (eroded <= mask).all()
    assert dilated.sum() > mask.sum() > eroded.sum() > 0
    assert eroded[0, 34], "the image border does not erode"
    assert not eroded[10, 5] and eroded[20, 15]
    assert dilated[8, 5] and not dilated[8, 3] and not dilated[37, 37]
