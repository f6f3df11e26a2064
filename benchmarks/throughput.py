"""How fast the host feeds every stage in the papers' regimes, per core (docs/operations.md).

On the real-shaped benchmark (the synthetic generator at 432 px with mixed sizes, as
``benchmarks/scale.py`` builds it: PASCAL-5i's 20 classes, CLIP ViT-B/16 priors at 473 px on a
29 x 29 grid, ResNet-50 features 1536 x 50 x 50 at 400 px) each stage's *feed* runs in this
process on one thread: the very functions the stage calls, with the model work removed — the
CLIP and the backbone replaced by stand-ins that return tensors of the right shapes, the
refiner's two device kernels likewise — so what is timed is what the host must do for the
device to have work: decoding, resizing, normalising, store reads and writes, collation,
augmentation, label maps. Stores are filled with random values of the real shapes (what the
priors and features feeds write is what the later feeds read) from uncached readers
(``cache_gb: 0``, the path a dataset larger than the cache takes).

Each feed runs twice in one run: ``plain`` — the data path as it was before it was tuned for a
GPU (kept here as the reference: images normalised on the host, label maps and augmentation warps
on the host, zstd-compressed feature and token rows read and written through zarr) — and
``pipeline`` — the library's path today; both on one core, so their ratio is the per-core gain.
The last lines set the host's rate with C cores against the device's (measured here without
``--host-only``, else the rates last measured on an H200: docs/operations.md "Feeding a GPU")
and project the hours of a reproduction, marked as projected.

    .venv/bin/python benchmarks/throughput.py --host-only          # ~4 min on 2 cores
    .venv/bin/python benchmarks/throughput.py --host-only --keep /tmp/tp   # reuse the benchmark

Without ``--host-only`` each stage's model work is also timed alone, on inputs already on the
device (benchmarks/_device_work.py: random-weight models of the real shapes at the LFSS preset's
batch sizes; CUDA events on a GPU, wall time on a CPU), which needs the CLIP folder the
benchmark then builds too:

    python3 benchmarks/throughput.py --device cuda --keep /tmp/tp                 # on a GPU
    .venv/bin/python benchmarks/throughput.py --device cpu --device-batch 2 --device-repeats 1

With no GPU, ``--project h200`` runs each model's work once on the CPU and projects its time on
that GPU op by op (benchmarks/_roofline.py), at ``--efficiency`` of its peaks and a third of that
(~15 min on 2 cores):

    .venv/bin/python benchmarks/throughput.py --project h200 --keep /tmp/tp

Rates per core are items per CPU second of this process (its one thread), steady on a shared
machine; wall rates, which add the waits for the disk and for other jobs, are printed beside.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import _device_work  # noqa: E402  benchmarks/_device_work.py: each stage's model work alone
import scale  # noqa: E402  benchmarks/scale.py: the real-shaped benchmark's params and stage runner
from _roofline import GPUS  # noqa: E402

from pipeline.clip.dense import labels_from_scores  # noqa: E402
from pipeline.pseudomasks import shards  # noqa: E402
from pipeline.pseudomasks.refine import initial_masks  # noqa: E402

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRIOR_SIDE, GRID, TOKEN_DIM = 473, (29, 29), 768  # ViT-B/16 at 473 px
FEATURE_SIDE, FEATURE_SHAPE = 400, (1536, 50, 50)  # dilated ResNet-50 layer2 + layer3 at 400 px
# Items each stage has in a reproduction (docs/design.md#scale): images with priors and features,
# pseudo-mask episodes (4 folds x (2 x 1000 test + 4000 train pool + 300 val)), training episodes
# (LFSS: 200 epochs x ~4.5k base-class pairs a fold, 4 folds; PI-CLIP: 200 epochs x ~4.5k) and
# evaluation episodes (4 folds x 1000 x (1 + 5 shots)).
WORKLOAD = {
    "PASCAL-5i": {"priors": 11_000, "features": 11_000, "pseudo_masks": 4 * (2000 + 4300),
                  "train_lfss": 4 * 200 * 4_500, "train_piclip": 4 * 200 * 4_500,
                  "evaluate": 4 * (1000 + 5 * 1000)},
    "COCO-20i": {"priors": 60_000, "features": 60_000, "pseudo_masks": 4 * (2000 + 4300),
                 "train_lfss": 4 * 50 * 20_000, "train_piclip": 4 * 50 * 20_000,
                 "evaluate": 4 * (1000 + 5 * 1000)},
}
# Seconds per item last measured on a GPU (an H200 with 16 cores, docs/operations.md "Resources at
# scale": a stage's wall time per added image or episode, its host work included, so an upper
# bound of the device's); None: not yet measured. A run without --host-only measures them.
DEVICE_S = {"priors": 0.039, "features": 0.048, "pseudo_masks": 0.065, "train_lfss": None,
            "train_piclip": None, "evaluate": None}


# --- the real-shaped benchmark ------------------------------------------------------------------------

def build_benchmark(root: Path, n: int, with_models: bool) -> Path:
    """prepare, split and episodes of scale.py's real-shaped run with ``n`` train and val images,
    and with the models (random weights) also its CLIP folder (kept in ``root``, reused)."""
    run = root / f"n{n}"
    vit, resnet = scale.save_random_models(root / "models") if with_models else (Path("-"), Path("-"))
    stages = ("prepare", "split", "episodes", *(("clip_model",) if with_models else ()))
    done = {"prepare": "index/meta.json", "split": "splits", "episodes": "episodes/meta.json",
            "clip_model": "clip"}
    run.mkdir(parents=True, exist_ok=True)
    (run / "params.yaml").write_text(yaml.safe_dump(scale.params(n, vit, resnet, 0.0)))
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "ERROR", "CUDA_VISIBLE_DEVICES": ""}
    for stage in stages:
        if not (run / done[stage]).exists():
            seconds, _ = scale.run_stage(stage, run, env)
            print(f"  {stage}: {seconds:.0f} s", flush=True)
    return run


@dataclass
class Run:
    """The benchmark's index, manifests and where the stores go."""

    root: Path
    index: object  # pandas DataFrame
    manifests: dict
    class_names: list[str]

    @classmethod
    def open(cls, root: Path) -> Run:
        from pipeline.datasets.episodes import read_manifests
        from pipeline.datasets.index import read_index_dir

        index, meta = read_index_dir(root / "index")
        return cls(root, index, read_manifests(root / "episodes"), list(meta["class_names"]))

    @property
    def paths(self) -> dict[str, str]:
        return dict(zip(self.index.image_id, self.index.image_path, strict=True))

    def store(self, name: str, variant: str) -> Path:
        return self.root / "stores" / variant / name

    def new_store(self, name: str, variant: str) -> Path:
        """The path of a store to write afresh (a previous one removed)."""
        path = self.store(name, variant)
        shutil.rmtree(path, ignore_errors=True)
        return path


