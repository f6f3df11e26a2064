"""``load_episodes`` on tiny stores written in ``tmp_path``: which arrays feed the model.

* ``pseudo_masks: initial | refined`` reads ``<manifest>/{query,support}_{initial,refined}``;
* ``supervision: mask`` gives the ground-truth support masks (label == class, each label map at
  its own size, pooled to the feature grid) while the query keeps its pseudo-mask;
* ``pir: false | true`` reads the VTP from ``pairs/vtp`` or ``pairs/pir``.

Every array holds different random contents, so reading the wrong one fails the test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from PIL import Image

from pipeline.core.params import ModelParams
from pipeline.core.tensors import mask_to_grid
from pipeline.features import store as features_store
from pipeline.fewshot.data import EpisodeTable, load_bank, load_episodes
from pipeline.fewshot.evaluate import sample_predictions
from pipeline.priors import store as priors_store
from pipeline.pseudomasks import store as pseudo_store

GRID, SIZE, NAME = (4, 4), 8, "test/fold0/shot2_seed0"
IDS = ["a", "b", "c", "d", "e", "f"]
LABEL_SIZES = [(16, 16), (12, 20), (20, 12), (24, 24), (10, 14), (16, 16)]  # mixed, as in real data
EPISODES = [(1, "a", ["b", "c"]), (2, "d", ["e", "a"]), (1, "f", ["c", "d"]), (2, "b", ["f", "e"])]


@dataclass
class Fold:
    path: Path
    labels: dict[str, np.ndarray]
    pseudo: dict[str, np.ndarray]  # "query_initial" -> (E, S, S), ...
    pairs: dict[str, np.ndarray]  # "class_id" (I, 2), "vtp" / "pir" (I, 2, h, w), rows of PRIOR_IDS


PRIOR_IDS = IDS[::-1]  # the prior store's rows need not follow the bank's (sorted) order


def write_fold(path: Path) -> Fold:
    """Label PNGs, features, priors and pseudo-masks of one 2-shot manifest, all random."""
    rng = np.random.default_rng(0)
    labels = {i: rng.integers(0, 3, size, dtype=np.uint8) for i, size in zip(IDS, LABEL_SIZES, strict=True)}
    for i, label in labels.items():
        Image.fromarray(label).save(path / f"{i}.png")
    features_store.create(zarr.open_group(path / "features.zarr", mode="w"), len(IDS), 3, GRID,
                          {"image_ids": IDS})
    layout = priors_store.Layout(len(IDS), 2, 2, GRID, (5, 5), shard_size=8)
    root = priors_store.create(path / "priors.zarr", layout, {"image_ids": PRIOR_IDS})
    pairs = {"class_id": np.array([[1, 2] if r % 2 else [2, 1] for r in range(len(IDS))], np.int16),
             "vtp": rng.random((len(IDS), 2, *GRID)).astype(np.float16),
             "pir": rng.random((len(IDS), 2, *GRID)).astype(np.float16)}
    for key, value in pairs.items():
        root[f"pairs/{key}"][:] = value
    table = manifest()
    masks = zarr.open_group(path / "pseudo_masks.zarr", mode="w")
    pseudo_store.create(masks, {NAME: table}, SIZE, shard=2)
    pseudo = {a: rng.random(masks[f"{NAME}/{a}"].shape) < 0.5 for a in pseudo_store.ARRAYS}
    for array, value in pseudo.items():
        masks[f"{NAME}/{array}"][:] = value
    return Fold(path, labels, pseudo, pairs)


def manifest() -> pd.DataFrame:
    c, q, s = zip(*EPISODES, strict=True)
    n = len(EPISODES)
    return pd.DataFrame({"episode": range(n), "fold": 0, "shot": 2, "seed": 0, "class_id": c,
                         "query": q, "supports": s})


def load(fold: Fold, cfg: ModelParams) -> EpisodeTable:
    labels = {i: str(fold.path / f"{i}.png") for i in IDS}
    features = features_store.FeatureStore(fold.path / "features.zarr")
    priors = priors_store.PriorStore(fold.path / "priors.zarr")
    bank = load_bank(IDS, features, priors, labels)
    pseudo = pseudo_store.PseudoMaskStore(fold.path / "pseudo_masks.zarr")
    return load_episodes(NAME, manifest(), bank, pseudo, priors, cfg)


def grid(masks: np.ndarray) -> torch.Tensor:
    return mask_to_grid(torch.from_numpy(masks), GRID).half()


def vtp(fold: Fold, image: str, class_id: int, key: str) -> torch.Tensor:
    row = PRIOR_IDS.index(image)
    slot = list(fold.pairs["class_id"][row]).index(class_id)
    return torch.from_numpy(fold.pairs[key][row, slot])


@pytest.fixture
def fold(tmp_path: Path) -> Fold:
    return write_fold(tmp_path)


@pytest.mark.parametrize("kind, other", [("refined", "initial"), ("initial", "refined")])
def test_pseudo_mask_kind_selects_its_own_query_and_support_arrays(fold: Fold, kind: str, other: str):
    table = load(fold, ModelParams(pseudo_masks=kind))
    assert torch.equal(table.query_mask, grid(fold.pseudo[f"query_{kind}"]))
    assert torch.equal(table.support_mask, grid(fold.pseudo[f"support_{kind}"]))
    assert table.support_mask.shape == (len(EPISODES), 2, *GRID)
    assert not torch.equal(table.query_mask, grid(fold.pseudo[f"query_{other}"]))
    assert not torch.equal(table.support_mask, grid(fold.pseudo[f"support_{other}"]))


@pytest.mark.parametrize("kind", ["refined", "initial"])
def test_mask_supervision_gives_ground_truth_supports_at_each_labels_size(fold: Fold, kind: str):
    table = load(fold, ModelParams(supervision="mask", pseudo_masks=kind))
    truth = torch.stack([torch.stack([grid(fold.labels[s] == c) for s in ss]) for c, _, ss in EPISODES])
    assert torch.equal(table.support_mask, truth)
    assert not torch.equal(table.support_mask, grid(fold.pseudo[f"support_{kind}"]))
    assert torch.equal(table.query_mask, grid(fold.pseudo[f"query_{kind}"]))  # the query stays pseudo


@pytest.mark.parametrize("pir, key, other", [(False, "vtp", "pir"), (True, "pir", "vtp")])
def test_pir_setting_reads_vtp_of_each_image_and_class_from_its_array(
    fold: Fold, pir: bool, key: str, other: str
):
    table = load(fold, ModelParams(pir=pir))
    query = torch.stack([vtp(fold, q, c, key) for c, q, _ in EPISODES])
    support = torch.stack([torch.stack([vtp(fold, s, c, key) for s in ss]) for c, _, ss in EPISODES])
    assert torch.equal(table.query_vtp, query)
    assert torch.equal(table.support_vtp, support)
    assert not torch.equal(table.query_vtp, torch.stack([vtp(fold, q, c, other) for c, q, _ in EPISODES]))


@pytest.mark.parametrize("supervision", ["text", "mask"])
def test_sample_predictions_keep_each_episode_at_its_own_size(fold: Fold, supervision: str, tmp_path: Path):
    """Real images differ in size: every kept support mask and prediction has its own image's size
    (stacking them crashed under supervision: mask), and they survive an npz round trip."""
    cfg = ModelParams(supervision=supervision)
    table = load(fold, cfg)
    pseudo = pseudo_store.PseudoMaskStore(fold.path / "pseudo_masks.zarr")
    bank = load_bank(IDS, features_store.FeatureStore(fold.path / "features.zarr"),
                     priors_store.PriorStore(fold.path / "priors.zarr"),
                     {i: str(fold.path / f"{i}.png") for i in IDS})
    index, probs = torch.tensor([0, 1, 3]), torch.rand(3, *GRID)
    kept = sample_predictions(NAME, table, bank, pseudo, cfg, index, probs, manifest())
    np.savez(tmp_path / "samples.npz", **kept)
    got = np.load(tmp_path / "samples.npz")
    assert list(got["query"]) == [EPISODES[e][1] for e in index.tolist()]
    for j, e in enumerate(index.tolist()):
        c, query, supports = EPISODES[e]
        assert got[f"prediction_{j}"].shape == fold.labels[query].shape
        truth = fold.labels[supports[0]] == c
        expected = fold.pseudo[f"support_{cfg.pseudo_masks}"][e, 0] if supervision == "text" else truth
        assert np.array_equal(got[f"support_mask_{j}"], expected)
    assert [got[f"prediction_{j}"].shape for j in range(3)] == [(16, 16), (24, 24), (12, 20)]  # a, d, b


def test_a_bank_read_by_rows_trains_exactly_like_one_held_in_memory(fold: Fold):
    """Past ``cache_bytes`` the bank reads each batch's rows from the stores (memory O(batch)),
    here or in DataLoader workers reading ahead: same inputs, same labels, and the same trained
    weights as the in-memory bank."""
    from pipeline.core.params import TrainParams
    from pipeline.fewshot.data import StoredLabels, StoredRows
    from pipeline.fewshot.train import fit
    from pipeline.model.lfss import LFSS

    rng = np.random.default_rng(1)
    features = zarr.open_group(fold.path / "features.zarr", mode="r+")["features"]
    features[:] = rng.standard_normal(features.shape).astype(np.float16)
    for b in (0, 1):
        tokens = zarr.open_group(fold.path / "priors.zarr", mode="r+")[f"images/tokens_{b}"]
        tokens[:] = rng.standard_normal(tokens.shape).astype(np.float16)
    cfg = ModelParams(hidden=8, seeds=2, cluster_iterations=2)
    train = TrainParams(epochs=2, batch_size=2, lr=1e-2, label_size=12, dtype="fp32")
    labels = {i: str(fold.path / f"{i}.png") for i in IDS}
    trained = {}
    for budget, workers in ((2**30, 0), (0, 0), (0, 2)):
        features_in = features_store.FeatureStore(fold.path / "features.zarr", cache_bytes=budget)
        priors = priors_store.PriorStore(fold.path / "priors.zarr", cache_bytes=budget)
        bank = load_bank(IDS, features_in, priors, labels)
        assert isinstance(bank.features, StoredRows) == (budget == 0)
        assert isinstance(bank.labels, StoredLabels) == (budget == 0)
        pseudo = pseudo_store.PseudoMaskStore(fold.path / "pseudo_masks.zarr")
        table = load_episodes(NAME, manifest(), bank, pseudo, priors, cfg)
        batch = table.batch(bank, torch.tensor([2, 0, 3]), shot=1)
        targets = bank.targets(table.query, table.classes, 12)
        torch.manual_seed(0)
        model = LFSS(3, cfg)
        fit(model, table, table, bank, 2, train, log=lambda _: None, loader_workers=workers)
        trained[budget, workers] = batch, targets, model.state_dict()
    b1, t1, w1 = trained[2**30, 0]
    for b0, t0, w0 in (trained[0, 0], trained[0, 2]):
        for field in ("query", "support", "query_tokens", "support_tokens", "query_mask", "support_vtp"):
            assert torch.equal(getattr(b1, field), getattr(b0, field)), field
        assert torch.equal(t1, t0)
        assert all(torch.equal(w1[k], w0[k]) for k in w1)


def test_prefetched_batches_are_the_same_with_workers_and_leave_the_rng_alone():
    from pipeline.fewshot.data import prefetched

    def make(i: int) -> torch.Tensor:
        return torch.full((2,), i)

    torch.manual_seed(0)
    here = list(prefetched(make, 5, workers=0))
    after_here = torch.rand(1)
    torch.manual_seed(0)
    ahead = list(prefetched(make, 5, workers=2))
    assert torch.rand(1) == after_here  # dropout draws stay the same whatever the worker count
    assert all(torch.equal(a, b) for a, b in zip(here, ahead, strict=True)) and len(ahead) == 5


def test_letterboxed_shots_share_one_query_read_once_placed_by_its_labels_size(fold: Fold):
    """``evaluate.resize: pfenet``: every shot of a batch shares one letterboxed query (one read of
    its image), each image keeps its aspect ratio at the canvas's top left (the rest: padding), and
    a bank reading labels from their files (header only, for the size) gives the same batch."""
    from pipeline.fewshot.online import ImageSource, letterboxed_batch

    side = 20
    for i, (h, w) in zip(IDS, LABEL_SIZES, strict=True):
        Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(fold.path / f"{i}.jpg")
    loads: list[list[int]] = []

    class Counted(ImageSource):
        def load(self, rows: torch.Tensor) -> torch.Tensor:
            loads.append(rows.tolist())
            return super().load(rows)

    source = Counted([str(fold.path / f"{i}.jpg") for i in IDS], side, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    labels = {i: str(fold.path / f"{i}.png") for i in IDS}
    index = torch.tensor([3, 0])  # queries b (12 x 20: wide) and a (16 x 16)
    got = []
    for budget in (2**30, 0):
        features = features_store.FeatureStore(fold.path / "features.zarr", cache_bytes=budget)
        priors = priors_store.PriorStore(fold.path / "priors.zarr", cache_bytes=budget)
        bank = load_bank(IDS, features, priors, labels)
        pseudo = pseudo_store.PseudoMaskStore(fold.path / "pseudo_masks.zarr")
        table = load_episodes(NAME, manifest(), bank, pseudo, priors, ModelParams())
        assert bank.label_shapes(table.query[index]) == [(12, 20), (16, 16)]
        loads.clear()
        shots = letterboxed_batch(table, bank, index, source)
        assert len(shots) == 2 and shots[0].query is shots[1].query
        assert len(loads) == 3 and loads[0] == table.query[index].tolist()  # query once, then each shot
        got.append(shots)
    wide = got[0][0].query[0]
    assert (wide[:, 13:] == 0).all() and (wide[:, :11] > 0.5).all()  # 12/20 of 20 rows: image, then padding
    assert (got[0][0].query[1] > 0.5).all()  # square: the whole canvas
    for a, b in zip(*got, strict=True):
        for field in ("query", "support", "query_mask", "support_mask", "query_vtp", "query_tokens"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_batches_are_read_ahead_when_there_is_reading_to_do(fold: Fold):
    """Default loader workers: none for a bank in memory, unless batches decode images; some for
    a bank read from the stores; an explicit count always wins."""
    import os

    from pipeline.fewshot.data import loader_workers

    labels = {i: str(fold.path / f"{i}.png") for i in IDS}
    some, more = min(4, len(os.sched_getaffinity(0))), max(1, len(os.sched_getaffinity(0)) - 2)
    for budget, default in ((2**30, 0), (0, some)):
        features = features_store.FeatureStore(fold.path / "features.zarr", cache_bytes=budget)
        priors = priors_store.PriorStore(fold.path / "priors.zarr", cache_bytes=budget)
        bank = load_bank(IDS, features, priors, labels)
        assert loader_workers(bank, None) == default
        assert loader_workers(bank, None, images=True) == some
        assert loader_workers(bank, None, images=True, device="cuda") == more
        with pytest.MonkeyPatch.context() as patch:  # on a 16-core box a GPU takes more than a CPU
            patch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
            assert loader_workers(bank, None, images=True) == 4
            assert loader_workers(bank, None, images=True, device="cuda") == 14  # all but two cores
        assert loader_workers(bank, 3, images=True) == loader_workers(bank, 0) + 3 == 3


def test_an_augmented_online_batch_is_finished_where_the_step_runs_with_the_host_paths_values(fold: Fold):
    """``train.augment: papers``: the loader leaves uint8 pixels, the stored maps and the drawn
    views; finishing the batch (normalise, warp, targets) gives what normalising and warping on
    the host gives, the same whether the batch came from a loader process or from here."""
    from pipeline.core.images import load_normalized
    from pipeline.core.metrics import binary_target
    from pipeline.core.params import TrainParams
    from pipeline.fewshot.augment import random_views, warp, warp_labels
    from pipeline.fewshot.data import prefetched
    from pipeline.fewshot.online import ImageSource, online_batch

    rng = np.random.default_rng(1)
    for i, (h, w) in zip(IDS, LABEL_SIZES, strict=True):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(fold.path / f"{i}.jpg")
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    source = ImageSource([str(fold.path / f"{i}.jpg") for i in IDS], 12, mean, std)
    labels = {i: str(fold.path / f"{i}.png") for i in IDS}
    features = features_store.FeatureStore(fold.path / "features.zarr", cache_bytes=2**30)
    priors = priors_store.PriorStore(fold.path / "priors.zarr", cache_bytes=2**30)
    bank = load_bank(IDS, features, priors, labels)
    pseudo = pseudo_store.PseudoMaskStore(fold.path / "pseudo_masks.zarr")
    table = load_episodes(NAME, manifest(), bank, pseudo, priors, ModelParams(), online_masks=True)
    cfg = TrainParams(features="online", augment="papers", sampling="epoch", label_size=10)
    index = torch.tensor([2, 0, 3])

    def make(seed: int):
        return online_batch(table, bank, index, cfg, source, seed)

    loaded = [make(7), *prefetched(lambda _: make(7), 1, workers=1)]
    assert loaded[0].query.images.dtype == torch.uint8
    finished = [b.finish("cpu") for b in loaded]
    # the host path, by hand: views drawn query first, every map normalised / widened and warped
    generator = torch.Generator().manual_seed(7)
    expect = {}
    for role, rows in (("query", table.query[index]), ("support", table.supports[index, 0])):
        own = [torch.from_numpy(bank.labels[r]) for r in rows.tolist()]
        theta = random_views(generator, [tuple(lab.shape) for lab in own], cfg.augment_scale,
                             cfg.augment_rotate)
        images = load_normalized([source.paths[r] for r in rows.tolist()], 12, mean, std)
        expect[role] = (warp(images, theta, (12, 12)),
                        binary_target(warp_labels(own, theta, (10, 10)), table.classes[index]))
    for x, made, query_target, support_target in finished:
        assert torch.equal(x.query, expect["query"][0]) and torch.equal(x.support, expect["support"][0])
        assert torch.equal(query_target, expect["query"][1])
        assert torch.equal(support_target, expect["support"][1])
        assert made.query_scores.shape == (3, *bank.scores.shape[1:])
    (a, a_made, *_), (b, b_made, *_) = finished  # from a loader process or from here: the same batch
    for field in ("query", "support", "query_vtp", "support_vtp", "query_tokens", "support_tokens"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(a_made.support_scores, b_made.support_scores)
    x, made, query_target, _ = loaded[0].finish("meta")  # all of it where the step runs (a GPU's stand-in)
    assert {t.device.type for t in (x.query, x.support_tokens, made.query_scores, query_target)} == {"meta"}


def test_the_pseudo_mask_refiner_makes_its_label_maps_and_initial_masks_on_its_device(fold: Fold):
    """The stage's label maps (scores upsampled, argmax) and VTP-gated initial masks: on the CPU
    the values of the plain path (float32 scores on the host, one VTP read per pair), and made
    on the refiner's device (``meta`` standing in for a GPU)."""
    from pipeline.clip.dense import labels_from_scores
    from pipeline.pseudomasks.refine import initial_masks
    from pipeline.pseudomasks.shards import Refiner

    rng = np.random.default_rng(2)
    scores = zarr.open_group(fold.path / "priors.zarr", mode="r+")["images/maskclip_scores"]
    scores[:] = rng.standard_normal(scores.shape).astype(np.float16)
    features = features_store.FeatureStore(fold.path / "features.zarr")
    priors = priors_store.PriorStore(fold.path / "priors.zarr")
    images, classes = ["c", "a", "c", "f"], [2, 1, 1, 2]
    got = {}
    for device in ("cpu", "meta"):
        refiner = Refiner(features, priors, SIZE, 0.5, 0.1, 0.4, 2, device)
        labels = refiner.labels(images)
        got[device] = (labels, refiner.initial(labels, images, classes))
    assert {t.device.type for t in got["meta"]} == {"meta"}
    plain = torch.from_numpy(priors.maskclip_scores(images).astype(np.float32))
    labels = labels_from_scores(plain, (SIZE, SIZE)) + 1
    vtp = torch.from_numpy(np.stack([priors.vtp(i, c) for i, c in zip(images, classes, strict=True)]))
    assert torch.equal(got["cpu"][0], labels)
    assert torch.equal(got["cpu"][1], initial_masks(labels, torch.tensor(classes), vtp, vtp_threshold=0.4))
    assert got["cpu"][1].any() and not got["cpu"][1].all()
