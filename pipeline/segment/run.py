"""A trained run as the segmenter reads it: where its files are, its class vocabulary, and the
checks that a checkpoint belongs to it.

A run directory (``--run``, default ``.``) holds what ``make repro`` wrote::

    params.yaml                  the params the run was made with
    data/index/meta.json         class and prompt names (the MaskCLIP vocabulary, in class-id order)
    data/models/clip/            the CLIP (open_clip local-dir, with its sha256)
    data/models/fold{k}/model.pt a trained fold (with model.pt.sha256)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.clip.loader import SHA_FILE
from pipeline.core.errors import PipelineError
from pipeline.core.params import Params, load_params
from pipeline.datasets.index import dataset_declaration, read_index_dir
from pipeline.fewshot.checkpoint import MODEL_FILE


@dataclass(frozen=True)
class RunDir:
    """The files of a trained run."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def open(cls, root: str | Path) -> RunDir:
        """The run at ``root``; one-line error when it is missing or holds no ``params.yaml``."""
        root = Path(root)
        if not root.is_dir():
            raise PipelineError(f"{root}: no such run directory (give --run the folder holding params.yaml "
                                "and data/)")
        if not (root / "params.yaml").is_file():
            raise PipelineError(f"{root}: not a run directory (no params.yaml)")
        return cls(root)

    @property
    def params_path(self) -> Path:
        return self.root / "params.yaml"

    @property
    def clip_dir(self) -> Path:
        return self.root / "data" / "models" / "clip"

    def model_path(self, fold: int) -> Path:
        return self.root / "data" / "models" / f"fold{fold}" / MODEL_FILE

    def params(self) -> Params:
        return load_params(self.params_path)

    def class_names(self) -> list[str]:
        """The run's class names, class id ``i + 1`` at position ``i`` (``data/index/meta.json``)."""
        return list(self.declaration()["class_names"])

    def prompt_names(self) -> tuple[str, ...]:
        """The same classes as the priors stage prompted them (the MaskCLIP vocabulary)."""
        return tuple(self.declaration()["prompt_names"])

    def declaration(self) -> dict:
        """What the run's dataset declares, as ``prepare`` recorded it (``data/index/meta.json``)."""
        index_dir = self.root / "data" / "index"
        try:
            meta = json.loads((index_dir / "meta.json").read_text())
        except FileNotFoundError:
            raise PipelineError(f"{index_dir / 'meta.json'}: missing (run the prepare stage first)") from None
        return dataset_declaration(meta, index_dir)

    def resolve(self, path: str | Path) -> Path:
        """A path of the run's index (relative ones are relative to the run directory)."""
        path = Path(path)
        return path if path.is_absolute() else self.root / path

    def index(self) -> pd.DataFrame:
        """``data/index``'s table with image and mask paths resolved against the run directory
        (``make repro`` records them relative to it)."""
        index, _ = read_index_dir(self.root / "data" / "index")
        for column in ("image_path", "mask_path"):
            index[column] = [str(self.resolve(p)) for p in index[column]]
        return index


def clip_sha256(clip_dir: Path) -> str | None:
    """The recorded sha256 of a CLIP folder's weights (None: no such folder)."""
    path = clip_dir / SHA_FILE
    return path.read_text().split()[0] if path.is_file() else None


def check_same_clip(model_path: Path, run_clip: Path) -> None:
    """A checkpoint in a run layout (``.../models/fold{k}/model.pt`` beside ``.../models/clip``)
    must come from the CLIP of the run it is used with: its priors, pseudo-masks and features were
    that CLIP's."""
    theirs = clip_sha256(model_path.parent.parent / "clip")
    ours = clip_sha256(run_clip)
    if theirs is not None and ours is not None and theirs != ours:
        raise PipelineError(f"{model_path}: a checkpoint from another CLIP (its run's data/models/clip has "
                            f"sha256 {theirs[:12]}…, this run's {run_clip} {ours[:12]}…)")