def random_like(shape: tuple[int, ...], dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- stand-ins for the model work ---------------------------------------------------------------------

class PriorsStandIn:
    """The priors extractor with the CLIP removed: real image loading, outputs of ViT-B/16's shapes."""

    def __init__(self, num_classes: int, batch_size: int, pixels: Callable) -> None:
        from pipeline.priors.extract import ImagePriors

        b, p = batch_size, 4 * batch_size
        self.batch_size, self.pixels = batch_size, pixels
        self.out = ImagePriors(random_like((p, *GRID)), random_like((p, *GRID)),
                               random_like((b, num_classes, *GRID)),
                               torch.randint(1, num_classes + 1, (b, *GRID), dtype=torch.uint8),
                               (random_like((b, GRID[0] * GRID[1], TOKEN_DIM)),) * 2)
        self.device = torch.device("cpu")

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels  # on the device (or, in the plain path, already done by the host)

    def priors(self, images, pair_classes, image_labels):
        b, p = len(images), sum(map(len, pair_classes))
        o = self.out
        return replace(o, vtp=o.vtp[:p], pir=o.pir[:p], maskclip_scores=o.maskclip_scores[:b],
                       maskclip_labels=o.maskclip_labels[:b], tokens=tuple(t[:b] for t in o.tokens))


class BackboneStandIn(torch.nn.Module):
    """The frozen backbone removed: ResNet-50's output shape for any batch."""

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.out = random_like((batch_size, *FEATURE_SHAPE), torch.float16)  # rounded on the device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out[: len(images)]


@contextlib.contextmanager
def patched(module, **stand_ins) -> Iterator[None]:
    """``module``'s attributes replaced by ``stand_ins`` for the block."""
    saved = {name: getattr(module, name) for name in stand_ins}
    for name, value in stand_ins.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


# --- the plain data paths before the GPU tuning (references) ----------------------------------------

def plain_load_normalized(paths, size, mean, std, device="cpu") -> torch.Tensor:
    """The loader as it was: one image after another, normalised in float32 on the host."""
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in paths]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    images = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return images.to(device)


