"""Load CLIP models through open_clip and keep them as self-describing local folders.

The ``clip_model`` stage writes ``data/models/clip/`` in open_clip's *local-dir* format::

    open_clip_config.json       {"model_cfg": ..., "preprocess_cfg": ..., "lfss": {...}}
    open_clip_model.safetensors the weights
    sha256.txt                  sha256 of the weights file

and every later stage loads only that folder (:func:`load_local_dir`), so the weights a result
came from are always known. ``lfss`` records what this project changes on top of open_clip's
config (none for pretrained models), so custom towers round-trip too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import huggingface_hub.constants
import open_clip
import torch
from safetensors.torch import load_file, save_file

from pipeline.clip.towers import TOWER_CHANGES
from pipeline.core.artifacts import read_verified
from pipeline.core.errors import PipelineError

CONFIG_FILE, WEIGHTS_FILE, SHA_FILE = "open_clip_config.json", "open_clip_model.safetensors", "sha256.txt"


@dataclass
class ClipBundle:
    """A CLIP model with what is needed to feed it and to cite it."""

    model: open_clip.CLIP
    model_cfg: dict[str, Any]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    sha256: str | None = None  # of the saved weights; None until saved
    lfss: dict[str, Any] | None = None  # project-specific changes to the open_clip config

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "size": self.image_size}

    def tokenizer(self) -> Any:
        return open_clip.tokenizer.SimpleTokenizer(context_length=self.model.context_length)


def _uses_quick_gelu(name: str, pretrained: str | None) -> bool:
    """OpenAI weights were trained with QuickGELU (docs/design.md#conventions)."""
    return name.endswith("-quickgelu") or pretrained == "openai"


def load_pretrained(name: str, pretrained: str | None, cache_dir: str | None = None) -> ClipBundle:
    """An open_clip model by name, with a pretrained tag, a local checkpoint path, or none.

    Raises:
        PipelineError: unknown model, or weights that are neither cached nor downloadable.
    """
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise PipelineError(f"clip.model = {name!r}: not an open_clip model (see open_clip.list_models())")
    quick_gelu = _uses_quick_gelu(name, pretrained)
    unknown_tag = pretrained and open_clip.get_pretrained_cfg(name, pretrained) == {}
    if unknown_tag and not Path(pretrained).is_file():
        raise PipelineError(f"clip.pretrained = {pretrained!r}: neither a pretrained tag of {name} "
                            f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}) "
                            "nor a checkpoint file")
    def create() -> open_clip.CLIP:
        return open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir,
                                      force_quick_gelu=quick_gelu and not name.endswith("-quickgelu"))

    logging.disable(logging.ERROR)  # open_clip logs the failure itself; we say it in one line
    try:
        try:
            with _hub_offline():  # the local cache first: no network, no retries
                model = create()
        except Exception as cached:  # noqa: BLE001 - not cached: download, if there is a network
            source = _download_source(name, pretrained)
            why = source and _unreachable(source)
            if why:  # offline: say so now, not after a minute of the hub's retries
                raise PipelineError(_missing_weights(name, pretrained, cache_dir, why)) from cached
            model = create()
    except PipelineError:
        raise
    except Exception as exc:  # open_clip wraps download errors in RuntimeError
        raise PipelineError(_missing_weights(name, pretrained, cache_dir, exc)) from None
    finally:
        logging.disable(logging.NOTSET)
    model.eval()
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    return ClipBundle(model, {**model_cfg, "quick_gelu": quick_gelu},
                      tuple(visual.image_mean or open_clip.OPENAI_DATASET_MEAN),
                      tuple(visual.image_std or open_clip.OPENAI_DATASET_STD), int(size))


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hugging Face Hub lookups from the local cache only, for the duration."""
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = before


def _download_source(name: str, pretrained: str | None) -> str | None:
    """Where open_clip would download ``pretrained`` weights of ``name`` from (the Hugging Face Hub
    when the tag has a hub entry, else its URL); None for a local file or no weights."""
    cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    if cfg.get("hf_hub"):
        return f"{huggingface_hub.constants.ENDPOINT}/{cfg['hf_hub']}"
    return cfg.get("url") or None


def _unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url``'s host (or the configured proxy) cannot be reached -- the name does not resolve,
    or no connection within ``timeout`` seconds -- else None: one lookup and one connection, where a
    download attempt offline retries for about a minute before it gives up."""
    proxy = urllib.request.getproxies().get(urlparse(url).scheme)
    target = urlparse(proxy or url)
    if not target.hostname:
        return None
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{target.hostname}: {exc.strerror or exc}"


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return exc


def _missing_weights(name: str, pretrained: str | None, cache_dir: str | None, exc: Exception | str) -> str:
    cause = _root_cause(exc) if isinstance(exc, BaseException) else exc
    reason = " ".join(str(cause).split()) or type(cause).__name__  # the whole cause, on one line
    return (f"clip.pretrained = {pretrained!r}: weights for {name} are not cached and cannot be "
            f"downloaded ({reason}); give a local checkpoint path as clip.pretrained, or fill the "
            f"cache dir ({cache_dir or 'HF_HUB_CACHE / ~/.cache'}) on a machine with network")


def build_model(model_cfg: dict[str, Any], lfss: dict[str, Any] | None = None) -> open_clip.CLIP:
    """An untrained CLIP from an open_clip model config, with the project's recorded changes."""
    cfg = dict(model_cfg)
    quick_gelu = cfg.pop("quick_gelu", False)
    model = open_clip.CLIP(**cfg, quick_gelu=quick_gelu)
    for change, options in (lfss or {}).items():
        if change not in TOWER_CHANGES:
            raise PipelineError(f"unknown tower change {change!r} in the CLIP config "
                                f"(known: {', '.join(TOWER_CHANGES)})")
        TOWER_CHANGES[change](model, **options)
    return model


def save_local_dir(bundle: ClipBundle, folder: Path) -> str:
    """Write config, weights and their sha256; returns the sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in bundle.model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    sha = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    config = {"model_cfg": bundle.model_cfg, "preprocess_cfg": bundle.preprocess_cfg}
    if bundle.lfss:
        config["lfss"] = bundle.lfss
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / SHA_FILE).write_text(sha + "\n")
    bundle.sha256 = sha
    return sha


def load_local_dir(folder: Path, device: str | torch.device = "cpu") -> ClipBundle:
    """Load a folder written by :func:`save_local_dir`, verifying the weights' sha256."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError as exc:
        raise PipelineError(f"{exc.filename}: missing (run the clip_model stage)") from None
    _, sha = read_verified(folder / WEIGHTS_FILE, folder / SHA_FILE, "run the clip_model stage",
                           "the weights were changed or damaged")
    model = build_model(config["model_cfg"], config.get("lfss"))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    model.to(device).eval()
    pre = config["preprocess_cfg"]
    return ClipBundle(model, config["model_cfg"], tuple(pre["mean"]), tuple(pre["std"]),
                      int(pre["size"]), sha, config.get("lfss"))
