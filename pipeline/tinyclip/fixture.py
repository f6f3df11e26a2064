"""A shipped tiny-CLIP checkpoint, so that a default run installs it instead of retraining.

A fixture is an open_clip local-dir folder with fp16 weights (a few MB) and ``provenance.json``:
the command that made it, the ``clip`` params, the caption-corpus generator params, the git
commit, a hash of the training code, the weights' sha256 and the accuracy measured on these very
(fp16-rounded) weights. ``make tiny-clip`` retrains it from scratch and rewrites it.

The ``clip_model`` stage installs a fixture only when its params and corpus match the run's;
otherwise it trains. A fixture made by other training code still installs, with a warning
(the provenance names the commit it came from).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from pipeline.clip.loader import ClipBundle, load_local_dir, save_local_dir
from pipeline.core.artifacts import git_state
from pipeline.core.errors import PipelineError

PROVENANCE = "provenance.json"
CORPUS_KEYS = ("seed", "image_size", "caption_images", "max_objects", "boundary_width")
#: the code that decides the trained weights, under pipeline/
TRAINING_CODE = ("tinyclip/model.py", "tinyclip/train.py", "clip/loader.py", "clip/towers.py",
                 "core/dtype.py")


def corpus_params(generator: dict[str, Any]) -> dict[str, Any]:
    """The generator params that decide the caption corpus."""
    return {k: generator[k] for k in CORPUS_KEYS}


def training_code_sha() -> str:
    here = Path(__file__).parents[1]
    blob = b"".join((here / name).read_bytes() for name in TRAINING_CODE)
    return hashlib.sha256(blob).hexdigest()[:16]


def git_commit() -> str:
    state = git_state()
    return "unknown" if state is None else state[0] + ("+dirty" if state[1] else "")


def round_to_fp16(bundle: ClipBundle) -> None:
    """Round the weights through fp16 in place, so the model is exactly what a fixture holds."""
    with torch.no_grad():
        for tensor in bundle.model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def install(folder: Path, clip: dict[str, Any], generator: dict[str, Any]) -> tuple[ClipBundle, dict] | None:
    """The fixture's model and provenance if it was made with these params and corpus, else None."""
    try:
        provenance = json.loads((folder / PROVENANCE).read_text())
    except FileNotFoundError:
        return None
    if provenance["clip"] != clip or provenance["corpus"] != corpus_params(generator):
        return None
    if provenance["training_code_sha"] != training_code_sha():
        warnings.warn(f"{folder}: made by other training code (commit {provenance['commit']}); "
                      "`make tiny-clip` retrains it", stacklevel=2)
    bundle = load_local_dir(folder)  # verifies the weights' sha256
    bundle.model.float()
    return bundle, provenance


def check_reproduces(folder: Path, clip: dict[str, Any], generator: dict[str, Any], zero_shot: float,
                     tolerance: float = 0.02) -> None:
    """Raise if a shipped fixture made with the same params and corpus reports a zero-shot top-1
    more than ``tolerance`` away from ``zero_shot`` (a retraining must reproduce it)."""
    try:
        provenance = json.loads((folder / PROVENANCE).read_text())
    except FileNotFoundError:
        return
    if provenance["clip"] != clip or provenance["corpus"] != corpus_params(generator):
        return
    shipped = provenance["metrics"]["zero_shot_top1"]
    if abs(shipped - zero_shot) > tolerance:
        raise PipelineError(f"{folder}: retrained zero-shot top-1 {zero_shot:.3f} is not within "
                            f"{tolerance:.2f} of the shipped {shipped:.3f}; the fixture was kept")


def write(bundle: ClipBundle, folder: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """Save ``bundle`` (already rounded by :func:`round_to_fp16`) as an fp16 fixture."""
    half = ClipBundle(bundle.model.half(), bundle.model_cfg, bundle.mean, bundle.std, bundle.image_size,
                      lfss=bundle.lfss)
    try:
        sha = save_local_dir(half, folder)
    finally:
        bundle.model.float()
    provenance = {**provenance, "weights_sha256": sha, "training_code_sha": training_code_sha(),
                  "commit": git_commit()}
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return provenance
