"""The unit of work of the priors stage: a range of image rows, writing whole Zarr shards.

:func:`extract_image_shard` loads the images, forwards each once, and writes MaskCLIP scores and
labels, VVP token features, and VTP / PIR of every pair slot. :func:`load_extractor` builds what
it needs from a CLIP folder and the ``priors`` params.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import zarr

from pipeline.clip.loader import ClipBundle, load_local_dir
from pipeline.clip.prompts import text_embeddings
from pipeline.core.dtype import Resolved, autocast, resolve
from pipeline.core.images import load_resized, normalize, read_ahead
from pipeline.core.interrupt import check_stop
from pipeline.core.params import PriorsParams
from pipeline.core.shard_rows import aligned_zeros, write_shard
from pipeline.core.tensors import CamScale
from pipeline.priors.extract import extract_priors
from pipeline.priors.pir import BoxRule
from pipeline.priors.vtp import PromptBank, PromptSet, prompt_bank


@dataclass
class Extractor:
    """A loaded CLIP with its prompt embeddings and the extraction options."""

    bundle: ClipBundle
    bank: PromptBank
    class_text: torch.Tensor  # (C, E) MaskCLIP class embeddings
    image_size: int
    prompt_set: PromptSet
    pir_blocks: int
    pir_threshold: float
    cam_scale: CamScale
    box: BoxRule
    batch_size: int
    dtype: Resolved

    @property
    def device(self) -> torch.device:
        return next(self.bundle.model.parameters()).device

    def load_images(self, paths: Sequence[str]) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised images (bicubic resize to the CLIP input side), on its device."""
        return self.normalize(self.pixels(paths))

    def pixels(self, paths: Sequence[str]) -> torch.Tensor:
        """``(B, 3, S, S)`` uint8 images resized to the CLIP input side, on the host."""
        return load_resized(paths, self.image_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """The CLIP's normalised input, on its device."""
        return normalize(pixels, self.bundle.mean, self.bundle.std, self.device)

    def autocast_context(self):
        return autocast(self.dtype, self.device)

    def priors(self, images: torch.Tensor, pair_classes: Sequence[Sequence[int]],
               image_labels: Sequence[Sequence[int]]):
        """:func:`extract_priors` for images whose pairs are ``pair_classes[i]``."""
        pair_image = torch.tensor([i for i, cs in enumerate(pair_classes) for _ in cs], dtype=torch.long)
        flat = [c for cs in pair_classes for c in cs]
        with self.autocast_context():
            return extract_priors(
                self.bundle.model, images, pair_image.to(self.device), flat, image_labels, self.bank,
                self.class_text, prompt_set=self.prompt_set, pir_blocks=self.pir_blocks,
                pir_threshold=self.pir_threshold, cam_scale=self.cam_scale, box=self.box)


def load_extractor(clip_dir: Path, cfg: PriorsParams, names: Sequence[str]) -> Extractor:
    """The CLIP of ``clip_dir`` (on CUDA when present) with the prompt embeddings of ``names``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bundle = load_local_dir(clip_dir, device)
    tokenizer = bundle.tokenizer()
    return Extractor(
        bundle,
        prompt_bank(bundle.model, tokenizer, names, cfg.foreground_template, cfg.background_template),
        text_embeddings(bundle.model, tokenizer, names), cfg.image_size or bundle.image_size,
        prompt_set=cfg.prompt_set, pir_blocks=cfg.pir_blocks, pir_threshold=cfg.pir_threshold,
        cam_scale=cfg.cam_scale, box=cfg.box, batch_size=cfg.batch_size, dtype=resolve(cfg.dtype, device))


def extract_image_shard(
    root: zarr.Group, rows: range, paths: Sequence[str], pair_classes: Sequence[Sequence[int]],
    image_labels: Sequence[Sequence[int]], ex: Extractor,
) -> None:
    """Fill image rows ``rows`` (``paths`` etc. are given for these rows only)."""
    n = len(rows)
    names = ("images/maskclip_scores", "images/maskclip_labels", "images/tokens_0", "images/tokens_1",
             "pairs/class_id", "pairs/vtp", "pairs/pir")
    out = {name: aligned_zeros((n, *root[name].shape[1:]), root[name].dtype) for name in names}
    held = {name: torch.from_numpy(values) for name, values in out.items()}  # the same memory

    def load(part: slice) -> torch.Tensor:  # on a GPU the next batch decodes while the CLIP works
        check_stop()  # a stop requested: no further batch is read
        return ex.pixels(paths[part])

    check_stop()
    for part, pixels in read_ahead(load, n, ex.batch_size, ahead=ex.device.type == "cuda"):
        got = ex.priors(ex.normalize(pixels), pair_classes[part], image_labels[part])
        # each copy_ rounds to the stored dtype as it copies (as numpy's assignment did, 6x faster)
        held["images/maskclip_scores"][part].copy_(got.maskclip_scores)
        held["images/maskclip_labels"][part].copy_(got.maskclip_labels)
        held["images/tokens_0"][part].copy_(got.tokens[0])
        held["images/tokens_1"][part].copy_(got.tokens[1])
        image = torch.tensor([i for i, cs in enumerate(pair_classes[part], start=part.start) for _ in cs],
                             dtype=torch.long)
        slot = torch.tensor([j for cs in pair_classes[part] for j in range(len(cs))], dtype=torch.long)
        held["pairs/class_id"][image, slot] = torch.tensor([c for cs in pair_classes[part] for c in cs],
                                                           dtype=held["pairs/class_id"].dtype)
        held["pairs/vtp"][image, slot] = got.vtp.cpu().to(held["pairs/vtp"].dtype)
        held["pairs/pir"][image, slot] = got.pir.cpu().to(held["pairs/pir"].dtype)
    for name, values in out.items():
        write_shard(root[name], rows.start, values)
