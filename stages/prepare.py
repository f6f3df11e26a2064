"""`prepare`: generate the synthetic benchmark (when chosen) and index the dataset.

Writes ``data/synthetic/`` (the benchmark in VOC and COCO layouts and the generator's params;
only a note when a real dataset is chosen; the tiny CLIP's caption corpus is rendered by
``clip_model``, and only when it trains) and ``data/index/`` (``index.parquet``,
``meta.json``, and for COCO the rendered label maps). Shards resume after a crash.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, task

from pipeline.core.artifacts import Staging, fingerprint, write_json
from pipeline.core.orchestration import run_flow, run_shards
from pipeline.core.params import DatasetParams, Params, SyntheticParams
from pipeline.datasets import coco, synthetic_writer, voc
from pipeline.datasets.index import INDEX_SCHEMA, IndexRow, write_index
from pipeline.datasets.shapes import SHAPE_NAMES
from stages._common import stage_main

INDEX_SHARD = 500  # images per index shard


def _shards(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


@task
def benchmark_shard(root: Path, split: str, indices: range, cfg: SyntheticParams) -> str:
    synthetic_writer.write_benchmark_shard(root, split, indices, cfg)
    return f"{split}-{indices.start:06d}"


@flow(name="prepare-synthetic")
def generate_synthetic(out: Path, cfg: SyntheticParams) -> None:
    staging = Staging(out, fingerprint(cfg.model_dump()))
    jobs = {f"{split}-{r.start:06d}": (split, r)
            for split, n in (("train", cfg.train_images), ("val", cfg.val_images))
            for r in _shards(n, cfg.shard_size)}
    run_shards(staging, lambda name: benchmark_shard.submit(staging.path, *jobs[name], cfg), jobs,
               "synthetic shards",
               lambda name: synthetic_writer.benchmark_shard_files(staging.path, *jobs[name]))
    synthetic_writer.finalize(staging.path, cfg)
    staging.commit()


@task
def index_shard(parts: Path, name: str, make_rows: Callable[..., list[IndexRow]], skip: bool) -> str:
    skipped: list[str] | None = [] if skip else None
    write_index(make_rows(skipped=skipped), parts / f"{name}.parquet")
    if skipped:
        write_json(parts / f"{name}.skipped.json", skipped)
    return name


@flow(name="prepare-index")
def build_index(dataset: DatasetParams, root: Path, out: Path, on_bad_image: str = "fail") -> None:
    # Open (and so validate) the dataset before anything is written.
    if dataset.name == "coco":
        class_names = coco.COCO_CLASSES
        splits = [coco.open_coco(root, s, expected_names=class_names) for s in coco.SPLITS]
    else:
        layout = voc.open_voc(root / synthetic_writer.VOC_DIR if dataset.name == "synthetic" else root)
        class_names = SHAPE_NAMES if dataset.name == "synthetic" else voc.VOC_CLASSES
        lists = layout.image_lists()

    staging = Staging(out, fingerprint({"dataset": dataset.model_dump(), "root": str(root),
                                       "schema": str(INDEX_SCHEMA), "on_bad_image": on_bad_image}))
    parts = staging.path / "parts"
    parts.mkdir(exist_ok=True)
    jobs: dict[str, Callable[[], list[IndexRow]]] = {}
    if dataset.name == "coco":
        for split in splits:
            masks = Path("masks") / split.split
            for r in _shards(len(split.records), INDEX_SHARD):
                jobs[f"{split.split}-{r.start:07d}"] = partial(
                    coco.coco_rows, split.shard(r.start, r.stop), staging.path / masks,
                    out / masks, len(class_names))
    else:
        for split_name, ids in lists.items():
            for r in _shards(len(ids), INDEX_SHARD):
                jobs[f"{split_name}-{r.start:07d}"] = partial(
                    voc.voc_rows, layout, split_name, ids[r.start:r.stop], len(class_names))
    skip = on_bad_image == "skip"
    run_shards(staging, lambda name: index_shard.submit(parts, name, jobs[name], skip), jobs,
               "index shards (every image and mask decoded)",
               lambda name: [parts / f"{name}.parquet", parts / f"{name}.skipped.json"])
    order = sorted(jobs, key=lambda name: (name.split("-")[0] != "train", name))
    table = pa.concat_tables([pq.read_table(parts / f"{name}.parquet") for name in order])
    pq.write_table(table, staging.path / "index.parquet")
    skipped = [reason for name in order if (parts / f"{name}.skipped.json").is_file()
               for reason in json.loads((parts / f"{name}.skipped.json").read_text())]
    shutil.rmtree(parts)
    areas = [h * w for h, w in zip(table["height"].to_pylist(), table["width"].to_pylist(), strict=True)]
    meta = {"dataset": dataset.name, "root": str(root), "class_names": list(class_names),
            "adapter": "coco" if dataset.name == "coco" else "voc",
            "images": {s: table["split"].to_pylist().count(s) for s in ("train", "val")},
            "median_image_area": statistics.median(areas)}
    if on_bad_image == "skip":
        meta["skipped"] = skipped
    write_json(staging.path / "meta.json", meta)
    staging.commit()


def run(params: Params, args: argparse.Namespace) -> None:
    synthetic_out, index_out = Path(args.synthetic), Path(args.index)
    if params.dataset.name == "synthetic":
        run_flow(generate_synthetic, params.orchestration, out=synthetic_out,
                 cfg=params.prepare.synthetic)
        root = synthetic_out
    else:
        root = params.dataset.resolved_root
    run_flow(build_index, params.orchestration, dataset=params.dataset, root=root, out=index_out,
             on_bad_image=params.prepare.on_bad_image)
    if params.dataset.name != "synthetic":  # DVC expects the output; say why it is empty
        staging = Staging(synthetic_out, "note")
        (staging.path / "README.md").write_text(
            f"Not generated: dataset.name is {params.dataset.name!r}.\n")
        staging.commit()
    meta = json.loads((index_out / "meta.json").read_text())
    skipped = meta.get("skipped")
    skipped = f"; {len(skipped)} broken ones skipped (listed in its meta.json)" if skipped else ""
    print(f"prepare: {meta['dataset']}: {meta['images']['train']} train + "
          f"{meta['images']['val']} val images indexed in {index_out}{skipped}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("prepare", run, {"synthetic": "data/synthetic", "index": "data/index"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
