"""The device side of benchmarks/throughput.py: each stage's model work alone, on inputs already
on the device, timed with CUDA events on a GPU (wall time on a CPU), per item.

With random-weight models of the real shapes (open_clip ViT-B-16 at 473 px for the priors, a
dilated torchvision ResNet-50 at 400 px, or 473 px online, for the features, the LFSS decoder with
its guidance on 1536 x 50 x 50 features), at the LFSS preset's batch sizes and ``dtype: auto``
(fp16 autocast on CUDA for the CLIP and for training; fp32 on a CPU).

With a :data:`projection` set (``throughput.py --project h200``), each work runs once on this
device and its time on that GPU is projected op by op instead (benchmarks/_roofline.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from _roofline import Gpu, OpCosts

from pipeline.clip.dense import labels_from_scores
from pipeline.core.dtype import resolve
from pipeline.core.params import BackboneParams, ModelParams, PriorsParams, TrainParams
from pipeline.core.tensors import mask_to_grid
from pipeline.datasets.episodes import image_classes
from pipeline.features.backbone import load_backbone
from pipeline.fewshot.online import ImageSource
from pipeline.fewshot.train import Online, Optimiser, autocast_for, episode_loss, make_step
from pipeline.model.lfss import LFSS, predict
from pipeline.priors.shards import load_extractor
from pipeline.pseudomasks.online import OnlineRefiner
from pipeline.pseudomasks.refine import background_similarity, initial_masks, refine_masks


@dataclass
class DeviceWork:
    stage: str
    unit: str
    seconds_per_item: float
    items: int  # per call


@dataclass
class Projection:
    """Project onto ``gpu`` rather than time; ``scale``: the preset's items per call over this run's.
    ``recorded``: each projected call's ops and whether it runs in fp16 there, in order."""

    gpu: Gpu
    scale: float
    recorded: list[tuple[OpCosts, bool]] = field(default_factory=list)

    def seconds(self, costs: OpCosts, half: bool, efficiency: float) -> float:
        """Projected seconds of one call of this run's size at ``efficiency`` of the peaks."""
        return costs.seconds(replace(self.gpu, efficiency=efficiency), self.scale, half) / self.scale


projection: Projection | None = None


def per_call(fn: Callable[[], object], device: torch.device, repeats: int, half: bool) -> float:
    """Seconds of one call of ``fn`` on ``device`` (after a warm-up call): CUDA events around
    ``repeats`` calls on a GPU, wall time on a CPU; with a :data:`projection`, its projected
    seconds on that GPU, per this run's items (``half``: the work runs in fp16 autocast there)."""
    if projection is not None:  # no warm-up: the ops are counted, not timed
        with OpCosts() as costs:
            fn()
        print(f"    {costs.summary()} a call", flush=True)
        projection.recorded.append((costs, half))
        return projection.seconds(costs, half, projection.gpu.efficiency)
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / 1000 / repeats


def priors_work(run, clip_dir: Path, device: torch.device, batch: int, repeats: int) -> DeviceWork:
    """The CLIP forward, MaskCLIP scores, GradCAM of every pair and PIR of ``batch`` images."""
    ex = load_extractor(clip_dir, PriorsParams(image_size=473, batch_size=batch, dtype="auto"),
                        run.class_names)
    pairs = image_classes(run.manifests.values())
    ids = list(pairs)[:batch]
    paths, labels = run.paths, dict(zip(run.index.image_id, run.index.class_ids, strict=True))
    images = ex.load_images([paths[i] for i in ids])
    pair_classes, image_labels = [pairs[i] for i in ids], [list(labels[i]) for i in ids]
    seconds = per_call(lambda: ex.priors(images, pair_classes, image_labels), device, repeats, half=True)
    return DeviceWork("priors", "images", seconds / batch, batch)


