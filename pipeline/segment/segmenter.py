"""Segment new images of a class given by name, with a trained fold (the ``lfss-segment`` API).

Every step is the pipeline's own, applied to images no stage has seen:

1. priors per image (:meth:`~pipeline.priors.shards.Extractor.priors`, as the priors stage runs
   them): MaskCLIP scores, VTP and PIR for the one (image, class) pair, VVP tokens;
2. backbone features (resized and normalised at ``backbone.image_size`` as the features stage
   reads images: :func:`~pipeline.core.images.normalize`);
3. language-guided pseudo-masks of the query and the supports
   (:class:`~pipeline.pseudomasks.online.OnlineRefiner`: MaskCLIP initial mask + refiner), or the
   given support masks at the feature grid (standard few-shot), as ``load_episodes`` makes them;
4. the model, with circle inference as it was trained (:func:`~pipeline.model.lfss.predict`),
   and the prediction resized to the query's own size as ``evaluate.resize: original`` scores it.

Each image file is decoded once per step, upright (its EXIF orientation applied) and as 8-bit
RGB from any mode Pillow opens (:mod:`pipeline.segment.images`); the masks are at that upright size.

Everything stored as float16 by the stages (features, priors, tokens, pseudo-mask grids) is
rounded to float16 here too, so the masks are those ``evaluate@k`` makes for the same episodes.

The class vocabulary: the run's MaskCLIP label map is the argmax over the run's class names;
a name in that vocabulary (any case) is that class; any other name is appended to it as one
extra class (its own MaskCLIP text embedding and VTP prompts), so its label map is the class
against the run's vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.clip.prompts import MASKCLIP_TEMPLATES, text_embeddings
from pipeline.core.errors import PipelineError
from pipeline.core.images import normalize
from pipeline.core.params import ModelParams, Params
from pipeline.core.tensors import mask_to_grid
from pipeline.features.backbone import Backbone, load_backbone
from pipeline.fewshot.checkpoint import load_model, sha_file
from pipeline.fewshot.evaluate import Scoring
from pipeline.fewshot.online import stored_features
from pipeline.model.lfss import LFSS, Episodes, predict
from pipeline.priors.shards import Extractor, load_extractor
from pipeline.priors.vtp import PromptBank, prompt_bank
from pipeline.pseudomasks.online import MaskInputs, OnlineRefiner
from pipeline.segment.images import DECODE_ERRORS, read_image, stored_orientation, upright
from pipeline.segment.run import RunDir, check_same_clip

THRESHOLD = 0.5  # foreground where the probability is >= this (as evaluate scores)


@dataclass(frozen=True)
class Target:
    """The class asked for: its id in the (possibly extended) vocabulary."""

    name: str
    class_id: int  # 1..C, or C + 1 for a name outside the run's vocabulary
    in_vocabulary: bool
    vocabulary: tuple[str, ...]  # the names the MaskCLIP label map is the argmax over


@dataclass
class ImageInputs:
    """What the model reads of B images for one class (rounded to float16 as the stores hold it).

    Attributes:
        features: ``(B, C, h, w)`` backbone features.
        scores: ``(B, C', hp, wp)`` MaskCLIP scores over the vocabulary.
        vtp: ``(B, hp, wp)`` raw VTP; pir: ``(B, hp, wp)`` PIR-refined VTP.
        tokens: ``(B, 2, hp*wp, D)`` CLIP tokens of two blocks (VVP).
        sizes: ``(H, W)`` of each image.
    """

    features: torch.Tensor
    scores: torch.Tensor
    vtp: torch.Tensor
    pir: torch.Tensor
    tokens: torch.Tensor
    sizes: list[tuple[int, int]]

    def prior(self, cfg: ModelParams) -> torch.Tensor:
        """The VTP the model takes: ``(B, hp, wp)``."""
        return self.pir if cfg.pir else self.vtp


@dataclass
class Prediction:
    """One query's result.

    Attributes:
        probability: ``(H, W)`` float32 foreground probability at the query's own size.
        mask: ``(H, W)`` bool, ``probability >= 0.5``.
    """

    image: str
    probability: np.ndarray
    mask: np.ndarray

    @property
    def foreground_fraction(self) -> float:
        return float(self.mask.mean())

    @property
    def mean_probability(self) -> float:
        return float(self.probability.mean())


@dataclass
class Segmentation:
    """The result of one :meth:`Segmenter.segment` call.

    Attributes:
        support_masks: per support, ``(H, W)`` bool at its own size: the given mask, or the
            language-guided pseudo-mask of the first query's episode as the model took it (the
            feature-grid mask upsampled, >= 0.5).
    """

    target: Target
    supports: list[str]
    support_masks: list[np.ndarray]
    mask_source: str  # "pseudo-mask" | "given"
    predictions: list[Prediction] = field(default_factory=list)


def round16(x: torch.Tensor) -> torch.Tensor:
    """As the stores hold it: float16, read back as float32."""
    return x.half().float()


def read_rgb(path: str | Path) -> Image.Image:
    """The image ``path`` upright and 8-bit RGB (:func:`~pipeline.segment.images.read_image`);
    one-line error for an unreadable one."""
    try:
        return read_image(path)
    except DECODE_ERRORS as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise PipelineError(f"{path}: unreadable image ({reason})") from None


def checked_sizes(paths: Sequence[str | Path]) -> list[tuple[int, int]]:
    """``(H, W)`` of each image as shown (upright), decoded and converted in full (one-line error
    for an unreadable one)."""
    return [read_rgb(p).size[::-1] for p in paths]


def resized(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """``(B, 3, size, size)`` uint8 RGB ``images`` (bicubic resize), channels-last in memory, as
    :func:`~pipeline.core.images.load_resized` gives image files."""
    arrays = [np.asarray(im.resize((size, size), Image.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def read_mask(path: str | Path | np.ndarray) -> np.ndarray:
    """A binary support mask: an ``(H, W)`` array or an image file whose nonzero pixels are
    foreground (0/1 and 0/255 PNGs alike), upright (its EXIF orientation applied, if any)."""
    if isinstance(path, np.ndarray):
        return path.astype(bool)
    try:
        with Image.open(path) as opened:
            opened.load()
            im = upright(opened)  # as the support it belongs to is read
            return np.asarray(im if im.mode in ("1", "L", "P", "I", "I;16") else im.convert("L")) > 0
    except DECODE_ERRORS as exc:
        raise PipelineError(f"{path}: unreadable mask ({str(exc).splitlines()[0]})") from None


@dataclass
class Segmenter:
    """A trained fold with the CLIP, backbone and pseudo-mask refiner of the run it came from."""

    run: RunDir
    params: Params
    model: LFSS
    saved: dict[str, Any]  # the checkpoint record (model params, circle, fold, ...)
    model_path: Path
    model_sha256: str
    extractor: Extractor  # the CLIP and the run vocabulary's prompt embeddings
    backbone: Backbone
    vocabulary: tuple[str, ...]  # prompt names, class id i + 1 at position i
    class_names: tuple[str, ...]  # the run index's names (same order)
    device: torch.device
    batch_size: int = 16

    @property
    def cfg(self) -> ModelParams:
        return ModelParams(**self.saved["model"])

    @property
    def clip_sha256(self) -> str:
        return self.extractor.bundle.sha256

    @classmethod
    def from_run(cls, run: str | Path = ".", fold: int = 0, model: str | Path | None = None,
                 device: str | torch.device | None = None, batch_size: int = 16) -> Segmenter:
        """The segmenter of run directory ``run`` with fold ``fold``'s checkpoint (or ``model``)."""
        root = RunDir.open(run)
        params = root.params()
        class_names = root.class_names()
        vocabulary = root.prompt_names()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = Path(model) if model is not None else root.model_path(fold)
        check_same_clip(path, root.clip_dir)
        net, saved = load_model(path, device)
        extractor = load_extractor(root.clip_dir, params.priors, vocabulary)
        extractor.bundle.model.to(device)
        backbone = load_backbone(params.backbone, root.clip_dir, "cpu").to(device)
        if saved["feat_channels"] != backbone.channels:
            raise PipelineError(f"{path}: a checkpoint from another CLIP or backbone (trained on "
                                f"{saved['feat_channels']}-channel features; this run's "
                                f"{params.backbone.name} backbone gives {backbone.channels})")
        sha = sha_file(path).read_text().split()[0]
        return cls(root, params, net, saved, path, sha, extractor, backbone, vocabulary, tuple(class_names),
                   device, batch_size)

    @classmethod
    def from_checkpoint(cls, path: str | Path, run: str | Path | None = None, **kwargs: Any) -> Segmenter:
        """The segmenter of checkpoint ``path``; ``run`` defaults to the run that holds it
        (``<run>/data/models/fold{k}/model.pt``)."""
        path = Path(path)
        if run is None:
            run = path.parents[3] if len(path.parents) > 3 else Path(".")
        return cls.from_run(run, model=path, **kwargs)

    # -- the class --------------------------------------------------------------------------

    def target(self, name: str) -> Target:
        """The class ``name`` (stripped, any case) in the run's vocabulary, or appended to it."""
        name = " ".join(str(name).split())
        if not name:
            raise PipelineError("--class: an empty class name")
        folded = name.casefold()
        for i, (prompt, stored) in enumerate(zip(self.vocabulary, self.class_names, strict=True)):
            if folded in (prompt.casefold(), stored.casefold()):
                return Target(prompt, i + 1, True, self.vocabulary)
        self.check_fits(name)
        return Target(name, len(self.vocabulary) + 1, False, (*self.vocabulary, name))

    def check_fits(self, name: str) -> None:
        """A new class name must fit the CLIP's text context in every prompt it is put in (the 85
        MaskCLIP templates, the VTP foreground and background templates): the tokenizer would cut
        a longer prompt short, so the class would silently be another name's. One line otherwise."""
        tokenizer = self.extractor.bundle.tokenizer()
        cfg = self.params.priors
        templates = (*MASKCLIP_TEMPLATES, cfg.foreground_template, cfg.background_template)
        counts = [len(tokenizer.encode(t.format(name))) + 2 for t in templates]  # with start and end tokens
        worst = max(range(len(templates)), key=counts.__getitem__)
        context = tokenizer.context_length
        if counts[worst] > context:
            own = len(tokenizer.encode(name))
            shown = name if len(name) <= 40 else f"{name[:40]}…"
            raise PipelineError(f"--class {shown!r}: too long for the CLIP's {context}-token text context "
                                f"(the name is {own} tokens; in the prompt {templates[worst]!r} it takes "
                                f"{counts[worst]}, so it would be cut): give a name of at most "
                                f"{own - counts[worst] + context} tokens")

    def extractor_for(self, target: Target) -> Extractor:
        """The run's extractor, with ``target`` appended to its prompts when it is not in them."""
        ex = self.extractor
        if target.in_vocabulary:
            return ex
        model, tokenizer, cfg = ex.bundle.model, ex.bundle.tokenizer(), self.params.priors
        extra = prompt_bank(model, tokenizer, [target.name], cfg.foreground_template, cfg.background_template)
        bank = PromptBank(torch.cat([ex.bank.foreground, extra.foreground.to(ex.bank.foreground)]),
                          torch.cat([ex.bank.background, extra.background.to(ex.bank.background)]))
        text = text_embeddings(model, tokenizer, [target.name]).to(ex.class_text)
        return replace(ex, bank=bank, class_text=torch.cat([ex.class_text, text]))

    # -- the steps --------------------------------------------------------------------------

    @torch.no_grad()
    def inputs(self, paths: Sequence[str | Path], target: Target, ex: Extractor,
               sizes: list[tuple[int, int]] | None = None) -> ImageInputs:
        """The priors and features of ``paths`` (of ``sizes``, when already checked) for
        ``target``, each image forwarded once."""
        rgb = [read_rgb(p) for p in paths]  # decoded once for both models
        sizes = sizes or [im.size[::-1] for im in rgb]
        pairs = [[target.class_id]] * len(paths)  # one pair per image; its labels: the class alone
        got = ex.priors(ex.normalize(resized(rgb, ex.image_size)), pairs, pairs)
        side = self.params.backbone.image_size
        images = normalize(resized(rgb, side), self.backbone.mean, self.backbone.std, self.device)
        features = stored_features(self.backbone, images)
        tokens = torch.stack([t.float() for t in got.tokens], 1)
        return ImageInputs(features, round16(got.maskclip_scores), round16(got.vtp), round16(got.pir),
                           round16(tokens).to(self.device), sizes)

    def refiner(self) -> OnlineRefiner:
        """The run's ``pseudo_masks`` params with the checkpoint's ``model.pseudo_masks``."""
        return OnlineRefiner.from_params(self.params.model_copy(update={"model": self.cfg}))

    def episode_masks(self, query: ImageInputs, supports: ImageInputs, target: Target,
                      given: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The query ``(B, h, w)`` and support ``(B, K, h, w)`` masks at the feature grid of B
        episodes sharing the K supports: pseudo-masks (the query's always, as evaluate reads it), the
        supports' replaced by ``given`` ``(K, h, w)`` when masks were given."""
        b, k = len(query.sizes), len(supports.sizes)
        refiner = self.refiner()
        vtp_on = refiner.vtp_threshold is not None
        made = MaskInputs(query.scores, supports.scores[None].expand(b, *supports.scores.shape),
                          torch.full((b,), target.class_id, device=self.device),
                          query.vtp if vtp_on else None,
                          supports.vtp[None].expand(b, k, *supports.vtp.shape[1:]) if vtp_on else None)
        q_mask, s_mask = refiner(query.features, supports.features[None].expand(b, *supports.features.shape),
                                 made.to(self.device))
        if given is not None:
            s_mask = given[None].expand(b, *given.shape)
        return q_mask, s_mask

    @torch.no_grad()
    def predict(self, query: ImageInputs, supports: ImageInputs, target: Target,
                given: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, h, w)`` foreground probabilities of B queries at the feature grid, and the
        ``(B, K, h, w)`` support masks the model was given."""
        b, k = len(query.sizes), len(supports.sizes)
        q_mask, s_mask = self.episode_masks(query, supports, target, given)
        cfg = self.cfg
        shots = [Episodes(query=query.features, query_mask=q_mask,
                          support=supports.features[shot: shot + 1].expand(b, -1, -1, -1),
                          support_mask=s_mask[:, shot], query_vtp=query.prior(cfg),
                          support_vtp=supports.prior(cfg)[shot: shot + 1].expand(b, -1, -1),
                          query_tokens=query.tokens,
                          support_tokens=supports.tokens[shot: shot + 1].expand(b, -1, -1, -1))
                 for shot in range(k)]
        return predict(self.model, shots, circle_inference=self.saved["circle"]).float().cpu(), s_mask

    # -- the whole call ---------------------------------------------------------------------

    def segment(self, queries: Sequence[str | Path], class_name: str, supports: Sequence[str | Path],
                support_masks: Sequence[str | Path | np.ndarray] | None = None,
                progress: Callable[[Iterator], Iterator] | None = None) -> Segmentation:
        """Masks of ``queries`` for ``class_name`` from K ``supports`` (images without masks:
        language-guided pseudo-masks, as in training; or with one ``support_masks`` each).

        ``progress`` wraps the iterator over query batches (e.g. ``tqdm``). Every prediction is
        kept: for many queries, :meth:`segment_batches` holds one batch at a time."""
        parts = list(self.segment_batches(queries, class_name, supports, support_masks, progress))
        return replace(parts[0], predictions=[p for part in parts for p in part.predictions])

    def segment_batches(self, queries: Sequence[str | Path], class_name: str, supports: Sequence[str | Path],
                        support_masks: Sequence[str | Path | np.ndarray] | None = None,
                        progress: Callable[[Iterator], Iterator] | None = None) -> Iterator[Segmentation]:
        """:meth:`segment`, one :class:`Segmentation` per batch of ``batch_size`` queries (each with
        that batch's predictions only), so memory does not grow with the number of queries.
        Every image is checked before the first batch."""
        target = self.target(class_name)
        if not supports:
            raise PipelineError("--support: give at least one support image")
        if not queries:
            raise PipelineError("--query: no query images")
        q_sizes, s_sizes = checked_sizes(queries), checked_sizes(supports)  # all readable before any work
        given = None if support_masks is None else self.given_masks(supports, support_masks, s_sizes)
        ex = self.extractor_for(target)
        s_inputs = self.inputs(supports, target, ex, s_sizes)
        grid = s_inputs.features.shape[-2:]
        given_grid = None if given is None else torch.stack(
            [round16(mask_to_grid(torch.from_numpy(m), grid)) for m in given]).to(self.device)
        source = "pseudo-mask" if given is None else "given"
        shown: list[np.ndarray] | None = given  # the supports' masks as the first episode had them
        starts = range(0, len(queries), self.batch_size)
        for start in progress(iter(starts)) if progress else starts:
            part = queries[start: start + self.batch_size]
            q_inputs = self.inputs(part, target, ex, q_sizes[start: start + self.batch_size])
            probs, s_mask = self.predict(q_inputs, s_inputs, target, given_grid)
            if shown is None:
                shown = [(Scoring().at_label(m[None].cpu(), size)[0] >= THRESHOLD).numpy()
                         for m, size in zip(s_mask[0], s_inputs.sizes, strict=True)]
            predictions = []
            for j, (path, size) in enumerate(zip(part, q_inputs.sizes, strict=True)):
                prob = Scoring().at_label(probs[j: j + 1], size)[0]
                predictions.append(Prediction(str(path), prob.clamp(0, 1).numpy(),
                                              (prob >= THRESHOLD).numpy()))
            yield Segmentation(target, [str(s) for s in supports], shown, source, predictions)

    def given_masks(self, supports: Sequence[str | Path], masks: Sequence[str | Path | np.ndarray],
                    sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """The given support masks, one per support, each of its support's size."""
        if len(masks) != len(supports):
            raise PipelineError(f"--support-mask: {len(masks)} masks for {len(supports)} supports "
                                "(give one mask per support, in the same order)")
        out = []
        for mask, support, (h, w) in zip(masks, supports, sizes, strict=True):
            array = read_mask(mask)
            if array.shape != (h, w):
                name = "the mask" if isinstance(mask, np.ndarray) else str(mask)
                shown = (f" as shown (its EXIF orientation {stored_orientation(support)} applied: give the "
                         "mask upright)" if array.shape == (w, h) and stored_orientation(support) > 4 else "")
                raise PipelineError(f"{name}: mask is {array.shape[1]}x{array.shape[0]} but its support "
                                    f"{support} is {w}x{h}{shown}")
            out.append(array)
        return out
