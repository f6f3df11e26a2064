"""Episodic training of one fold (LFSS §3.6): BCE with circle training, Adam, seeded.

* Loss (Eq. 20): ``β·BCE(M̂_s, M_s) + (1 − β)·BCE(M̂_q, M_q)`` with circle training (the support
  is segmented from itself, then the query from that predicted support mask); without circle
  training, ``BCE(M̂_q, M_q)`` from the input support mask. Logits are upsampled to
  ``label_size`` and compared with the labels there; 255 pixels are ignored.
* One epoch is one pass over the epoch's training episodes (the fixed pool, or the epoch's own
  fresh draw under ``train.sampling: epoch``, whose pseudo-masks are then made here, on the
  device, by :class:`~pipeline.pseudomasks.online.OnlineRefiner`) in a seeded order. The
  learning rate is constant or decays per step as ``(1 - step / steps) ** poly_power``. After every epoch the
  model is scored on held-out base-class episodes (validation mIoU) and a checkpoint is written;
  :func:`fit` resumes from it, continuing exactly where it stopped. The best epoch's weights win.
* ``train.dtype`` (:mod:`pipeline.core.dtype`): ``auto`` is fp16 autocast with gradient
  scaling on CUDA, bf16 autocast on a CPU with native bf16, else fp32. Under ``torchrun``
  (``torch.distributed`` initialised) the model is wrapped in DistributedDataParallel, each
  rank takes its share of every batch, and rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.core.artifacts import write_atomic
from pipeline.core.dtype import Resolved, autocast, resolve
from pipeline.core.metrics import IGNORE
from pipeline.core.params import TrainParams
from pipeline.fewshot.data import EpisodeTable, ImageBank, prefetched, upsample
from pipeline.fewshot.evaluate import evaluate_table
from pipeline.fewshot.online import ImageSource, OnlineBatch, online_batch, view_seed, with_features
from pipeline.model.lfss import Episodes, circle
from pipeline.pseudomasks.online import MaskInputs, OnlineRefiner

VALIDATION_BATCH = 64  # episodes per validation forward pass


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B, h, w)`` logits, ``(B, H, W)`` uint8 targets (255 ignored) -> mean BCE at ``H × W``."""
    up = upsample(logits.float(), target.shape[-2:])
    valid = (target != IGNORE).float()
    loss = F.binary_cross_entropy_with_logits(up, (target == 1).float(), weight=valid, reduction="sum")
    return loss / valid.sum().clamp(min=1)


@dataclass
class Step:
    """One training batch on the CPU: the episodes, the ``(B, H, W)`` uint8 targets of the
    queries and (for circle training) of the supports, at ``label_size``, and what the
    pseudo-masks are made from when the episodes come without them."""

    x: Episodes
    query_target: torch.Tensor
    support_target: torch.Tensor | None
    masks: MaskInputs | None = None
    images: bool = False  # x.query and x.support are normalised images (features made in the step)


@dataclass(frozen=True)
class Online:
    """What the training step computes itself rather than reads from the stores."""

    refiner: OnlineRefiner | None = None  # pseudo-masks of episodes that come without them
    backbone: nn.Module | None = None  # features of batches that come as images (train.features: online)
    source: ImageSource | None = None  # ... and where those images are


def make_step(
    table: EpisodeTable, bank: ImageBank, index: torch.Tensor, cfg: TrainParams,
    source: ImageSource | None = None, seed: int = 0,
) -> Step | OnlineBatch:
    """The batch of episodes ``index`` (read from the bank: in memory, or from the stores), as a
    loader makes it; with a ``source``, images instead of features, seen through random views
    drawn from ``seed`` under ``train.augment: papers``: an :class:`OnlineBatch` whose per-pixel
    work :func:`on_device` does where the step runs."""
    if source is not None:
        return online_batch(table, bank, index, cfg, source, seed)
    query_target = bank.targets(table.query[index], table.classes[index], cfg.label_size)
    support_target = (bank.targets(table.supports[index, 0], table.classes[index], cfg.label_size)
                      if cfg.circle else None)
    masks = table.mask_inputs(bank, index) if table.online_masks else None
    return Step(table.batch(bank, index), query_target, support_target, masks)


def on_device(batch: Step | OnlineBatch, cfg: TrainParams, device: torch.device | str) -> Step:
    """``batch`` ready for the step on ``device``: an online batch finished there (normalised,
    warped, its targets made), a stored one as it is (moved by :func:`episode_loss`)."""
    if isinstance(batch, Step):
        return batch
    x, masks, query_target, support_target = batch.finish(device)
    return Step(x, query_target, support_target if cfg.circle else None, masks, images=True)


