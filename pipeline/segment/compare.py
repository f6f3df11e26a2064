"""The predictions ``evaluate@k`` makes for chosen episodes of a test manifest, through its own
code (stored features, priors and pseudo-masks; :func:`~pipeline.fewshot.evaluate.evaluate_table`),
so that the segmenter's masks can be checked against them (tests, ``benchmarks/segment.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core.metrics import FewShotMeter
from pipeline.core.params import ModelParams
from pipeline.datasets.episodes import read_manifests
from pipeline.fewshot.checkpoint import load_model
from pipeline.fewshot.data import EpisodeTable, open_fold_inputs
from pipeline.fewshot.evaluate import Scoring, evaluate_table, query_labels
from pipeline.segment.run import RunDir

TENSORS = ("query", "supports", "classes", "query_mask", "support_mask", "query_vtp", "support_vtp")


@dataclass
class Reference:
    """evaluate's view of E chosen episodes.

    Attributes:
        episodes: the manifest's rows (query, supports, class_id).
        probabilities: per episode ``(H, W)`` float32 at the query label's own size.
        labels: per episode the query's ``(H, W)`` label map.
        meter: evaluate's meter over these episodes.
    """

    episodes: pd.DataFrame
    probabilities: list[np.ndarray]
    labels: list[np.ndarray]
    meter: FewShotMeter


def subset(table: EpisodeTable, rows: Sequence[int]) -> EpisodeTable:
    """Episodes ``rows`` of ``table`` (a table of stored pseudo-masks)."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    return replace(table, **{name: getattr(table, name)[index] for name in TENSORS
                             if getattr(table, name) is not None})


def evaluate_episodes(run: RunDir, fold: int, manifest: str, rows: Sequence[int], *,
                      supervision: str | None = None, model: Path | None = None,
                      batch_size: int = 64) -> Reference:
    """What evaluate@``fold`` predicts for episodes ``rows`` of ``manifest`` (``supervision``:
    the checkpoint's, or ``mask`` for ground-truth support masks)."""
    params = run.params()
    net, saved = load_model(model or run.model_path(fold), torch.device("cpu"))
    cfg = ModelParams(**saved["model"])
    if supervision is not None:
        cfg = cfg.model_copy(update={"supervision": supervision})
    data = run.root / "data"
    manifests = read_manifests(data / "episodes")
    inputs = open_fold_inputs(run.index(), manifests, [manifest], data / "features.zarr",
                              data / "priors.zarr", data / "pseudo_masks.zarr",
                              cache_bytes=params.orchestration.cache_bytes)
    table = subset(inputs.episodes(manifest, manifests[manifest], cfg), rows)
    captured: list[torch.Tensor] = []
    meter = evaluate_table(net, table, inputs.bank, len(run.class_names()), circle_inference=saved["circle"],
                           batch_size=batch_size, on_batch=lambda _, probs: captured.append(probs))
    probs = torch.cat(captured)
    labels = query_labels(table, inputs.bank, torch.arange(len(table)))
    maps = [Scoring().at_label(probs[j: j + 1], lab.shape)[0].clamp(0, 1).numpy()
            for j, lab in enumerate(labels)]
    return Reference(manifests[manifest].iloc[list(rows)].reset_index(drop=True), maps, labels, meter)