def features_work(run, resnet: Path, device: torch.device, batch: int, repeats: int) -> DeviceWork:
    """The frozen ResNet-50 at 400 px on ``batch`` images."""
    backbone = load_backbone(BackboneParams(name="resnet50", weights=str(resnet), image_size=400), Path("-"),
                             device)
    images = torch.randn(batch, 3, 400, 400, device=device)
    seconds = per_call(lambda: backbone(images), device, repeats, half=False)
    return DeviceWork("features", "images", seconds / batch, batch)


def pseudo_mask_work(device: torch.device, batch: int, shots: int, classes: int, repeats: int) -> DeviceWork:
    """Per 5-shot episode: the label maps of its 6 images at 400 px, initial masks, background
    similarities and the refiner (what a shard computes; pairs shared by episodes counted each time)."""
    images = batch * (shots + 1)
    scores = torch.randn(images, classes, 29, 29, device=device)
    feats = torch.randn(images, 1536, 50, 50, device=device)
    pair_class = torch.randint(1, classes + 1, (images,), device=device)

    def work():
        labels = labels_from_scores(scores, (400, 400)) + 1
        init = initial_masks(labels, pair_class, None, vtp_threshold=None)
        background = background_similarity(feats, mask_to_grid(init, (50, 50)), 0.1)
        n = batch * shots
        return refine_masks(feats[:n].view(batch, shots, *feats.shape[1:]),
                            init[:n].view(batch, shots, 400, 400), feats[n:], init[n:], alpha=0.5,
                            temperature=0.1, background=background)

    return DeviceWork("pseudo_masks", "episodes", per_call(work, device, repeats, half=False) / batch, batch)


def training_work(inputs, table, cfg: TrainParams, device: torch.device, online: Online, repeats: int,
                  stage: str, source: ImageSource | None = None) -> DeviceWork:
    """One optimiser step of the LFSS model on a batch the loader made (its pseudo-masks, and for
    online features the backbone, in the step)."""
    torch.manual_seed(0)
    model = LFSS(inputs.bank.features.shape[1], ModelParams()).to(device).train()
    resolved = resolve(cfg.dtype, device)
    opt, mixed = Optimiser.of(model, cfg, device, resolved, 1000), autocast_for(device, resolved)
    batch = make_step(table, inputs.bank, torch.arange(cfg.batch_size), cfg, source, 0)

    def step():
        with mixed():
            loss = episode_loss(model, batch, cfg, device, online)
        opt.step(loss)

    seconds = per_call(step, device, repeats, half=True)
    return DeviceWork(stage, "episodes", seconds / cfg.batch_size, cfg.batch_size)


def evaluation_work(inputs, table, device: torch.device, batch: int, repeats: int) -> DeviceWork:
    """The K-shot prediction of ``batch`` test episodes, per episode-shot (a forward each)."""
    model = LFSS(inputs.bank.features.shape[1], ModelParams()).to(device).eval()
    index = torch.arange(batch)
    shots = [table.batch(inputs.bank, index, shot).to(device) for shot in range(table.shots)]
    mixed = autocast_for(device, resolve("auto", device))

    @torch.no_grad()
    def work():
        with mixed():
            return predict(model, shots, circle_inference=TrainParams().circle)

    seconds = per_call(work, device, repeats, half=True)
    return DeviceWork("evaluate", "episode-shots", seconds / (batch * table.shots), batch * table.shots)


def lfss_online() -> Online:
    """The LFSS preset's training step: pseudo-masks of the fresh episodes made in it, at 400 px."""
    return Online(OnlineRefiner(400, 0.5, 0.1, None, refined=True))


def piclip_online(resnet: Path, device: torch.device, source: ImageSource) -> Online:
    """The PI-CLIP regime's: ResNet-50 features of the viewed 473 px images, and pseudo-masks."""
    backbone = load_backbone(BackboneParams(name="resnet50", weights=str(resnet), image_size=473), Path("-"),
                             device)
    return Online(OnlineRefiner(473, 0.5, 0.1, None, refined=True), backbone, source)
