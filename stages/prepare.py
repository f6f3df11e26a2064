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
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, task

from pipeline.core.artifacts import Staging, fingerprint, write_json
from pipeline.core.orchestration import run_flow, run_shards
from pipeline.core.params import DatasetParams, Params, SyntheticParams
from pipeline.datasets import synthetic_writer
from pipeline.datasets.adapters import open_dataset
from pipeline.datasets.index import INDEX_SCHEMA, IndexRow, shard_ranges, write_index
from pipeline.datasets.registry import check_dataset
from stages._common import stage_main

INDEX_SHARD = 500  # images per index shard


@task
def benchmark_shard(root: Path, split: str, indices: range, cfg: SyntheticParams) -> str:
    synthetic_writer.write_benchmark_shard(root, split, indices, cfg)
    return f"{split}-{indices.start:06d}"


@flow(name="prepare-synthetic")
def generate_synthetic(out: Path, cfg: SyntheticParams) -> None:
    staging = Staging(out, fingerprint(cfg.model_dump()))
    jobs = {f"{split}-{r.start:06d}": (split, r)
            for split, n in (("train", cfg.train_images), ("val", cfg.val_images))
            for r in shard_ranges(n, cfg.shard_size)}
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
    spec = check_dataset(dataset)
    indexer = open_dataset(spec, root, dataset)  # the layout checked before anything is written
    staging = Staging(out, fingerprint({"dataset": dataset.model_dump(), "root": str(root),
                                       "schema": str(INDEX_SCHEMA), "on_bad_image": on_bad_image}))
    parts = staging.path / "parts"
    parts.mkdir(exist_ok=True)
    jobs = indexer.jobs(staging.path, out, INDEX_SHARD)
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
    meta = {"dataset": dataset.name, "root": str(root), "class_names": list(spec.class_names),
            "prompt_names": list(spec.prompt_names), "fold_convention": spec.fold_convention,
            "relative_min_pixels": spec.relative_min_pixels, "adapter": spec.adapter,
            "images": {s: table["split"].to_pylist().count(s) for s in ("train", "val")},
            "median_image_area": statistics.median(areas)}
    if on_bad_image == "skip":
        meta["skipped"] = skipped
    write_json(staging.path / "meta.json", meta)
    staging.commit()


def run(params: Params, args: argparse.Namespace) -> None:
    synthetic_out, index_out = Path(args.synthetic), Path(args.index)
    generated = check_dataset(params.dataset).generated
    if generated:
        run_flow(generate_synthetic, params.orchestration, out=synthetic_out,
                 cfg=params.prepare.synthetic)
        root = synthetic_out
    else:
        root = params.dataset.resolved_root
    run_flow(build_index, params.orchestration, dataset=params.dataset, root=root, out=index_out,
             on_bad_image=params.prepare.on_bad_image)
    if not generated:  # DVC expects the output; say why it is empty
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
