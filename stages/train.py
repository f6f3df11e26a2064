"""`train@fold`: train the LFSS model on one fold's base classes.

Reads ``data/index``, ``data/episodes`` (the fold's training episodes (the pool, or under
``train.sampling: epoch`` every training pair, redrawn every epoch) and validation episodes),
``data/models/clip`` (the backbone, under ``train.features: online``),
``data/features.zarr``, ``data/priors.zarr`` and ``data/pseudo_masks.zarr``; writes
``data/models/fold{k}/model.pt`` (the best validation epoch's weights, the model params and the
training history) and ``data/plots/train/fold{k}/`` (loss and validation mIoU per epoch through
DVCLive, written as each epoch ends: ``dvc plots show`` or VS Code's DVC view while it trains). A
checkpoint is written every epoch in the staging directory: a re-run after a crash resumes from it.
One that does not load (truncated, crafted) is named in one line, moved beside the output as
``data/models/.fold{k}.checkpoint.pt.bad`` and the fold trains from scratch.

One fold is one process, or one ``torchrun`` group (DistributedDataParallel):
``torchrun --nproc-per-node=2 -m stages.train --fold 0``. DVC's ``train@fold`` matrix is the
parallel unit across folds, so this stage is not a Prefect flow.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.core.artifacts import Staging, fingerprint
from pipeline.core.cores import threads_per_task
from pipeline.core.errors import PipelineError
from pipeline.core.params import Params
from pipeline.datasets.episodes import draw_epoch_episodes, query_pairs, read_manifests
from pipeline.datasets.index import read_index_dir
from pipeline.features.backbone import load_backbone
from pipeline.fewshot.checkpoint import MODEL_FILE, save_model
from pipeline.fewshot.data import EpisodeTable, FoldInputs, ImageBank, loader_workers, open_fold_inputs
from pipeline.fewshot.online import ImageSource
from pipeline.fewshot.train import Online, fit
from pipeline.model.lfss import LFSS
from pipeline.pseudomasks.online import OnlineRefiner
from stages._common import FOLD_INPUTS, stage_main


def setup_device() -> tuple[torch.device, int]:
    """``(device, rank)``; joins the process group when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        return torch.device(f"cuda:{local}" if cuda else "cpu"), dist.get_rank()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), 0


def training_episodes(
    inputs: FoldInputs, name: str, manifest: pd.DataFrame, params: Params
) -> EpisodeTable | Callable[[int], EpisodeTable]:
    """The fold's training episodes: the stored pool (``train.sampling: pool``), or each epoch's
    fresh draw over every training pair of the manifest (``epoch``). Their pseudo-masks are made
    in the training step (:func:`online_parts`) for fresh episodes or online features."""
    cfg = params.train
    online = cfg.sampling == "epoch" or cfg.features == "online"
    if cfg.sampling == "pool":
        return inputs.episodes(name, manifest, params.model, online_masks=online,
                               vtp_threshold=params.pseudo_masks.vtp_threshold)
    first = manifest.iloc[0]
    pairs = query_pairs(manifest)

    def of_epoch(epoch: int) -> EpisodeTable:
        table = draw_epoch_episodes(pairs, int(first["fold"]), int(first["shot"]), int(first["seed"]), epoch,
                                    cfg.episodes_per_epoch).to_pandas()
        return inputs.episodes(f"{name}/epoch{epoch}", table, params.model, online_masks=True,
                               vtp_threshold=params.pseudo_masks.vtp_threshold)

    return of_epoch


def online_parts(params: Params, index: pd.DataFrame, bank: ImageBank, clip_dir: Path,
                 device: torch.device) -> Online:
    """What the training step computes itself: the pseudo-masks of fresh episodes or of online
    features, and (``train.features: online``) the features, from the bank's images."""
    cfg = params.train
    if cfg.sampling == "pool" and cfg.features == "precomputed":
        return Online()
    refiner = OnlineRefiner.from_params(params)
    if cfg.features == "precomputed":
        return Online(refiner)
    backbone = load_backbone(params.backbone, clip_dir, device)
    return Online(refiner, backbone, ImageSource.of_bank(bank, index, params.backbone.image_size, backbone))


