"""``data/priors_preview.png``: query, VTP, refined VTP and VVP of a few test episodes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.priors.store import PriorStore  # noqa: E402


def pick_examples(manifests: dict[str, pd.DataFrame], per_manifest: int = 2) -> list[tuple[str, pd.Series]]:
    """The first episodes of each fold's first 1-shot test manifest (else of any manifest)."""
    chosen = sorted(m for m in manifests if m.startswith("test/") and "shot1_" in m)
    chosen = [m for i, m in enumerate(chosen) if i == 0 or m.split("/")[1] != chosen[i - 1].split("/")[1]]
    chosen = chosen or sorted(manifests)[:1]
    return [(m, row) for m in chosen for _, row in manifests[m].head(per_manifest).iterrows()]


def _upsampled(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(values.astype(np.float32), mode="F").resize(size[::-1], Image.BILINEAR)
    return np.asarray(image)


def render(priors: PriorStore, examples: list[tuple[str, pd.Series]], index: pd.DataFrame, out: Path) -> None:
    """One row per episode: support with its mask, query with its ground truth, VTP, PIR, VVP."""
    names = priors.attrs["class_names"]
    titles = ["support + mask", "query + ground truth", "VTP", "refined VTP (PIR)", "VVP (mean of blocks)"]
    fig, axes = plt.subplots(len(examples), 5, figsize=(11, 2.3 * len(examples)), squeeze=False)
    for r, (manifest, episode) in enumerate(examples):
        c = int(episode["class_id"])
        support, query = episode["supports"][0], episode["query"]
        images = {i: np.asarray(Image.open(index.at[i, "image_path"]).convert("RGB"))
                  for i in (support, query)}
        masks = {i: np.asarray(Image.open(index.at[i, "mask_path"])) == c for i in (support, query)}
        size = images[query].shape[:2]
        maps = [priors.vtp(query, c), priors.vtp(query, c, refined=True),
                priors.vvp(query, [support], masks[support][None])[0].mean(0)]
        axes[r, 0].imshow(images[support])
        axes[r, 0].imshow(np.ma.masked_where(~masks[support], masks[support]), cmap="autumn", alpha=0.5)
        axes[r, 1].imshow(images[query])
        axes[r, 1].contour(masks[query], levels=[0.5], colors="lime", linewidths=1.2)
        for k, values in enumerate(maps, start=2):
            axes[r, k].imshow(images[query])
            axes[r, k].imshow(_upsampled(values, size), cmap="jet", alpha=0.55, vmin=0, vmax=1)
            axes[r, k].contour(masks[query], levels=[0.5], colors="white", linewidths=0.8)
        axes[r, 0].set_ylabel(f"{manifest.split('/')[1]}: {names[c - 1]}", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=80)
    plt.close(fig)