def with_pseudo_masks(x: Episodes, masks: MaskInputs, refiner: OnlineRefiner) -> Episodes:
    """``x`` (on the device) with the pseudo-masks made from ``masks``, in float32 whatever the
    autocast (the stored ones are); ground-truth support masks (``supervision: mask``) are kept."""
    with torch.autocast(x.query.device.type, enabled=False):
        query_mask, support_mask = refiner(x.query, x.support[:, None], masks.to(x.query.device))
    return replace(x, query_mask=query_mask,
                   support_mask=support_mask[:, 0] if x.support_mask is None else x.support_mask)


def episode_loss(
    model: nn.Module, batch: Step | OnlineBatch, cfg: TrainParams, device: torch.device,
    online: Online = Online(),
) -> torch.Tensor:
    step = on_device(batch, cfg, device)
    x, query_target = step.x.to(device), step.query_target.to(device)
    if step.images:
        if online.backbone is None:
            raise ValueError("a batch of images needs a backbone")
        x = with_features([x], online.backbone)[0]
    if step.masks is not None:
        if online.refiner is None:
            raise ValueError("episodes without pseudo-masks need an OnlineRefiner")
        x = with_pseudo_masks(x, step.masks, online.refiner)
    if not cfg.circle:
        return bce(model(x), query_target)
    support_logits, query_logits = circle(model, x)
    support_target = step.support_target.to(device)
    return cfg.beta * bce(support_logits, support_target) + (1 - cfg.beta) * bce(query_logits, query_target)


def autocast_for(device: torch.device, resolved: Resolved) -> Callable[[], contextlib.AbstractContextManager]:
    return lambda: autocast(resolved, device)


@dataclass
class State:
    """What a checkpoint holds."""

    epoch: int = 0  # epochs finished
    history: list[dict] = field(default_factory=list)
    best_miou: float = -1.0
    best_state: dict | None = None
    dtype: str = "fp32"  # resolved: of training and validation


def same_keys(history: list[dict]) -> list[dict]:
    """``history`` with interned keys, the very objects of the record literals below: pickle
    memoises strings by identity, so a resumed history (keys unpickled from the checkpoint) then
    saves to the same bytes as an uninterrupted one."""
    return [{sys.intern(key): value for key, value in row.items()} for row in history]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded episode order of an epoch (a function of seed and epoch only: resumable)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def lr_factor(cfg: TrainParams, steps: int) -> Callable[[int], float]:
    """The learning rate's factor at each of ``steps`` optimiser steps."""
    if cfg.lr_schedule == "constant":
        return lambda step: 1.0
    return lambda step: max(0.0, 1 - step / steps) ** cfg.poly_power


@dataclass
class Optimiser:
    """Adam, its gradient scaler (active for fp16 on CUDA) and the learning-rate schedule: what a
    step updates and a checkpoint keeps."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: torch.optim.lr_scheduler.LambdaLR

    @classmethod
    def of(cls, model: nn.Module, cfg: TrainParams, device: torch.device, resolved: Resolved,
           steps: int) -> Optimiser:
        """For ``steps`` optimiser steps of ``model``'s trainable parameters."""
        optimizer = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and resolved == "fp16")
        return cls(optimizer, scaler, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps)))

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "schedule": self.schedule.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        self.schedule.load_state_dict(saved["schedule"])


def set_aside(path: Path, aside: Path | None = None) -> Path:
    """Rename ``path`` to ``aside`` (default ``{path}.bad``; ``aside`` with 1, 2, ... appended when
    taken): kept for a look, out of the way of the next run. Returns the new path."""
    base = aside or path.with_name(f"{path.name}.bad")
    target, n = base, 0
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}{n}")
    return path.rename(target)


def resume(checkpoint: Path | None, model: nn.Module, opt: Optimiser, device: torch.device,
           keep_bad: bool = True, aside: Path | None = None) -> State:
    """The state of the last finished epoch in ``checkpoint`` (model and optimiser restored in
    place), or a fresh one.

    A checkpoint that does not load -- truncated by a crash or a full disk, crafted (anything but
    tensors and plain data is refused unread), or of another model -- costs the epochs it held,
    never the run: one line on stderr names it, it is set aside (:func:`set_aside` to ``aside``; both
    by the process that writes checkpoints: ``keep_bad``) and training starts from scratch, with the
    model and optimiser as they were before the attempt."""
    if checkpoint is None or not checkpoint.exists():
        return State()
    fresh_model, fresh_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    try:
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        state = State(**saved["state"])
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved)
    except Exception as exc:  # noqa: BLE001 -- any unreadable checkpoint: restart, saying why
        model.load_state_dict(fresh_model)
        opt.load_state_dict(fresh_opt)
        if keep_bad:  # the other processes of a torchrun group restart without a word
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            tqdm.write(f"{checkpoint}: unreadable resume checkpoint ({type(exc).__name__}: {why}); set aside "
                       f"as {set_aside(checkpoint, aside)}; training starts from scratch",
                       file=sys.stderr)  # on a line of its own beside a progress bar
        return State()
    state.history = same_keys(state.history)
    return state