def host_part_of_loading(variant: str) -> Callable:
    """What the host does to load images for a model on a GPU: ``plain`` — decode, resize and
    normalise; ``pipeline`` — decode and resize (:func:`pipeline.core.images.load_resized`; the
    uint8 pixels are normalised on the device)."""
    from pipeline.core.images import load_resized

    if variant == "plain":
        return plain_load_normalized
    return lambda paths, size, mean, std, device="cpu": load_resized(paths, size)


def plain_priors_shard(root, rows: range, paths, pair_classes, image_labels, ex) -> None:
    """The priors writer as it was: float32 copies cast by numpy, one pair after another, every
    array written through zarr."""
    n = len(rows)
    out = {name: np.zeros((n, *root[name].shape[1:]), root[name].dtype) for name in PRIOR_ARRAYS}
    for start in range(0, n, ex.batch_size):
        part = slice(start, min(start + ex.batch_size, n))
        got = ex.priors(ex.normalize(ex.pixels(paths[part])), pair_classes[part], image_labels[part])
        out["images/maskclip_scores"][part] = got.maskclip_scores.cpu().numpy()
        out["images/maskclip_labels"][part] = got.maskclip_labels.cpu().numpy()
        out["images/tokens_0"][part] = got.tokens[0].float().cpu().numpy()
        out["images/tokens_1"][part] = got.tokens[1].float().cpu().numpy()
        p = 0
        for i, classes in enumerate(pair_classes[part], start=start):
            for slot, c in enumerate(classes):
                out["pairs/class_id"][i, slot] = c
                out["pairs/vtp"][i, slot] = got.vtp[p].cpu().numpy()
                out["pairs/pir"][i, slot] = got.pir[p].cpu().numpy()
                p += 1
    for name, values in out.items():
        root[name][rows.start: rows.stop] = values


def plain_features_shard(root, rows: range, paths, backbone, size: int, batch_size: int) -> None:
    """The features writer as it was: each batch's features kept, concatenated, written by zarr."""
    from pipeline.features import extract

    out = []
    for start in range(0, len(paths), batch_size):
        pixels = extract.load_resized(paths[start: start + batch_size], size)
        out.append(backbone(extract.normalize(pixels, backbone.mean, backbone.std, "cpu")).to(torch.float16))
    root["features"][rows.start: rows.stop] = torch.cat(out).numpy()


PRIOR_ARRAYS = ("images/maskclip_scores", "images/maskclip_labels", "images/tokens_0", "images/tokens_1",
                "pairs/class_id", "pairs/vtp", "pairs/pir")


# --- the feeds ----------------------------------------------------------------------------------------

