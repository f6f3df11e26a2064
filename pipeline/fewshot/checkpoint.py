"""``data/models/fold{k}/model.pt``: a trained fold's weights with what is needed to rebuild it.

Holds the best validation epoch's ``state_dict``, the model params it was built with, the backbone's
feature channels, whether it was trained (and so predicts) with circle inference, the fold, and
the training history; ``model.pt.sha256`` beside it (``sha256sum -c`` format) is checked on load,
and the file is read with ``torch.load(weights_only=True)``: tensors and plain data only, so a
replaced or crafted file cannot run code.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from pipeline.core.artifacts import read_verified
from pipeline.core.errors import PipelineError
from pipeline.core.params import ModelParams, validation_message
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
        "dtype": state.dtype,
    }
    torch.save(saved, path)
    sha_file(path).write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    return {k: v for k, v in saved.items() if k != "state_dict"}


def sha_file(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def safe_load(path: Path, device: torch.device | str = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; anything else in the file is one-line error."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise PipelineError(f"{path}: refused: it holds more than tensors and plain data "
                            f"({str(exc).splitlines()[0][:120]})") from None


def load_model(path: Path, device: torch.device) -> tuple[LFSS, dict[str, Any]]:
    """The model in eval mode on ``device``, and the saved record, once the file's sha256 matches."""
    read_verified(path, sha_file(path), "run the train stage for this fold",
                  "the checkpoint was changed or damaged (re-run train)")
    saved = safe_load(path, device)
    try:
        cfg = ModelParams(**saved["model"])
    except ValidationError as exc:
        why = validation_message(exc, "saved params")
        raise PipelineError(f"{path}: made by an earlier version ({why}): re-run train") from None
    model = LFSS(saved["feat_channels"], cfg).to(device)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved
