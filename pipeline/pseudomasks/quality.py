"""How good the pseudo-masks are: their mIoU (the LFSS paper's Table 3), precision and recall against
the ground truth; and the same of the ground truth eroded or dilated (the mask-quality study's
oracle masks, :mod:`pipeline.pseudomasks.oracle`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.core.metrics import FewShotMeter, binary_target
from pipeline.pseudomasks.oracle import truth_mask
from pipeline.pseudomasks.store import ARRAYS, PseudoMaskStore


def evaluate(
    store: PseudoMaskStore, manifest: str, episodes: pd.DataFrame, label_path: Callable[[str], str],
    num_classes: int, batch: int = 64,
) -> dict[str, FewShotMeter]:
    """Meters of the four mask kinds against the ground truth, at each label's own size (the
    masks read ``batch`` episodes at a time)."""
    meters = {name: FewShotMeter(num_classes, per_episode=True) for name in ARRAYS}
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


#: a mask that covers less of its target than this has missed it (``{kind}_missed``)
MISSED = 0.1


def figures(meters: dict[str, FewShotMeter]) -> dict[str, float]:
    """``{kind}_miou``, ``{kind}_precision`` and ``{kind}_recall`` (%) of each meter (pixels summed
    over episodes, as mIoU sums them) and, for a meter with per-episode counts, ``{kind}_missed``:
    the % of masks that cover less than :data:`MISSED` of their target (what pixel sums hide)."""
    out = {}
    for kind, meter in meters.items():
        precision, recall = meter.precision_recall()
        out |= {f"{kind}_miou": round(meter.miou(), 2), f"{kind}_precision": round(precision, 2),
                f"{kind}_recall": round(recall, 2)}
        if meter.rows is not None:
            counts = meter.episode_counts()
            truth = counts["union"] - counts["pred"] + counts["inter"]
            hit = counts["inter"][truth > 0] / truth[truth > 0]
            out[f"{kind}_missed"] = round(float(100 * (hit < MISSED).mean()), 2) if len(hit) else 0.0
    return out


def evaluate_truth(episodes: pd.DataFrame, label_path: Callable[[str], str], num_classes: int,
                   morph: int) -> dict[str, FewShotMeter]:
    """Meters (``support``, ``query``) of the ground truth morphed by ``morph`` pixels against itself."""
    meters = {role: FewShotMeter(num_classes, per_episode=True) for role in ("support", "query")}
    for row in episodes.itertuples():
        c = torch.tensor([int(row.class_id)])
        for role, images in (("support", row.supports), ("query", [row.query])):
            for image in images:
                label = np.array(Image.open(label_path(image)))
                truth = binary_target(torch.from_numpy(label)[None], c)
                pred = torch.from_numpy(truth_mask(label, int(row.class_id), morph))[None]
                meters[role].update(pred, truth, c)
    return meters
