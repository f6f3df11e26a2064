"""`split`: per fold, the novel (test) and base (train) classes and their (image, class) pairs.

Writes ``data/splits/pairs.parquet`` (columns fold, role, image_id, class_id, pixels; roles
``train`` | ``val`` | ``test``, see ``pipeline/datasets/folds.py``) and ``data/splits/meta.json``
(convention, classes per fold, min_pixels, pair counts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, task

from pipeline.core.artifacts import Staging, fingerprint, write_json
from pipeline.core.orchestration import gather, run_flow
from pipeline.core.params import Params, SplitParams
from pipeline.datasets import folds
from pipeline.datasets.index import dataset_declaration, read_index_dir
from stages._common import stage_main

PAIRS_SCHEMA = pa.schema([("fold", pa.int8()), ("role", pa.string()), ("image_id", pa.string()),
                          ("class_id", pa.int16()), ("pixels", pa.int32())])


@task
def fold_task(index: pd.DataFrame, fold: int, novel: list[int], num_classes: int,
              min_pixels: int, novel_in_train: str) -> pd.DataFrame:
    return folds.fold_pairs(index, fold, novel, num_classes, min_pixels, novel_in_train)


@flow(name="split")
def split_folds(index_dir: Path, out: Path, cfg: SplitParams) -> dict:
    index, meta = read_index_dir(index_dir)
    names, dataset = meta["class_names"], meta["dataset"]
    declared = dataset_declaration(meta, index_dir)
    if cfg.custom_folds:
        convention = "custom"
        novel = folds.custom_fold_classes(cfg.custom_folds, names, dataset)
    else:
        convention = declared["fold_convention"] if cfg.fold_convention == "default" else cfg.fold_convention
        novel = folds.fold_classes(len(names), cfg.num_folds, convention)
    min_pixels = folds.resolve_min_pixels(cfg.min_pixels, declared["relative_min_pixels"],
                                          meta["median_image_area"])

    staging = Staging(out, fingerprint([cfg.model_dump(), meta]))
    per_fold = gather([fold_task.submit(index, k, classes, len(names), min_pixels,
                                        cfg.novel_in_train) for k, classes in enumerate(novel)])
    pairs = pd.concat(per_fold, ignore_index=True)
    pq.write_table(pa.Table.from_pandas(pairs, schema=PAIRS_SCHEMA, preserve_index=False),
                   staging.path / "pairs.parquet")
    counts = pairs.groupby(["fold", "role"]).size()
    summary = {
        "dataset": dataset, "convention": convention, "min_pixels": min_pixels,
        "novel_in_train": cfg.novel_in_train, "class_names": names,
        "folds": [{"fold": k, "novel": classes,
                   "base": [c for c in range(1, len(names) + 1) if c not in classes],
                   "novel_names": [names[c - 1] for c in classes],
                   "pairs": {role: int(counts.get((k, role), 0)) for role in ("train", "val", "test")}}
                  for k, classes in enumerate(novel)],
    }
    write_json(staging.path / "meta.json", summary)
    staging.commit()
    return summary


def run(params: Params, args: argparse.Namespace) -> None:
    summary = run_flow(split_folds, params.orchestration, index_dir=Path(args.index),
                       out=Path(args.out), cfg=params.split)
    for fold in summary["folds"]:
        print(f"split: fold {fold['fold']} novel {fold['novel_names']}: pairs {fold['pairs']}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("split", run, {"index": "data/index", "out": "data/splits"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
