"""Report figures as PNG bytes: per-class IoU bars, training curves, qualitative grids."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

GREEN, BLUE, ORANGE = (0.1, 0.8, 0.2), (0.1, 0.4, 1.0), (1.0, 0.55, 0.0)


def png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def class_iou_figure(folds: dict[int, dict]) -> bytes:
    """Grouped bars: each fold's novel classes, one bar per shot."""
    shots = sorted({int(k[4:]) for m in folds.values() for k in m if k.startswith("shot")})
    labels, values, boundaries = [], {s: [] for s in shots}, []
    for k in sorted(folds):
        names = list(folds[k][f"shot{shots[0]}"]["class_iou"])
        labels += names
        for s in shots:
            values[s] += [folds[k][f"shot{s}"]["class_iou"].get(n, np.nan) for n in names]
        boundaries.append(len(labels))
    x = np.arange(len(labels))
    width = 0.8 / len(shots)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(labels)), 3.4))
    for i, s in enumerate(shots):
        ax.bar(x + (i - (len(shots) - 1) / 2) * width, values[s], width, label=f"{s}-shot")
    for k, (start, stop) in zip(
        sorted(folds), zip([0, *boundaries[:-1]], boundaries, strict=True), strict=True
    ):
        ax.text((start + stop - 1) / 2, 97, f"fold {k}", ha="center", va="top", fontsize=9, color="0.3")
        if stop < len(labels):
            ax.axvline(stop - 0.5, color="0.6", lw=0.8, ls="--")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_title("Per-class IoU of the novel classes")
    ax.legend(frameon=False, ncols=len(shots), loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return png(fig)


def curves_figure(curves: dict[int, pd.DataFrame]) -> bytes:
    """Training loss and validation mIoU per epoch, one line per fold."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for k in sorted(curves):
        left.plot(curves[k]["epoch"], curves[k]["loss"], marker="o", label=f"fold {k}")
        right.plot(curves[k]["epoch"], curves[k]["val_miou"], marker="o", label=f"fold {k}")
    left.set(xlabel="epoch", ylabel="training loss (BCE)", title="Training loss")
    right.set(xlabel="epoch", ylabel="mIoU (%)", title="Validation mIoU (base classes)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    right.legend(frameon=False)
    return png(fig)


@dataclass
class Sample:
    """One test episode to show: images (H, W, 3) uint8, masks (H, W) bool."""

    title: str
    support: np.ndarray
    support_mask: np.ndarray
    query: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray


def resized(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``mask`` resized (nearest) to ``shape[:2]``."""
    if mask.shape == shape[:2]:
        return mask
    rows = np.arange(shape[0]) * mask.shape[0] // shape[0]
    cols = np.arange(shape[1]) * mask.shape[1] // shape[1]
    return mask[rows][:, cols]


def show(ax: plt.Axes, image: np.ndarray, mask: np.ndarray, colour: tuple[float, float, float]) -> None:
    """``image`` with ``mask`` tinted by ``colour`` and outlined."""
    mask = resized(mask, image.shape)
    tinted = image.astype(np.float32) / 255
    tinted[mask] = 0.55 * tinted[mask] + 0.45 * np.array(colour)
    ax.imshow(tinted)
    if mask.any():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2)
    ax.set_xticks([])
    ax.set_yticks([])


def qualitative_figure(samples: Sequence[Sample], per_row: int = 2) -> bytes:
    """Episodes ``per_row`` to a row, each as three panels: the support with its pseudo-mask,
    the query with its ground truth, the prediction."""
    titles = ("support + pseudo-mask", "query + ground truth", "prediction")
    rows = (len(samples) + per_row - 1) // per_row
    fig, axes = plt.subplots(rows, 3 * per_row, figsize=(1.9 * 3 * per_row, 2.05 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, s in enumerate(samples):
        r, c = divmod(i, per_row)
        panels = (
            (s.support, s.support_mask, GREEN),
            (s.query, s.truth, BLUE),
            (s.query, s.prediction, ORANGE),
        )
        for j, (image, mask, colour) in enumerate(panels):
            ax = axes[r, 3 * c + j]
            ax.axis("on")
            show(ax, image, mask, colour)
            if r == 0:
                ax.set_title(titles[j], fontsize=8)
        axes[r, 3 * c].set_ylabel(s.title, fontsize=8)
    fig.tight_layout(w_pad=0.3, h_pad=0.6)
    return png(fig)
