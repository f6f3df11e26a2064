"""Error bars and significance of few-shot results over training seeds and test episodes.

A configuration's result on one fold and shot is a :class:`Scores`: the per-episode counts of
``S`` training seeds on the same ``E`` test episodes (``T`` test seeds of episodes, stratified).
Its mIoU is the FSS one (per class: sums over the episodes, then the mean over classes), taken per
(training seed, test seed) and averaged.

:func:`paired_bootstrap` compares two configurations on the same episodes and training seeds: a
two-level paired bootstrap that, in every replicate and fold, resamples the episodes (within each
test seed, the same draw for both configurations and all training seeds) and the training seeds
(the same draw for both), and recomputes the difference of the mean over folds. It gives the
difference, its 95 % percentile interval and a two-sided p-value (the share of replicates on the
other side of 0, doubled). With 3 training seeds the seed level of a bootstrap is slightly
optimistic (it sees (S-1)/S of the seed variance); the episode level is exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Scores:
    """Per-episode counts of one configuration on one fold and shot.

    Attributes:
        inter, union: ``(S, E)`` foreground pixel counts of ``S`` training seeds on ``E`` episodes.
        classes: ``(E,)`` each episode's class; test_seeds: ``(E,)`` the test seed it was drawn with.
    """

    inter: np.ndarray
    union: np.ndarray
    classes: np.ndarray
    test_seeds: np.ndarray

    @classmethod
    def of(cls, tables: list[pd.DataFrame]) -> Scores:
        """From one episode table per training seed (columns ``seed``, ``class_id``, ``inter``,
        ``union``; the same episodes in the same order in each)."""
        first, classes = tables[0], tables[0]["class_id"].to_numpy()
        for table in tables[1:]:
            if len(table) != len(first) or (table["class_id"].to_numpy() != classes).any():
                raise ValueError("the training seeds were scored on different episodes")
        return cls(np.stack([t["inter"].to_numpy(np.float64) for t in tables]),
                   np.stack([t["union"].to_numpy(np.float64) for t in tables]),
                   first["class_id"].to_numpy(), first["seed"].to_numpy())

    def same_episodes(self, other: Scores) -> bool:
        return (self.inter.shape == other.inter.shape and (self.classes == other.classes).all()
                and (self.test_seeds == other.test_seeds).all())

    def mious(self, weights: np.ndarray | None = None) -> np.ndarray:
        """``(B, S, T)`` mIoU (%) per training seed and test seed, the episodes weighted by
        ``weights`` ``(B, E)`` (resampling counts; None: each once, B = 1)."""
        w = np.ones((1, self.inter.shape[1])) if weights is None else weights
        seeds, t = np.unique(self.test_seeds, return_inverse=True)
        kinds, c = np.unique(self.classes, return_inverse=True)
        group = np.zeros((len(t), len(seeds) * len(kinds)))
        group[np.arange(len(t)), t * len(kinds) + c] = 1.0  # (E, T*C): episode -> (test seed, class)
        inter = np.stack([(w * self.inter[s]) @ group for s in range(len(self.inter))], 1)
        union = np.stack([(w * self.union[s]) @ group for s in range(len(self.union))], 1)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a test seed without any episode: nan
            iou = np.where(union > 0, 100 * inter / union, np.nan)  # a class drawn in no episode: nan
            return np.nanmean(iou.reshape(*iou.shape[:2], len(seeds), len(kinds)), axis=-1)

    def miou(self) -> float:
        """The mean over training and test seeds."""
        return float(self.mious().mean())


@dataclass(frozen=True)
class Summary:
    """A configuration's mIoU over folds: ``mean``; ``train_std``, the sample std over training
    seeds of the mean over folds and test seeds; ``test_std``, the sample std over test seeds of the
    mean over folds, averaged over training seeds."""

    mean: float
    train_std: float
    test_std: float
    train_seeds: int
    test_seeds: int


def summarize(folds: Mapping[int, Scores]) -> Summary:
    per = np.stack([s.mious()[0] for s in folds.values()]).mean(0)  # (S, T): mean over folds
    train_std = float(per.mean(1).std(ddof=1)) if per.shape[0] > 1 else float("nan")
    test_std = float(per.std(1, ddof=1).mean()) if per.shape[1] > 1 else float("nan")
    return Summary(float(per.mean()), train_std, test_std, per.shape[0], per.shape[1])


@dataclass(frozen=True)
class Difference:
    """``a - b`` in mIoU points over folds, its 95 % bootstrap interval and two-sided p-value."""

    delta: float
    low: float
    high: float
    p: float
    replicates: int

    @property
    def significant(self) -> bool:
        return self.p < 0.05

    def mark(self) -> str:
        """``**`` p < 0.01, ``*`` p < 0.05, ``n.s.`` within noise."""
        return "**" if self.p < 0.01 else "*" if self.p < 0.05 else "n.s."


def resample_weights(test_seeds: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """``(B, E)`` bootstrap counts: each test seed's episodes resampled with replacement."""
    weights = np.zeros((replicates, len(test_seeds)))
    for seed in np.unique(test_seeds):
        where = np.flatnonzero(test_seeds == seed)
        weights[:, where] = rng.multinomial(len(where), np.full(len(where), 1 / len(where)), size=replicates)
    return weights


def paired_bootstrap(a: Mapping[int, Scores], b: Mapping[int, Scores], replicates: int = 10_000,
                     seed: int = 0, chunk: int = 1000) -> Difference:
    """Difference of the mean mIoU over folds of ``a`` and ``b`` (same folds, episodes and training
    seeds), by the two-level paired bootstrap of the module's docstring."""
    if sorted(a) != sorted(b):
        raise ValueError(f"folds differ: {sorted(a)} and {sorted(b)}")
    for fold in a:
        if not a[fold].same_episodes(b[fold]):
            raise ValueError(f"fold {fold}: the configurations were scored on different episodes or seeds")
    rng = np.random.default_rng(seed)
    delta = float(np.mean([a[f].mious()[0].mean() - b[f].mious()[0].mean() for f in a]))
    draws = []
    for start in range(0, replicates, chunk):  # memory O(chunk x E)
        n = min(chunk, replicates - start)
        total = np.zeros(n)
        for fold in sorted(a):
            weights = resample_weights(a[fold].test_seeds, n, rng)
            picks = rng.integers(0, a[fold].inter.shape[0], (n, a[fold].inter.shape[0]))
            diff = a[fold].mious(weights).mean(2) - b[fold].mious(weights).mean(2)  # (n, S)
            total += np.take_along_axis(diff, picks, 1).mean(1)
        draws.append(total / len(a))
    draws = np.concatenate(draws)
    tail = min(np.sum(draws <= 0), np.sum(draws >= 0))
    p = min(1.0, 2 * (tail + 1) / (replicates + 1))
    low, high = np.percentile(draws, [2.5, 97.5])
    return Difference(delta, float(low), float(high), float(p), replicates)