@dataclass
class Feed:
    """One stage's host work over ``items`` units (images or episodes): its CPU seconds (what a
    core spends: the rate per core, steady on a shared machine) and its wall seconds (with the
    waits for the disk and for other processes)."""

    stage: str
    unit: str
    items: int
    seconds: tuple[float, float]  # (cpu, wall)

    @property
    def cpu(self) -> float:
        return self.seconds[0]

    @property
    def wall(self) -> float:
        return self.seconds[1]


def timed(fn: Callable[[], int]) -> tuple[int, tuple[float, float]]:
    """``fn()``'s items and its ``(cpu, wall)`` seconds (this process's CPU time: one thread)."""
    cpu, wall = time.process_time(), time.perf_counter()
    items = fn()
    return items, (time.process_time() - cpu, time.perf_counter() - wall)


def every_shard_some_timed(write: Callable[[int], int], count: int, shard: int,
                           items: int) -> tuple[int, tuple[float, float]]:
    """Write every shard of ``count`` rows (the later feeds read them): the first as a warm-up,
    the next ones up to ``items`` rows timed; returns ``(rows timed, seconds)``."""
    starts = range(0, count, shard)
    write(starts[0])
    timed_starts = starts[1: 1 + -(-items // shard)]
    done, seconds = timed(lambda: sum(write(s) for s in timed_starts))
    for start in starts[1 + len(timed_starts):]:
        write(start)
    return done, seconds


def feed_priors(run: Run, variant: str, images: int, batch_size: int = 32) -> Feed:
    """Images decoded to the CLIP input and their priors written to a priors.zarr of the real
    layout (every image the episodes use; ``images`` of them timed)."""
    from pipeline.datasets.episodes import image_classes
    from pipeline.priors import store
    from pipeline.priors.shards import extract_image_shard

    pairs = image_classes(run.manifests.values())
    ids = list(pairs)
    out = run.new_store("priors.zarr", variant)
    layout = store.Layout(len(ids), max(map(len, pairs.values())), len(run.class_names), GRID,
                          (TOKEN_DIM, TOKEN_DIM), batch_size)
    root = store.create(out, layout, {"image_ids": ids, "class_names": run.class_names, "dtype": "fp32"})
    load = host_part_of_loading(variant)
    stand_in = PriorsStandIn(len(run.class_names), batch_size,
                             lambda paths: load(paths, PRIOR_SIDE, CLIP_MEAN, CLIP_STD))
    labels = dict(zip(run.index.image_id, run.index.class_ids, strict=True))
    paths, write = run.paths, plain_priors_shard if variant == "plain" else extract_image_shard

    def shard(start: int) -> int:
        rows = range(start, min(start + batch_size, len(ids)))
        part = ids[rows.start: rows.stop]
        write(root, rows, [paths[i] for i in part], [pairs[i] for i in part], [list(labels[i]) for i in part],
              stand_in)
        return len(rows)

    done, seconds = every_shard_some_timed(shard, len(ids), batch_size, images)
    return Feed("priors", "images", done, seconds)


def feed_features(run: Run, variant: str, images: int, batch_size: int = 32) -> Feed:
    """Images decoded to the backbone input and their features written to a features.zarr."""
    from pipeline.features import extract, store
    from pipeline.priors.store import PriorStore

    ids = PriorStore(run.store("priors.zarr", variant)).attrs["image_ids"]
    root = zarr.open_group(run.new_store("features.zarr", variant), mode="a")
    shard = store.create(root, len(ids), FEATURE_SHAPE[0], FEATURE_SHAPE[1:], {"image_ids": ids})
    backbone, paths = BackboneStandIn(batch_size), run.paths
    load = host_part_of_loading(variant)
    write = plain_features_shard if variant == "plain" else extract.extract_shard

    def rows(start: int) -> int:
        part = range(start, min(start + shard, len(ids)))
        write(root, part, [paths[i] for i in ids[part.start: part.stop]], backbone, FEATURE_SIDE, batch_size)
        return len(part)

    host = {"load_resized": lambda paths, size: load(paths, size, IMAGENET_MEAN, IMAGENET_STD),
            "normalize": lambda pixels, *_: pixels}  # the device's work, or the plain host's already
    with patched(extract, **host):
        done, seconds = every_shard_some_timed(rows, len(ids), shard, images)
    return Feed("features", "images", done, seconds)


def feed_pseudo_masks(run: Run, variant: str, batch_size: int = 16) -> Feed:
    """Fold 0's test manifest with the most shots: label maps, initial masks and
    features of every pair, then batches of episodes read and written (the refiner's device
    kernels removed; the label maps too where they run on the device)."""
    from pipeline.features.store import FeatureStore
    from pipeline.priors.store import PriorStore
    from pipeline.pseudomasks import store

    name = _test(run)
    table = run.manifests[name]
    root = zarr.open_group(run.new_store("pseudo_masks.zarr", variant), mode="a")
    store.create(root, {name: table}, FEATURE_SIDE, len(table))
    refiner = shards.Refiner(FeatureStore(run.store("features.zarr", variant)),
                             PriorStore(run.store("priors.zarr", variant)), FEATURE_SIDE, 0.5, 0.1, None,
                             batch_size, "cpu")

    def refine(s_feats, s_init, q_feats, q_init, **_):
        return s_init.clone(), q_init.clone()

    def background(feats, grids, temperature):
        return torch.zeros(len(feats), *feats.shape[-2:])

    def labels(scores, size):  # on the device now; on the host in the plain path
        return torch.zeros((len(scores), *size), dtype=torch.long)

    stand_ins = {"refine_masks": refine, "background_similarity": background}
    if variant == "plain":
        refiner = PlainRefiner(**vars(refiner))
    else:
        refiner = HostOnlyRefiner(**vars(refiner))
        stand_ins["labels_from_scores"] = labels
    with patched(shards, **stand_ins):
        _, seconds = timed(lambda: shards.refine_shard(root, name, table, refiner))
    return Feed("pseudo_masks", "episodes", len(table), seconds)


class HostOnlyRefiner(shards.Refiner):
    """The refiner as the host sees it with a GPU: what moves to the device is widened there."""

    def on_device(self, stored):
        return torch.empty(stored.shape)  # the float32 copy a GPU makes; its values are not used


class PlainRefiner(HostOnlyRefiner):
    """The refiner's host work as it was: label maps from float32 scores on the host, one VTP
    read per pair."""

    def labels(self, ids):
        distinct = sorted(set(ids))
        scores = torch.from_numpy(self.priors.maskclip_scores(distinct).astype(np.float32))
        maps = torch.cat([labels_from_scores(scores[i: i + self.batch_size], (self.size, self.size)) + 1
                          for i in range(0, len(distinct), self.batch_size)])
        row = {image: j for j, image in enumerate(distinct)}
        return maps if distinct == ids else maps[[row[image] for image in ids]]

    def initial(self, labels, images, classes):
        vtp = None
        if self.vtp_threshold is not None:
            maps = [self.priors.vtp(i, c) for i, c in zip(images, classes, strict=True)]
            vtp = torch.from_numpy(np.stack(maps))
        return initial_masks(labels, torch.tensor(classes), vtp, vtp_threshold=self.vtp_threshold)


def fold_inputs(run: Run, variant: str):
    from pipeline.fewshot.data import open_fold_inputs

    return open_fold_inputs(run.index, run.manifests, ("train/fold0", "val/fold0", _test(run)),
                            run.store("features.zarr", variant), run.store("priors.zarr", variant),
                            run.store("pseudo_masks.zarr", variant), cache_bytes=0)


def _test(run: Run) -> str:
    """Fold 0's test manifest with the most shots."""
    tests = [n for n in run.manifests if n.startswith("test/fold0/")]
    return max(tests, key=lambda n: len(run.manifests[n]["supports"].iloc[0]))


def feed_train(run: Run, variant: str, episodes: int, regime: str, batch_size: int = 16) -> Feed:
    """Training batches of fold 0 as the loader makes them: ``lfss`` — stored features, tokens and
    scores read by rows, targets at 400 px, pseudo-masks made in the step (``sampling: epoch``);
    ``piclip`` — images decoded at 473 px and every map seen through a random view
    (``features: online``, ``augment: papers``)."""
    from pipeline.core.params import ModelParams, TrainParams
    from pipeline.fewshot import online as online_io
    from pipeline.fewshot.train import make_step, on_device

    inputs = fold_inputs(run, variant)
    table = inputs.episodes("train/fold0", run.manifests["train/fold0"], ModelParams(), online_masks=True)
    if regime == "lfss":
        cfg, source = TrainParams(sampling="epoch", batch_size=batch_size, label_size=FEATURE_SIDE), None
    else:
        cfg = TrainParams(sampling="epoch", features="online", augment="papers", batch_size=batch_size,
                          label_size=PRIOR_SIDE)
        path_of = run.paths
        paths = [path_of[i] for i in sorted(inputs.bank.rows, key=inputs.bank.rows.__getitem__)]
        source = online_io.ImageSource(paths, PRIOR_SIDE, IMAGENET_MEAN, IMAGENET_STD)
    n = min(episodes, len(table))

    def make(start: int):
        index = torch.arange(start, min(start + batch_size, n))
        batch = make_step(table, inputs.bank, index, cfg, source, start)
        if variant == "plain" and regime == "piclip":  # normalised and warped on the host, as it was
            batch = on_device(batch, cfg, "cpu")
        return batch

    def steps() -> int:
        for start in range(0, n, batch_size):
            make(start)
        return n

    make(0)  # warm-up
    done, seconds = timed(steps)
    return Feed(f"train_{regime}", "episodes", done, seconds)


def feed_evaluate(run: Run, variant: str, episodes: int, batch_size: int = 16) -> Feed:
    """Evaluation batches of a fold-0 test manifest (stored features, tokens, pseudo-masks read by
    rows, every shot) and their query labels."""
    from pipeline.core.params import ModelParams
    from pipeline.fewshot.evaluate import Scoring, batches, query_labels

    inputs = fold_inputs(run, variant)
    name = _test(run)
    table = inputs.episodes(name, run.manifests[name], ModelParams(pseudo_masks="initial"))
    scoring = Scoring("hsnet", FEATURE_SIDE)
    n = min(episodes, len(table))

    def read() -> int:
        for index in batches(n, batch_size):
            scoring.batches(table, inputs.bank, index)
            [scoring.label(lab) for lab in query_labels(table, inputs.bank, index)]
        return n * table.shots

    done, seconds = timed(read)
    return Feed("evaluate", "ep-shots", done, seconds)


FEEDS = ("priors", "features", "pseudo_masks", "train_lfss", "train_piclip", "evaluate")


def run_feeds(run: Run, variant: str, scale_items: int) -> dict[str, Feed]:
    """Every stage's feed, in the order the stores are written (``plain``: zstd-compressed
    features and tokens, read through zarr, as they were)."""
    from pipeline.features import store as features_store
    from pipeline.priors import store as priors_store

    layout = {"RAW_ROWS": {}} if variant == "plain" else {}
    with patched(features_store, **layout), patched(priors_store, **layout):
        feeds = {"priors": feed_priors(run, variant, scale_items),
                 "features": feed_features(run, variant, scale_items)}
    feeds["pseudo_masks"] = feed_pseudo_masks(run, variant)
    feeds["train_lfss"] = feed_train(run, variant, 2 * scale_items, "lfss")
    feeds["train_piclip"] = feed_train(run, variant, scale_items, "piclip")
    feeds["evaluate"] = feed_evaluate(run, variant, scale_items)
    return feeds


def device_work(run: Run, root: Path, device: torch.device, repeats: int,
                batch: int | None) -> list[_device_work.DeviceWork]:
    """Seconds per item of every stage's model work on ``device`` (benchmarks/_device_work.py), at
    the LFSS preset's batch sizes (or ``batch`` for all: a quick run on a CPU)."""
    work = _device_work
    from pipeline.core.params import TrainParams
    from pipeline.fewshot.online import ImageSource

    _, resnet = scale.save_random_models(root / "models")
    inputs = fold_inputs(run, "pipeline")
    table = inputs.episodes("train/fold0", run.manifests["train/fold0"], _model(), online_masks=True)
    test = inputs.episodes(_test(run), run.manifests[_test(run)], _model("initial"))
    images, episodes = batch or 32, batch or 16
    lfss = TrainParams(sampling="epoch", batch_size=episodes, label_size=FEATURE_SIDE)
    piclip = TrainParams(sampling="epoch", features="online", augment="papers", batch_size=episodes,
                         label_size=PRIOR_SIDE)
    path_of = run.paths
    source = ImageSource([path_of[i] for i in sorted(inputs.bank.rows, key=inputs.bank.rows.__getitem__)],
                         PRIOR_SIDE, IMAGENET_MEAN, IMAGENET_STD)
    measured = [
        work.priors_work(run, run.root / "clip", device, images, repeats),
        work.features_work(run, resnet, device, images, repeats),
        work.pseudo_mask_work(device, episodes, test.shots, len(run.class_names), repeats),
        work.training_work(inputs, table, lfss, device, work.lfss_online(), repeats, "train_lfss"),
        work.training_work(inputs, table, piclip, device, work.piclip_online(resnet, device, source), repeats,
                           "train_piclip", source),
        work.evaluation_work(inputs, test, device, episodes, repeats),
    ]
    for w in measured:
        print(f"  device {w.stage}: {w.seconds_per_item * 1000:.1f} ms per {w.unit[:-1]}", flush=True)
    return measured


def _model(kind: str = "refined"):
    from pipeline.core.params import ModelParams

    return ModelParams(pseudo_masks=kind)


def host_table(before: dict[str, Feed], after: dict[str, Feed]) -> None:
    print(f"\nhost feed per core (one thread, cache_gb 0; items per CPU second, wall in brackets):\n"
          f"  {'':<23}{'plain':>18}{'pipeline':>18}{'gain':>7}")
    for stage in FEEDS:
        a, b = before[stage], after[stage]
        ra, rb = a.items / a.cpu, b.items / b.cpu
        wall = f"({a.items / a.wall:6.1f}){rb:>10.1f} ({b.items / b.wall:6.1f})"
        print(f"  {stage:<14}{b.unit:<9}{ra:>10.1f} {wall}{rb / ra:>6.2f}x")


def feeders(stage: str, cores: int) -> int:
    """Cores feeding a stage's device on a GPU box: the priors and features tasks decode in a thread
    a core; training and evaluation loaders, and pseudo-mask shard tasks, take all cores but two
    (pipeline.fewshot.data.loader_workers, stages/pseudo_masks.py)."""
    return cores if stage in ("priors", "features") else max(1, cores - 2)


def projection(after: dict[str, Feed], cores: int, device_s: dict[str, float | None],
               device_name: str) -> None:
    """``host_feed_ratio`` per stage and the projected hours of each reproduction."""
    print(f"\nwith {cores} cores feeding {device_name} (host rate x the cores feeding the stage, against "
          "the device's rate; host_feed_ratio > 1: the device is the bound):")
    rates = {}
    for stage in FEEDS:
        host = after[stage].items / after[stage].cpu * feeders(stage, cores)
        device = device_s[stage]
        rates[stage] = host if device is None else min(host, 1 / device)
        ratio = f"{host * device:6.2f}" if device else "   n/a (device not measured)"
        shown = f"{1 / device:8.1f}/s" if device else "        -"
        print(f"  {stage:<14} host {host:>8.1f}/s  device {shown}  host_feed_ratio {ratio}")
    for name, counts in WORKLOAD.items():
        for preset, train in (("LFSS", "train_lfss"), ("PI-CLIP", "train_piclip")):
            stages = [s for s in FEEDS if not s.startswith("train")] + [train]
            known = all(device_s[s] is not None for s in stages)
            hours = sum(counts[s] / rates[s] for s in stages) / 3600
            basis = ("device rates as above" if known
                     else "host rates where the device is unmeasured: a lower bound")
            print(f"projected {name}, {preset} preset, 4 folds, 1- and 5-shot: {hours:.1f} h on {device_name}"
                  f" with {cores} cores ({basis})")
    print("(the model: per stage, its items x the seconds per item of the slower side, host or device; "
          "stages one after another; process start-up and DVC not counted)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host-only", action="store_true", help="the feeds without the model work")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model work runs (without --host-only)")
    parser.add_argument("--images", type=int, default=64, help="train and val images of the benchmark")
    parser.add_argument("--items", type=int, default=32, help="images or episodes timed per feed")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each feed (the fastest counts)")
    parser.add_argument("--cores", type=int, default=16, help="C: cores of the projected GPU box")
    parser.add_argument("--device-batch", type=int, help="one batch size for all model work (default: "
                        "the LFSS preset's, 32 images / 16 episodes)")
    parser.add_argument("--device-repeats", type=int, default=3, help="timed calls of each model's work")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the benchmark here")
    parser.add_argument("--project", choices=sorted(GPUS), help="run each model's work once on this CPU (at "
                        "--device-batch, default 2) and project its time on that GPU op by op "
                        "(benchmarks/_roofline.py) instead of timing it")
    parser.add_argument("--efficiency", type=float, default=0.5, help="with --project: the share of the "
                        "GPU's peak compute and bandwidth a kernel reaches (also shown at a third of it)")
    args = parser.parse_args()
    if args.project and args.host_only:
        parser.error("--project projects the model work that --host-only leaves out: give one of them")
    if args.project:
        args.device, args.device_batch = "cpu", args.device_batch or 2
        _device_work.projection = _device_work.Projection(GPUS[args.project], 16 / args.device_batch)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        run = Run.open(build_benchmark(root, args.images, with_models=not args.host_only))
        print(f"benchmark: {len(run.index)} images, {sum(map(len, run.manifests.values()))} episodes in "
              f"{len(run.manifests)} manifests", flush=True)
        results: dict[str, dict[str, Feed]] = {"plain": {}, "pipeline": {}}
        for repeat in range(args.repeats):  # interleaved, the fastest kept: the machine is shared
            for variant in ("plain", "pipeline"):
                for stage, feed in run_feeds(run, variant, args.items).items():
                    best = results[variant].get(stage)
                    if best is None or feed.cpu < best.cpu:
                        results[variant][stage] = feed
                    print(f"  {repeat} {variant} {stage}: {feed.items} {feed.unit} in {feed.cpu:.2f} CPU s "
                          f"({feed.wall:.2f} s wall)", flush=True)
        if args.host_only:
            device_s, name = DEVICE_S, "one H200 (device rates last measured, host included: projected)"
        else:
            torch.set_num_threads(os.cpu_count() or 1)  # the model work may use every core
            device = torch.device(args.device)
            measured = device_work(run, root, device, repeats=args.device_repeats, batch=args.device_batch)
            device_s = {w.stage: w.seconds_per_item for w in measured}
            name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                    else f"this CPU ({os.cpu_count()} cores)")
        host_table(results["plain"], results["pipeline"])
        if not args.project:
            projection(results["pipeline"], args.cores, device_s, name)
            return
        projected = _device_work.projection
        for efficiency, bound in ((args.efficiency, "optimistic"), (args.efficiency / 3, "a third of that")):
            seconds = {w.stage: projected.seconds(costs, half, efficiency) / w.items
                       for w, (costs, half) in zip(measured, projected.recorded, strict=True)}
            projection(results["pipeline"], args.cores, seconds,
                       f"{projected.gpu.name}, kernels at {efficiency:.0%} of peak ({bound})")


if __name__ == "__main__":
    main()
