"""Priors extraction, measured as ratios in one run (never timed assertions in tests).

(a) ``speedup``: the pipeline's path (the stage's one forward per unique image, batched; then
    VVP per episode from the stored token features, as the model computes it) against a naive
    loop that recomputes CLIP for every episode, on the same 1000-episode fold; both outputs are
    checked equal.
(b) ``per_image_vs_encode_image``: extraction time per image (every prior of every pair it has)
    divided by one plain ``encode_image`` forward per image, same model, resolution and batch.
(c) ``peak_memory_*``: peak resident memory of the stage's path on 1x and 10x the episodes, each
    in a fresh process.

Run after ``make repro`` (reads data/index, data/episodes and data/models/clip):
``.venv/bin/python benchmarks/priors.py``. Options: ``--episodes``, ``--manifest``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import zarr
from _timing import best_of  # benchmarks/_timing.py (run as a script: its folder is on the path)
from PIL import Image

from pipeline.core.params import PriorsParams
from pipeline.core.tensors import mask_to_grid
from pipeline.datasets.episodes import image_classes
from pipeline.priors import store
from pipeline.priors.shards import extract_image_shard, load_extractor
from pipeline.priors.vvp import vvp

DATA = Path("data")


def load(manifest: str, episodes: int):
    index = pq.read_table(DATA / "index/index.parquet").to_pandas().set_index("image_id")
    table = pq.read_table(DATA / f"episodes/{manifest}.parquet").to_pandas()
    table = pd.concat([table] * -(-episodes // len(table)), ignore_index=True).iloc[:episodes]
    table["episode"] = np.arange(len(table), dtype=np.int32)
    names = tuple(json.loads((DATA / "index/meta.json").read_text())["class_names"])
    ex = load_extractor(DATA / "models/clip", PriorsParams(), names)
    return index, table, ex


def mask_of(index: pd.DataFrame):
    def support_mask(image_id: str, class_id: int) -> np.ndarray:
        return np.asarray(Image.open(index.at[image_id, "mask_path"])) == class_id
    return support_mask


def episode_vvp(tokens: list[torch.Tensor], rows: dict[str, int], row, masks: torch.Tensor,
                grid: tuple[int, int]) -> np.ndarray:
    """``(K, 2, h, w)`` VVP of one episode from stored ``(I, N, D)`` tokens of two blocks."""
    q, s = rows[row.query], [rows[i] for i in row.supports]
    return torch.stack([vvp(t[q][None], t[s][None], masks, grid)[0] for t in tokens], 1).numpy()


def stage_path(index, table, ex) -> tuple[zarr.Group, list[np.ndarray]]:
    """The stage's image shards on an in-memory store, then every episode's VVP from the stored
    tokens (as the model computes it)."""
    pairs = image_classes([table])
    ids = list(pairs)
    probe = ex.priors(ex.load_images([index.at[ids[0], "image_path"]]), [pairs[ids[0]]], [[]])
    h, w = probe.vtp.shape[-2:]
    layout = store.Layout(len(ids), max(map(len, pairs.values())), len(ex.class_text), (h, w),
                          tuple(t.shape[-1] for t in probe.tokens), 256)
    root = store.create(zarr.storage.MemoryStore(), layout, {"image_ids": ids})
    for start in range(0, len(ids), 256):
        rows = range(start, min(start + 256, len(ids)))
        part = ids[rows.start: rows.stop]
        extract_image_shard(root, rows, [index.at[i, "image_path"] for i in part],
                            [pairs[i] for i in part], [list(index.at[i, "class_ids"]) for i in part], ex)
    tokens = [torch.from_numpy(root[f"images/tokens_{b}"][:].astype(np.float32)) for b in (0, 1)]
    rows, support_mask, grids = {image: i for i, image in enumerate(ids)}, mask_of(index), {}
    maps = []
    for row in table.itertuples():
        for s in row.supports:
            if (s, row.class_id) not in grids:
                mask = torch.from_numpy(support_mask(s, int(row.class_id)).astype(np.float32))
                grids[s, row.class_id] = mask_to_grid(mask, (h, w)).flatten()
        masks = torch.stack([grids[s, row.class_id] for s in row.supports])[None]
        maps.append(episode_vvp(tokens, rows, row, masks, (h, w)))
    return root, maps


def naive_path(index, table, ex) -> list[dict[str, np.ndarray]]:
    """Per episode: forward the query and its supports again, every time."""
    support_mask, out = mask_of(index), []
    for row in table.itertuples():
        c = int(row.class_id)
        ids = [row.query, *row.supports]
        got = ex.priors(ex.load_images([index.at[i, "image_path"] for i in ids]), [[c]] * len(ids),
                        [list(index.at[i, "class_ids"]) for i in ids])
        masks = torch.stack([mask_to_grid(torch.from_numpy(support_mask(s, c).astype(np.float32)),
                                          got.vtp.shape[-2:]).flatten() for s in row.supports])[None]
        grid = tuple(got.vtp.shape[-2:])
        maps = [vvp(t[:1].float(), t[1:][None].float(), masks, grid)[0] for t in got.tokens]
        out.append({"vtp": got.vtp[0].numpy(), "pir": got.pir[0].numpy(),
                    "vvp": torch.stack(maps, 1).numpy()})
    return out


def check_equal(root: zarr.Group, vvps: list[np.ndarray], naive: list[dict[str, np.ndarray]],
                table: pd.DataFrame) -> float:
    """Largest absolute difference between the two paths (float16 storage included)."""
    ids = {image: i for i, image in enumerate(root.attrs["image_ids"])}
    classes = root["pairs/class_id"][:]
    worst = 0.0
    for row, vvp_maps, expected in zip(table.itertuples(), vvps, naive, strict=True):
        r = ids[row.query]
        slot = int(np.flatnonzero(classes[r] == row.class_id)[0])
        got = {"vtp": root["pairs/vtp"][r, slot], "pir": root["pairs/pir"][r, slot], "vvp": vvp_maps}
        for key, value in got.items():
            worst = max(worst, float(np.abs(value.astype(np.float32) - expected[key]).max()))
    return worst


def per_image_ratio(index, table, ex) -> tuple[float, float, float]:
    pairs = image_classes([table])
    ids = list(pairs)
    images = ex.load_images([index.at[i, "image_path"] for i in ids])
    labels = [list(index.at[i, "class_ids"]) for i in ids]
    model, b = ex.bundle.model, ex.batch_size

    def extraction() -> None:
        for s in range(0, len(ids), b):
            ex.priors(images[s: s + b], [pairs[i] for i in ids[s: s + b]], labels[s: s + b])

    def encode() -> None:
        with torch.no_grad():
            for s in range(0, len(ids), b):
                model.encode_image(images[s: s + b])

    ours, plain = best_of(extraction) / len(ids), best_of(encode) / len(ids)
    return ours / plain, ours, plain


def peak_memory(manifest: str, episodes: int) -> int:
    """Peak RSS (KiB) of the stage's path in a fresh process."""
    code = (f"import benchmarks.priors as b, resource; i, t, ex = b.load({manifest!r}, {episodes}); "
            "b.stage_path(i, t, ex); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", default="test/fold0/shot1_seed0")
    parser.add_argument("--episodes", type=int, default=1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    index, table, ex = load(args.manifest, args.episodes)
    print(f"model: {ex.bundle.sha256[:12]}, input {ex.image_size} px, {len(table)} episodes of "
          f"{args.manifest}, {len(image_classes([table]))} unique images", flush=True)
    start = time.perf_counter()
    root, vvps = stage_path(index, table, ex)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    naive = naive_path(index, table, ex)
    plain = time.perf_counter() - start
    print(f"stage_seconds: {ours:.2f}")
    print(f"naive_seconds: {plain:.2f}")
    print(f"max_abs_difference: {check_equal(root, vvps, naive, table):.2e}")
    print(f"speedup: {plain / ours:.1f}")
    ratio, per_image, per_encode = per_image_ratio(index, table, ex)
    print(f"per_image_ms: {1e3 * per_image:.3f}")
    print(f"encode_image_per_image_ms: {1e3 * per_encode:.3f}")
    print(f"per_image_vs_encode_image: {ratio:.2f}")
    low, high = peak_memory(args.manifest, args.episodes), peak_memory(args.manifest, 10 * args.episodes)
    print(f"peak_memory_1x_mib: {low / 1024:.0f}")
    print(f"peak_memory_10x_mib: {high / 1024:.0f}")
    print(f"peak_memory_ratio_10x: {high / low:.3f}")


if __name__ == "__main__":
    main()
