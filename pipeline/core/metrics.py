"""Few-shot segmentation metrics (docs/design.md#conventions).

* **mIoU**: for each class, sum foreground intersections and unions over *all* episodes of
  that class, divide, then average over the classes — not the mean of per-episode IoUs.
* **FB-IoU**: foreground and background IoU, each summed over all episodes regardless of
  class, then averaged.

Pixels labelled 255 count in neither intersection nor union. Values are percentages.

A class of the fold with no episode, or with an empty union (``absent``, the ``evaluate.absent_class``
param): ``zero`` counts its IoU as 0 and the mean divides by every class asked for, as the reference
code does (HSNet: ``inter / max(union, 1)``; PFENet / PI-CLIP: ``inter / (union + 1e-10)``); ``skip``
leaves it out of the mean (``nanmean``).

A meter can also keep every episode's counts (``per_episode=True``, :meth:`FewShotMeter.episode_counts`):
what resampling needs (a paired bootstrap over episodes, :mod:`pipeline.report.stats`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import pandas as pd
import torch

IGNORE = 255
Absent = Literal["zero", "skip"]  # a class without episodes (or union): IoU 0, or left out of the mean


def binary_target(label: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """FSS target from label maps: 1 on the episode's class, 255 on ignore, 0 elsewhere.

    Args:
        label: ``(B, H, W)`` integer label maps; class_ids: ``(B,)``.

    Returns:
        ``(B, H, W)`` uint8.
    """
    label = torch.as_tensor(label)
    target = (label == torch.as_tensor(class_ids).view(-1, 1, 1)).to(torch.uint8)
    target[label == IGNORE] = IGNORE
    return target


class FewShotMeter:
    """Accumulates intersection and union per class and for foreground/background.

    Meters are additive: ``a + b`` is the meter of both episode sets, so evaluation can be
    split across workers and merged. ``per_episode``: also keep each episode's counts, in order.
    """

    COUNTS = ("class_id", "inter", "union", "pred", "bg_inter", "bg_union")

    def __init__(self, num_classes: int, per_episode: bool = False) -> None:
        self.num_classes = num_classes
        self.inter = torch.zeros(num_classes + 1, dtype=torch.float64)  # foreground, by class id
        self.union = torch.zeros(num_classes + 1, dtype=torch.float64)
        self.pred = torch.zeros(num_classes + 1, dtype=torch.float64)  # predicted foreground area
        self.rows: list[torch.Tensor] | None = [] if per_episode else None  # (B, 6) int64 chunks
        self.episodes = torch.zeros(num_classes + 1, dtype=torch.int64)
        self.fb_inter = torch.zeros(2, dtype=torch.float64)  # [background, foreground]
        self.fb_union = torch.zeros(2, dtype=torch.float64)

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_ids: torch.Tensor) -> None:
        """Add a batch of episodes.

        Args:
            pred: ``(B, H, W)`` foreground prediction (bool or 0/1).
            target: ``(B, H, W)`` uint8, 0 background, 1 foreground, 255 ignore.
            class_ids: ``(B,)`` the class of each episode.
        """
        pred, target = torch.as_tensor(pred).bool(), torch.as_tensor(target)
        class_ids = torch.as_tensor(class_ids, dtype=torch.int64).cpu()
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        valid = target != IGNORE
        fg_true = (target == 1) & valid
        fg_pred = pred & valid
        bg_true, bg_pred = valid & ~fg_true, valid & ~fg_pred
        dims = tuple(range(1, pred.dim()))
        fg_i = (fg_pred & fg_true).sum(dims).double().cpu()
        fg_u = (fg_pred | fg_true).sum(dims).double().cpu()
        bg_i = (bg_pred & bg_true).sum(dims).double().cpu()
        bg_u = (bg_pred | bg_true).sum(dims).double().cpu()
        self.inter.index_add_(0, class_ids, fg_i)
        self.union.index_add_(0, class_ids, fg_u)
        self.pred.index_add_(0, class_ids, fg_pred.sum(dims).double().cpu())
        if self.rows is not None:
            self.rows.append(torch.stack([class_ids.double(), fg_i, fg_u, fg_pred.sum(dims).double().cpu(),
                                          bg_i, bg_u], 1).long())
        self.episodes.index_add_(0, class_ids, torch.ones_like(class_ids))
        self.fb_inter += torch.stack([bg_i.sum(), fg_i.sum()])
        self.fb_union += torch.stack([bg_u.sum(), fg_u.sum()])

    def __add__(self, other: FewShotMeter) -> FewShotMeter:
        if other.num_classes != self.num_classes:
            raise ValueError("meters over different class counts cannot be merged")
        total = FewShotMeter(self.num_classes)
        for name in ("inter", "union", "pred", "episodes", "fb_inter", "fb_union"):
            setattr(total, name, getattr(self, name) + getattr(other, name))
        if self.rows is not None and other.rows is not None:
            total.rows = self.rows + other.rows
        return total

    def episode_counts(self) -> pd.DataFrame:
        """One row per episode, in update order: ``class_id`` and the pixel counts ``inter``,
        ``union``, ``pred`` (foreground) and ``bg_inter``, ``bg_union`` (needs ``per_episode``)."""
        if self.rows is None:
            raise ValueError("the meter was made without per_episode=True")
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, len(self.COUNTS), dtype=torch.int64)
        return pd.DataFrame(rows.numpy(), columns=list(self.COUNTS))

    def precision_recall(self, classes: Iterable[int] | None = None) -> tuple[float, float]:
        """Foreground precision and recall (%), each the mean over ``classes`` (default: every class
        with an episode) of the class's pixels summed over its episodes (as mIoU sums them)."""
        seen = torch.nonzero(self.episodes).flatten().tolist() if classes is None else list(classes)
        truth = self.union - self.pred + self.inter
        nan = float("nan")
        precision = [float(100 * self.inter[c] / self.pred[c]) if self.pred[c] > 0 else nan for c in seen]
        recall = [float(100 * self.inter[c] / truth[c]) if truth[c] > 0 else nan for c in seen]
        return float(np.nanmean(precision)), float(np.nanmean(recall))

    def class_iou(self, classes: Iterable[int] | None = None, absent: Absent = "skip") -> dict[int, float]:
        """IoU (%) of each class that has at least one episode (or of ``classes``); a class with an
        empty union (no episode) is nan (``absent="skip"``) or 0 (``"zero"``)."""
        seen = torch.nonzero(self.episodes).flatten().tolist() if classes is None else classes
        empty = 0.0 if absent == "zero" else float("nan")
        return {int(c): float(100 * self.inter[c] / self.union[c]) if self.union[c] > 0
                else empty for c in seen}

    def miou(self, classes: Iterable[int] | None = None, absent: Absent = "skip") -> float:
        """Mean class IoU (%) over ``classes`` (default: every class with an episode); ``absent``: a
        class without episodes counts 0 and the mean divides by ``len(classes)`` (``"zero"``, the
        reference code's), or is left out (``"skip"``)."""
        values = list(self.class_iou(classes, absent).values())
        return float(np.nanmean(values)) if values else float("nan")

    def fbiou(self) -> float:
        """Mean of background and foreground IoU (%) over all episodes."""
        return float(100 * (self.fb_inter / self.fb_union.clamp(min=1)).mean())
