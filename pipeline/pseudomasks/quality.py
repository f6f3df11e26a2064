"""How good the pseudo-masks are: their mIoU against the ground truth (the LFSS paper's Table 3)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.fewshot.metrics import FewShotMeter, binary_target
from pipeline.pseudomasks.store import ARRAYS, PseudoMaskStore


def evaluate(
    store: PseudoMaskStore, manifest: str, episodes: pd.DataFrame, label_path: Callable[[str], str],
    num_classes: int, batch: int = 64,
) -> dict[str, FewShotMeter]:
    """Meters of the four mask kinds against the ground truth, at each label's own size (the
    masks read ``batch`` episodes at a time)."""
    meters = {name: FewShotMeter(num_classes) for name in ARRAYS}
    for start in range(0, len(episodes), batch):
        part = episodes.iloc[start: start + batch]
        rows = part["episode"].astype(int).tolist()
        arrays = {name: store.masks(manifest, *name.split("_"), rows) for name in ARRAYS}
        _update(meters, arrays, part, label_path)
    return meters


def _update(meters: dict[str, FewShotMeter], arrays: dict[str, np.ndarray], episodes: pd.DataFrame,
            label_path: Callable[[str], str]) -> None:
    for e, row in enumerate(episodes.itertuples()):
        c = torch.tensor([int(row.class_id)])
        for role, images in (("support", row.supports), ("query", [row.query])):
            for k, image in enumerate(images):
                truth = binary_target(torch.from_numpy(np.array(Image.open(label_path(image))))[None], c)
                for kind in ("initial", "refined"):
                    masks = arrays[f"{role}_{kind}"][e]
                    mask = masks[k] if role == "support" else masks
                    pred = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=truth.shape[-2:],
                                         mode="nearest")[0].to(torch.uint8)
                    meters[f"{role}_{kind}"].update(pred, truth, c)
