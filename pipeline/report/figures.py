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


def mask_quality_figure(results: dict, shot: int = 1) -> bytes:
    """The model's mIoU against the quality of the query masks it was given (the mask-quality study):
    left against their recall, right against their precision; eroded ground truth keeps precision,
    dilated keeps recall, the pseudo-masks are marked by name. Error bars: std over training seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, key in zip(axes, ("recall", "precision"), strict=True):
        for row in results["rows"]:
            quality, figures = row.get("mask_quality", {}), row["shots"].get(str(shot))
            if f"query_{key}" not in quality or not figures:
                continue
            x, y = quality[f"query_{key}"], figures["mean"]
            name = row["name"]
            colour = ORANGE if "eroded" in name else BLUE if "dilated" in name else GREEN
            ax.errorbar(x, y, yerr=figures.get("train_std") or 0, fmt="o", color=colour, capsize=3)
            morph = row["model"].get("truth_morph", 0)
            label = f"{morph:+d} px" if morph else name.split(",")[0].replace(" pseudo-masks", "")
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(f"query mask {key} (%)")
        ax.set_xlim(0, 105)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"model {shot}-shot mIoU (%)")
    kinds = ((ORANGE, "ground truth eroded"), (BLUE, "ground truth dilated"), (GREEN, "pseudo-masks, truth"))
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=t) for c, t in kinds]
    axes[1].legend(handles=handles, frameon=False, fontsize=8, loc="center")
    fig.suptitle("How good must the masks be? Model mIoU against the query masks' recall and precision",
                 fontsize=10)
    return png(fig)