def save_checkpoint(checkpoint: Path, model: nn.Module, opt: Optimiser, state: State) -> None:
    saved = {"model": model.state_dict(), **opt.state_dict(),
             "state": vars(state)}  # plain data: loads with weights_only=True
    write_atomic(checkpoint, lambda tmp: torch.save(saved, tmp))


def train_epoch(net: nn.Module, table: EpisodeTable, bank: ImageBank, cfg: TrainParams, opt: Optimiser,
                mixed: Callable[[], contextlib.AbstractContextManager], device: torch.device, online: Online,
                epoch: int, steps: int, shard: tuple[int, int], loader_workers: int,
                progress: Callable[[int, int], None] | None) -> float:
    """One epoch over ``table`` in its seeded order (this process's ``shard = (rank, world)`` of
    each batch); the mean loss."""
    order = epoch_order(len(table), cfg.seed, epoch)
    rank, world = shard
    total = 0.0

    def batch(step: int) -> Step | OnlineBatch:
        index = order[step * cfg.batch_size : (step + 1) * cfg.batch_size][rank::world]
        return make_step(table, bank, index, cfg, online.source, view_seed(cfg.seed, epoch, step))

    for step, prepared in enumerate(prefetched(batch, steps, loader_workers)):
        with mixed():
            loss = episode_loss(net, prepared, cfg, device, online)
        opt.step(loss)
        total += float(loss.detach())
        if progress:
            progress(epoch * steps + step + 1, cfg.epochs * steps)
    return total / steps


def fit(
    model: nn.Module,
    train: EpisodeTable | Callable[[int], EpisodeTable],
    val: EpisodeTable,
    bank: ImageBank,
    num_classes: int,
    cfg: TrainParams,
    checkpoint: Path | None = None,
    bad_checkpoint: Path | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[dict], None] = print,
    curves: Callable[[list[dict]], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    loader_workers: int = 0,
    online: Online = Online(),
) -> State:
    """Train ``model`` in place for ``cfg.epochs`` epochs (resuming from ``checkpoint`` when it
    exists; one that does not load is moved to ``bad_checkpoint``, default ``{checkpoint}.bad``,
    and training starts over: :func:`resume`); returns the final state, whose ``best_state`` holds
    the best validation epoch.

    ``train``: the fixed pool, or ``epoch -> that epoch's episodes`` (every epoch must have as
    many); ``online``: what the training step computes itself (pseudo-masks, features);
    ``curves(history)`` after every epoch gets every epoch's record so far (resumed ones included).
    ``loader_workers`` processes read batches ahead (:func:`~pipeline.fewshot.data.prefetched`)."""
    episodes_of = train if callable(train) else lambda epoch: train
    device = torch.device(device)
    model.to(device)
    if online.backbone is not None:
        online.backbone.to(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    resolved = resolve(cfg.dtype, device)
    mixed = autocast_for(device, resolved)
    steps = (len(episodes_of(0)) + cfg.batch_size - 1) // cfg.batch_size
    opt = Optimiser.of(model, cfg, device, resolved, cfg.epochs * steps)
    state = resume(checkpoint, model, opt, device, keep_bad=rank == 0, aside=bad_checkpoint)
    state.dtype = resolved
    for epoch in range(state.epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout: a function of seed and epoch
        table = episodes_of(epoch)
        if (len(table) + cfg.batch_size - 1) // cfg.batch_size != steps:
            raise ValueError(f"epoch {epoch} has {len(table)} episodes: every epoch needs {steps} steps")
        model.train()
        start = time.perf_counter()
        loss = train_epoch(net, table, bank, cfg, opt, mixed, device, online, epoch, steps, (rank, world),
                           loader_workers, progress)
        val_miou = evaluate_table(
            model, val, bank, num_classes, circle_inference=cfg.circle, batch_size=VALIDATION_BATCH,
            device=device, autocast=mixed, loader_workers=loader_workers,
        ).miou()
        record = {
            "epoch": epoch + 1,
            "loss": round(loss, 5),
            "val_miou": round(val_miou, 3),
        }  # no wall-clock time here: the saved history (and so model.pt) must be reproducible
        state.history.append(record)
        state.epoch = epoch + 1
        if val_miou > state.best_miou:
            state.best_miou, state.best_state = val_miou, copy.deepcopy(model.state_dict())
        if checkpoint is not None and rank == 0:
            save_checkpoint(checkpoint, model, opt, state)
        if distributed:
            dist.barrier()
        log(record | {"seconds": round(time.perf_counter() - start, 2)})
        if curves is not None and rank == 0:
            curves(state.history)
    return state