def run(params: Params, args: argparse.Namespace) -> None:
    fold = args.fold
    device, rank = setup_device()
    if device.type == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(threads_per_task(int(os.environ["WORLD_SIZE"])))
    index, meta = read_index_dir(Path(args.index))
    manifests = read_manifests(Path(args.episodes))
    names = (f"train/fold{fold}", f"val/fold{fold}")
    missing = [n for n in names if n not in manifests]
    if missing:
        raise PipelineError(
            f"{args.episodes}: no {missing[0]} manifest (fold {fold} of {params.split.num_folds}?)"
        )
    inputs = open_fold_inputs(index, manifests, names, Path(args.features), Path(args.priors),
                              Path(args.pseudo_masks), cache_bytes=params.orchestration.cache_bytes)
    val = inputs.episodes(names[1], manifests[names[1]], params.model)
    train = training_episodes(inputs, names[0], manifests[names[0]], params)
    bank = inputs.bank
    online = online_parts(params, index, bank, Path(args.clip), device)
    out = Path(args.models) / f"fold{fold}"
    staging = Staging(
        out,
        fingerprint(
            [
                params.model.model_dump(),
                params.train.model_dump(),
                inputs.features.attrs,
                inputs.priors.attrs["clip_sha256"],
                inputs.pseudo.attrs,
                (Path(args.episodes) / "meta.json").read_text(),
            ]
        ),
    )
    torch.manual_seed(params.train.seed)
    model = LFSS(bank.features.shape[1], params.model)
    with tqdm(
        desc=f"train fold {fold}", unit="step", file=sys.stderr, disable=rank != 0, mininterval=1
    ) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        state = fit(
            model,
            train,
            val,
            bank,
            len(meta["class_names"]),
            params.train,
            checkpoint=staging.path / "checkpoint.pt",
            # one that does not load goes beside the output, never into it
            bad_checkpoint=out.with_name(f".{out.name}.checkpoint.pt.bad"),
            device=device,
            log=lambda r: bar.write(
                f"fold {fold} epoch {r['epoch']}: loss {r['loss']:.4f}, "
                f"val mIoU {r['val_miou']:.2f} ({r['seconds']:.0f} s)"
            ),
            progress=progress,
            curves=lambda history: write_curves(Path(args.plots) / f"fold{fold}", history),
            loader_workers=loader_workers(bank, params.orchestration.loader_workers,
                                          images=online.source is not None, device=device),
            online=online,
        )
    if rank != 0:
        return
    best = save_model(staging.path / MODEL_FILE, state, params.model, bank.features.shape[1],
                      params.train.circle, fold)
    (staging.path / "checkpoint.pt").unlink()
    staging.commit()
    print(f"train: fold {fold}: best val mIoU {best['best_val_miou']:.2f} at epoch {best['best_epoch']} "
          f"-> {out}")


def write_curves(folder: Path, history: list[dict]) -> None:
    """The training curves through DVCLive: ``folder/plots/metrics/{loss,val_miou}.tsv`` (step =
    epoch) and ``folder/metrics.json`` (a DVC metrics file: the last epoch's validation mIoU and
    step, so ``dvc exp show`` follows a training run). Rewritten from the whole history after
    every epoch, so a resumed run writes the same files as an uninterrupted one."""
    from dvclive import Live

    with Live(dir=str(folder), resume=False, report=None, save_dvc_exp=False, dvcyaml=None,
              monitor_system=False) as live:
        for record in history:
            live.step = record["epoch"]
            for key in CURVES:
                live.log_metric(key, record[key])
            live.summary.pop("loss")  # a plot only: DVC's metric columns stay few
            live.next_step()


CURVES = ("loss", "val_miou")


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "train",
        run,
        {**FOLD_INPUTS, "clip": "data/models/clip", "plots": "data/plots/train"},
        argv,
        options=lambda p: p.add_argument("--fold", type=int, required=True, help="the fold to train"),
    )


if __name__ == "__main__":
    raise SystemExit(main())
