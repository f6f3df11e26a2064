"""``data/models/fold{k}/model.pt``: a trained fold's weights with what is needed to rebuild it.

Holds the best validation epoch's ``state_dict``, the model params it was built with, the backbone's
feature channels, whether it was trained (and so predicts) with circle inference, the fold, and
the training history.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import PipelineError
from pipeline.core.params import ModelParams
from pipeline.fewshot.train import State
from pipeline.model.lfss import LFSS

MODEL_FILE = "model.pt"


def save_model(
    path: Path, state: State, model: ModelParams, feat_channels: int, circle: bool, fold: int
) -> dict[str, Any]:
    """Write the best epoch of ``state``; returns the saved record (without the weights)."""
    best = max(state.history, key=lambda r: r["val_miou"])
    saved = {
        "state_dict": state.best_state,
        "model": model.model_dump(),
        "feat_channels": feat_channels,
        "circle": circle,
        "fold": fold,
        "history": state.history,
        "best_epoch": best["epoch"],
        "best_val_miou": best["val_miou"],
        "precision": state.precision,
    }
    torch.save(saved, path)
    return {k: v for k, v in saved.items() if k != "state_dict"}


def load_model(path: Path, device: torch.device) -> tuple[LFSS, dict[str, Any]]:
    """The model in eval mode on ``device``, and the saved record."""
    try:
        saved = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing (run the train stage for this fold)") from None
    model = LFSS(saved["feat_channels"], ModelParams(**saved["model"])).to(device)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved
