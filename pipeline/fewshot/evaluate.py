"""Scoring few-shot predictions under the papers' evaluation protocols (docs/design.md#conventions).

:func:`evaluate_table` scores the model on one manifest; :func:`prior_meter` scores the
priors alone (the query's VTP thresholded, no decoder), so every run shows what training adds;
:func:`sample_predictions` keeps a few episodes for the report's qualitative figure.

Where prediction meets label (``evaluate.resize``, :class:`Scoring`): ``original`` — the
prediction upsampled to each label's own size; ``hsnet`` — label (nearest) and prediction at
``S × S``, the backbone's input side (HSNet: 400); ``pfenet`` — the input letterboxed (aspect
kept, longer side ``S``, padded), the prediction upsampled to the label's longer side and scored
against the label padded with ignore (PFENet, PI-CLIP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from pipeline.core.metrics import IGNORE, FewShotMeter, binary_target
from pipeline.core.params import ModelParams
from pipeline.fewshot.augment import letterbox_views, warp
from pipeline.fewshot.data import EpisodeTable, ImageBank, prefetched, upsample
from pipeline.fewshot.online import ImageSource, letterboxed_batch, with_features
from pipeline.model.lfss import Episodes, predict
from pipeline.pseudomasks.oracle import truth_mask
from pipeline.pseudomasks.store import PseudoMaskStore


def batches(n: int, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))


def query_labels(table: EpisodeTable, bank: ImageBank, index: torch.Tensor) -> list[np.ndarray]:
    """The label maps of the queries of episodes ``index`` (each at its own size)."""
    return [bank.labels[r] for r in table.query[index].tolist()]


Resize = Literal["original", "hsnet", "pfenet"]
DESCRIPTIONS = {
    "original": "the prediction upsampled to each label's own size",
    "hsnet": "label and prediction at {side}x{side} (HSNet)",
    "pfenet": "input letterboxed to {side} px, the prediction scored on the label padded to its longer "
              "side (PFENet, PI-CLIP)",
}


@dataclass(frozen=True)
class Scoring:
    """How predictions meet labels (``evaluate.resize``); ``side``: the backbone's input side S;
    ``pfenet`` also needs the images (``source``) and the ``backbone`` that letterboxed input takes."""

    resize: Resize = "original"
    side: int = 0
    source: ImageSource | None = None
    backbone: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.resize != "original" and self.side <= 0:
            raise ValueError(f"resize {self.resize!r} needs the input side")
        if self.resize == "pfenet" and (self.source is None or self.backbone is None):
            raise ValueError("resize 'pfenet' needs the images and the backbone")

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.resize].format(side=self.side)

    def label(self, label: np.ndarray) -> np.ndarray:
        """The label as predictions are scored against it."""
        if self.resize == "hsnet" and label.shape != (self.side, self.side):
            return np.asarray(Image.fromarray(label).resize((self.side, self.side), Image.NEAREST))
        if self.resize == "pfenet":
            longer = max(label.shape)
            padded = np.full((longer, longer), IGNORE, np.uint8)
            padded[: label.shape[0], : label.shape[1]] = label
            return padded
        return label

    def at_label(self, probs: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """``(B, h, w)`` maps -> ``(B, H, W)`` over a label of ``shape`` (its own size, uncropped)."""
        if self.resize != "pfenet":
            return upsample(probs.float(), shape)
        longer = max(shape)
        return upsample(probs.float(), (longer, longer))[:, : shape[0], : shape[1]]

    def batches(self, table: EpisodeTable, bank: ImageBank, index: torch.Tensor) -> list[Episodes]:
        """Every shot's Episodes ``index``: stored features, or letterboxed images under ``pfenet``."""
        if self.resize == "pfenet":
            return letterboxed_batch(table, bank, index, self.source)
        return [table.batch(bank, index, shot) for shot in range(table.shots)]


def score(
    meter: FewShotMeter,
    probs: torch.Tensor,
    labels: Sequence[np.ndarray],
    classes: torch.Tensor,
    threshold: float = 0.5,
    scoring: Scoring = Scoring(),
) -> None:
    """Add ``(B, h, w)`` foreground probabilities of B episodes of ``classes``: each upsampled
    (bilinear) to its query label's size as ``scoring`` has it, thresholded, compared with it."""
    labels = [scoring.label(lab) for lab in labels]
    if len({lab.shape for lab in labels}) == 1:  # one size: one batched update
        target = binary_target(torch.from_numpy(np.stack(labels)), classes)
        meter.update(upsample(probs.float(), target.shape[-2:]) >= threshold, target, classes)
        return
    for j, lab in enumerate(labels):
        target = binary_target(torch.from_numpy(lab)[None], classes[j : j + 1])
        meter.update(upsample(probs[j : j + 1].float(), lab.shape) >= threshold, target, classes[j : j + 1])


