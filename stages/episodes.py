"""`episodes`: Parquet manifests of test episodes and of fixed training/validation pools.

Writes under ``data/episodes/``::

    test/fold{k}/shot{K}_seed{s}.parquet   test episodes (novel classes), per shot and seed
    train/fold{k}.parquet                  training episodes (base classes, training images): the
                                           pool, or (train.sampling: epoch) every pair once
    val/fold{k}.parquet                    validation pool (base classes, held-out images)
    meta.json                              protocol, files, episode counts

Schema and protocols: ``pipeline/datasets/episodes.py``. A rebuild gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from prefect import flow, task

from pipeline.core.artifacts import Staging, fingerprint, write_json
from pipeline.core.errors import PipelineError
from pipeline.core.orchestration import gather, run_flow
from pipeline.core.params import EpisodesParams, Params, Sampling
from pipeline.datasets import episodes
from stages._common import stage_main


def read_splits(split_dir: Path) -> tuple[pd.DataFrame, dict]:
    try:
        meta = json.loads((split_dir / "meta.json").read_text())
        return pq.read_table(split_dir / "pairs.parquet").to_pandas(), meta
    except FileNotFoundError as exc:
        raise PipelineError(f"{exc.filename}: missing (run the split stage first)") from None


def check_fold(pairs: pd.DataFrame, fold: dict, names: list[str], cfg: EpisodesParams) -> None:
    """Fail before writing anything if some class cannot fill an episode."""
    k = fold["fold"]
    for role, classes, shots in (("test", fold["novel"], cfg.shots),
                                 ("train", fold["base"], [cfg.train_shot]),
                                 ("val", fold["base"], [cfg.train_shot])):
        of_role = pairs[(pairs["fold"] == k) & (pairs["role"] == role)]
        for shot in shots:
            episodes.check_shots(of_role, classes, shot, names, f"fold {k} {role}")


@task
def fold_manifests(
    pairs: pd.DataFrame, fold: int, out: Path, cfg: EpisodesParams, sampling: Sampling
) -> dict:
    """Write every manifest of one fold; return the file -> episode count map."""
    written = {}

    def write(table, relative: str) -> None:
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")
        written[relative] = table.num_rows

    of = {role: pairs[(pairs["fold"] == fold) & (pairs["role"] == role)].reset_index(drop=True)
          for role in ("train", "val", "test")}
    for shot in cfg.shots:
        for seed in cfg.seeds:
            write(episodes.draw_test_episodes(of["test"], fold, shot, seed, cfg.test_episodes,
                                              cfg.protocol), f"test/fold{fold}/shot{shot}_seed{seed}.parquet")
    if sampling == "pool":
        train = episodes.draw_pool_episodes(of["train"], fold, cfg.train_shot, cfg.train_seed,
                                            cfg.train_episodes, "train")
    else:  # every pair, epoch 0's draw: the training stage draws the later epochs
        train = episodes.draw_epoch_episodes(of["train"], fold, cfg.train_shot, cfg.train_seed, 0)
    write(train, f"train/fold{fold}.parquet")
    write(episodes.draw_pool_episodes(of["val"], fold, cfg.train_shot, cfg.train_seed,
                                      cfg.val_episodes, "val"), f"val/fold{fold}.parquet")
    return written


@flow(name="episodes")
def build_episodes(split_dir: Path, out: Path, cfg: EpisodesParams, sampling: Sampling) -> dict:
    pairs, split_meta = read_splits(split_dir)
    for fold in split_meta["folds"]:
        check_fold(pairs, fold, split_meta["class_names"], cfg)
    staging = Staging(out, fingerprint([cfg.model_dump(), split_meta, sampling]))
    files: dict[str, int] = {}
    for written in gather([fold_manifests.submit(pairs, f["fold"], staging.path, cfg, sampling)
                           for f in split_meta["folds"]]):
        files |= written
    meta = {"protocol": cfg.protocol, "seeds": cfg.seeds, "shots": cfg.shots,
            "folds": len(split_meta["folds"]), "files": dict(sorted(files.items())),
            "schema": episodes.__doc__.split("Protocols")[0].strip()}
    if sampling != "pool":  # (absent: pool, so that existing pool runs keep their hashes)
        meta["train_sampling"] = sampling
    write_json(staging.path / "meta.json", meta)
    staging.commit()
    return meta


def run(params: Params, args: argparse.Namespace) -> None:
    meta = run_flow(build_episodes, params.orchestration, split_dir=Path(args.splits),
                    out=Path(args.out), cfg=params.episodes, sampling=params.train.sampling)
    print(f"episodes: {len(meta['files'])} manifests, {sum(meta['files'].values())} episodes "
          f"({meta['protocol']} protocol) in {args.out}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("episodes", run, {"splits": "data/splits", "out": "data/episodes"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
