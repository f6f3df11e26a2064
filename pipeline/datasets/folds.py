"""Fold conventions (PASCAL-5i, COCO-20i) and the (image, class) pairs of each fold.

* contiguous: fold i tests classes ``i*C/F + 1 .. (i+1)*C/F`` (PASCAL-5i: 5i+1..5i+5);
* interleaved: fold i tests ``{F*k + i + 1}`` (COCO-20i: 4k+i+1), the COCO default.

A class is present in an image only with at least ``min_pixels`` pixels. Pairs have a role:

* ``train``: training-split images, base classes. Images with any novel-class pixel are
  dropped (``novel_in_train: drop``, PFENet/BAM) or kept (``mask``, HSNet: their novel pixels
  are background for a base-class target);
* ``val``: val-split images, base classes (held-out validation during training);
* ``test``: val-split images, novel classes (the few-shot test list).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.datasets.spec import Convention

REFERENCE_MIN_PIXELS = 2048  # 2 * 32 * 32, PFENet
REFERENCE_IMAGE_AREA = 500 * 375  # a typical VOC image, where 2048 px was defined

PAIR_COLUMNS = ["fold", "role", "image_id", "class_id", "pixels"]


def fold_classes(num_classes: int, num_folds: int, convention: Convention) -> list[list[int]]:
    """Novel class ids of each fold."""
    if num_classes % num_folds:
        raise PipelineError(
            f"split.num_folds = {num_folds}: {num_classes} classes do not divide into "
            f"{num_folds} equal folds"
        )
    per_fold = num_classes // num_folds
    if convention == "contiguous":
        return [list(range(i * per_fold + 1, (i + 1) * per_fold + 1)) for i in range(num_folds)]
    return [list(range(i + 1, num_classes + 1, num_folds)) for i in range(num_folds)]


def custom_fold_classes(folds: list[list[str]], class_names: list[str], dataset: str) -> list[list[int]]:
    """Novel class ids of folds given by class names; unknown or repeated names fail."""
    ids = {name: k + 1 for k, name in enumerate(class_names)}
    seen: set[str] = set()
    result = []
    for fold in folds:
        for name in fold:
            if name not in ids:
                raise PipelineError(
                    f"split.custom_folds: unknown class name {name!r} for dataset {dataset!r} "
                    f"(known: {', '.join(class_names)})"
                )
            if name in seen:
                raise PipelineError(f"split.custom_folds: class {name!r} is in more than one fold")
            seen.add(name)
        result.append(sorted(ids[name] for name in fold))
    return result


def resolve_min_pixels(value: int | Literal["auto"], relative: bool, image_area: float) -> int:
    """``auto``: 2048 px, or with ``relative`` (a dataset's ``relative_min_pixels``: the synthetic
    benchmark) the same fraction of ``image_area`` as 2048 px is of a 500x375 VOC image."""
    if value != "auto":
        return int(value)
    if not relative:
        return REFERENCE_MIN_PIXELS
    return max(1, round(REFERENCE_MIN_PIXELS * image_area / REFERENCE_IMAGE_AREA))


def fold_pairs(
    index: pd.DataFrame, fold: int, novel: list[int], num_classes: int, min_pixels: int,
    novel_in_train: Literal["drop", "mask"],
) -> pd.DataFrame:
    """The (image, class) pairs of one fold, with columns :data:`PAIR_COLUMNS`.

    Order is deterministic: index order (the dataset's list order), then class id.
    """
    long = index[["image_id", "split", "class_ids", "class_pixels"]].explode(
        ["class_ids", "class_pixels"], ignore_index=False
    ).dropna(subset=["class_ids"])
    long = long.rename(columns={"class_ids": "class_id", "class_pixels": "pixels"})
    long["class_id"] = long["class_id"].astype(np.int16)
    long["pixels"] = long["pixels"].astype(np.int32)
    long["order"] = long.index
    is_novel = long["class_id"].isin(novel)

    tainted = set(long.loc[is_novel & (long["split"] == "train"), "order"])  # images with novel pixels
    if novel_in_train == "mask":
        tainted = set()
    present = long["pixels"] >= min_pixels
    train = long[(long["split"] == "train") & ~is_novel & present & ~long["order"].isin(tainted)]
    roles = [
        train.assign(role="train"),
        long[(long["split"] == "val") & ~is_novel & present].assign(role="val"),
        long[(long["split"] == "val") & is_novel & present].assign(role="test"),
    ]
    pairs = pd.concat(roles)
    pairs["role"] = pd.Categorical(pairs["role"], ["train", "val", "test"])
    pairs = pairs.sort_values(["role", "order", "class_id"], kind="stable")
    pairs["role"] = pairs["role"].astype(str)
    pairs["fold"] = np.int8(fold)
    return pairs[PAIR_COLUMNS].reset_index(drop=True)