def evaluate_table(
    model: nn.Module,
    table: EpisodeTable,
    bank: ImageBank,
    num_classes: int,
    *,
    circle_inference: bool,
    batch_size: int,
    device: str | torch.device = "cpu",
    autocast: Callable[[], object] | None = None,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    loader_workers: int = 0,
    scoring: Scoring = Scoring(),
    per_episode: bool = False,
) -> FewShotMeter:
    """The meter of the model's K-shot predictions on every episode of ``table``, scored as
    ``scoring`` says (for ``pfenet`` the backbone runs here, on letterboxed images); ``per_episode``:
    it also keeps each episode's counts, in the table's order.

    ``on_batch(index, probs)`` sees each batch's ``(B, h, w)`` probabilities (e.g. to keep samples);
    ``loader_workers`` processes read batches ahead (:func:`~pipeline.fewshot.data.prefetched`).
    """
    meter = FewShotMeter(num_classes, per_episode)
    was_training = model.training
    model.eval()
    parts = list(batches(len(table), batch_size))

    def make(i: int) -> tuple[list[Episodes], list[np.ndarray]]:
        shots = scoring.batches(table, bank, parts[i])
        return shots, query_labels(table, bank, parts[i])

    if scoring.backbone is not None:
        scoring.backbone.to(device)
    for index, (shots, labels) in zip(parts, prefetched(make, len(parts), loader_workers), strict=True):
        shots = [x.to(device) for x in shots]
        if scoring.resize == "pfenet":
            shots = with_features(shots, scoring.backbone)
        with autocast() if autocast else contextlib.nullcontext():
            probs = predict(model, shots, circle_inference=circle_inference).float().cpu()
        score(meter, probs, labels, table.classes[index], scoring=scoring)
        if on_batch:
            on_batch(index, probs)
    model.train(was_training)
    return meter


def prior_meters(
    table: EpisodeTable, bank: ImageBank, num_classes: int, thresholds: Sequence[float],
    scoring: Scoring = Scoring(),
) -> list[FewShotMeter]:
    """The meters of thresholding the query's VTP (as the model receives it: letterboxed under
    ``pfenet``) at each threshold (every label read once)."""
    meters = [FewShotMeter(num_classes) for _ in thresholds]
    for index in batches(len(table), 256):
        labels, vtp = query_labels(table, bank, index), table.query_vtp[index].float()
        if scoring.resize == "pfenet":
            views = letterbox_views([lab.shape for lab in labels])
            vtp = warp(vtp[:, None], views, tuple(vtp.shape[-2:]))[:, 0]
        for meter, threshold in zip(meters, thresholds, strict=True):
            score(meter, vtp, labels, table.classes[index], threshold, scoring)
    return meters


def prior_meter(
    table: EpisodeTable, bank: ImageBank, num_classes: int, threshold: float, scoring: Scoring = Scoring()
) -> FewShotMeter:
    """The meter of thresholding the query's VTP at ``threshold``."""
    return prior_meters(table, bank, num_classes, [threshold], scoring)[0]


def best_prior_threshold(
    table: EpisodeTable,
    bank: ImageBank,
    num_classes: int,
    candidates: tuple[float, ...] = tuple(np.round(np.arange(0.1, 0.95, 0.1), 2)),
) -> tuple[float, float]:
    """``(threshold, mIoU)`` of the best VTP threshold on ``table`` (the fold's base-class
    validation episodes: never the test classes)."""
    meters = prior_meters(table, bank, num_classes, candidates)
    scored = [(meter.miou(), t) for meter, t in zip(meters, candidates, strict=True)]
    miou, threshold = max(scored)
    return float(threshold), miou


def sample_predictions(
    name: str,
    table: EpisodeTable,
    bank: ImageBank,
    pseudo: PseudoMaskStore,
    cfg: ModelParams,
    index: torch.Tensor,
    probs: torch.Tensor,
    manifest: pd.DataFrame,
    scoring: Scoring = Scoring(),
) -> dict[str, np.ndarray]:
    """What the report's qualitative figure shows of episodes ``index`` (given their ``(B, h, w)``
    probabilities): ids and class (``query``, ``support``, ``class_id``), and per sample ``j`` the
    first support's mask the model was given (``support_mask_{j}``: the pseudo-mask, or the label
    at its own size) and the prediction (``prediction_{j}``: probability x 255 at the query label's
    size). Images differ in size, so each sample's maps have keys of their own."""
    rows = manifest.iloc[index.numpy()]
    out = {
        "query": rows["query"].to_numpy(str),
        "support": np.array([s[0] for s in rows["supports"]], str),
        "class_id": rows["class_id"].to_numpy(np.int16),
    }
    given = cfg.supervision == "text" and cfg.pseudo_masks != "truth"
    if given:
        pseudo_masks = pseudo.masks(name, "support", cfg.pseudo_masks, index.numpy())[:, 0]
    for j, episode in enumerate(index.tolist()):
        if given:
            out[f"support_mask_{j}"] = pseudo_masks[j]
        else:
            label = bank.labels[int(table.supports[episode, 0])]
            morph = cfg.truth_morph if cfg.supervision == "text" else 0
            out[f"support_mask_{j}"] = truth_mask(label, int(table.classes[episode]), morph)
        size = bank.labels[int(table.query[episode])].shape
        prob = scoring.at_label(probs[j : j + 1], size).clamp(0, 1)[0]
        out[f"prediction_{j}"] = (prob * 255).round().to(torch.uint8).numpy()
    return out
