"""train@k and evaluate@k on the smoke run: resume, metrics, supervision and mask variants, online
features and pseudo-masks, the evaluation protocols."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.core.params import ModelParams, load_params
from stages import episodes
from tests.conftest import IN_PROCESS, TRAIN_SMOKE, model_args, write_params

pytestmark = pytest.mark.slow


def crash_in_second_epoch(monkeypatch, args: list[str]) -> list[int]:
    """``stages.train`` on ``args`` crashing at the first step of its second epoch (50 episodes / 8
    a step: 7 steps an epoch); the training steps stay counted in the list returned (later runs
    count on, and never crash)."""
    from pipeline.fewshot import train as train_lib
    from stages import train

    real, calls, crashed = train_lib.episode_loss, [], []

    def counted(*a, **kw):
        calls.append(1)
        if len(calls) == 8 and not crashed:
            crashed.append(1)
            raise RuntimeError("simulated crash")
        return real(*a, **kw)

    monkeypatch.setattr(train_lib, "episode_loss", counted)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(args)
    return calls


def test_train_resumes_then_evaluate_reports_model_and_priors(model_inputs, pipeline_run, tmp_path,
                                                              monkeypatch):
    from stages import evaluate, train

    args = model_args(pipeline_run, model_inputs, tmp_path) + ["--plots", str(tmp_path / "plots")]
    calls = crash_in_second_epoch(monkeypatch, args)
    assert not (tmp_path / "models/fold1").exists()
    checkpoint = torch.load(tmp_path / "models/.fold1.partial/checkpoint.pt", weights_only=True)
    first_epoch = checkpoint["state"]["history"]
    assert [r["epoch"] for r in first_epoch] == [1]
    calls.clear()
    assert train.main(args) == 0
    assert len(calls) == 7  # only the second epoch ran
    saved = torch.load(tmp_path / "models/fold1/model.pt", weights_only=True)
    assert [r["epoch"] for r in saved["history"]] == [1, 2] and saved["history"][0] == first_epoch[0]
    assert not (tmp_path / "models/fold1/checkpoint.pt").exists()
    from stages.report import read_curves

    curves = read_curves(tmp_path / "plots/fold1")  # DVCLive's files
    assert list(curves.columns) == ["epoch", "loss", "val_miou"] and list(curves["epoch"]) == [1, 2]
    keys = ("epoch", "loss", "val_miou")
    assert curves.to_dict("records") == [{k: r[k] for k in keys} for r in saved["history"]]
    last = json.loads((tmp_path / "plots/fold1/metrics.json").read_text())  # a DVC metric: few columns
    assert last == {"val_miou": saved["history"][-1]["val_miou"], "step": 2}
    again = tmp_path / "again"
    assert train.main(model_args(pipeline_run, model_inputs, again) + ["--plots", str(again / "plots")]) == 0
    curve_files = ("plots/fold1/plots/metrics/val_miou.tsv", "plots/fold1/metrics.json")
    for path in ("models/fold1/model.pt", *curve_files):  # resumed == uninterrupted, byte for byte
        assert (again / path).read_bytes() == (tmp_path / path).read_bytes(), path

    metrics_dir = tmp_path / "metrics"
    eval_args = [*model_args(pipeline_run, model_inputs, tmp_path), "--metrics", str(metrics_dir),
                 "--predictions", str(tmp_path / "predictions"), "--splits", str(pipeline_run / "splits")]
    assert evaluate.main(eval_args) == 0
    report = json.loads((metrics_dir / "fold1.json").read_text())
    novel = {"ring", "cross", "crescent", "hexagon", "pentagon"}  # fold 1: classes 6-10
    for shot in ("shot1", "shot5"):
        figures = report[shot]
        assert all(0 <= figures[key] <= 100 for key in ("miou", "prior_miou", "fbiou"))
        seeds = [s["miou"] for s in figures["seeds"].values()]
        assert set(figures["class_iou"]) == novel  # absent_class zero: every class of the fold
        assert figures["miou"] == pytest.approx(np.mean(seeds), abs=0.01)
        for seed in figures["seeds"].values():  # a class no episode drew counts 0 in the mean of 5
            assert seed["miou"] == pytest.approx(np.mean(list(seed["class_iou"].values())), abs=0.01)
            assert all(seed["class_iou"][c] == 0 for c in seed["absent_classes"])
    assert report["protocol"] == {"name": "custom", "conventions": {
        "episodes.protocol": "pfenet", "evaluate.resize": "original", "evaluate.absent_class": "zero",
        "split.novel_in_train": "drop", "priors.cam_scale": "pi-clip", "priors.box": "pi-clip"}}
    assert 0.1 <= report["prior_threshold"] <= 0.9
    assert (tmp_path / "predictions/fold1.npz").is_file()  # nothing written outside the given paths
    from pipeline.report.stats import Scores

    counts = pd.read_parquet(metrics_dir / "fold1_episodes.parquet")  # what the ablations' bootstrap reads
    for shot in (1, 5):
        mine = counts[counts["shot"] == shot]
        for seed in (0, 1):
            assert list(mine[mine["seed"] == seed]["episode"]) == list(range(30))  # in manifest order
        assert Scores.of([mine]).miou() == pytest.approx(report[f"shot{shot}"]["miou"], abs=0.01)


def test_a_truncated_resume_checkpoint_is_set_aside_beside_the_output_and_the_fold_restarts(
        model_inputs, pipeline_run, tmp_path, monkeypatch, capsys):
    """A checkpoint cut short in ``.fold1.partial`` (a full disk, a crash mid-copy): one line naming
    it, moved beside the output (never into it, nor deleted), and the fold trains from scratch to
    the model an uninterrupted run makes, byte for byte."""
    from stages import train

    args = model_args(pipeline_run, model_inputs, tmp_path) + ["--plots", str(tmp_path / "plots")]
    crash_in_second_epoch(monkeypatch, args)
    checkpoint = tmp_path / "models/.fold1.partial/checkpoint.pt"
    cut = checkpoint.read_bytes()[:1000]
    checkpoint.write_bytes(cut)
    capsys.readouterr()
    assert train.main(args) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "checkpoint" in line]
    aside = tmp_path / "models/.fold1.checkpoint.pt.bad"
    assert len(err) == 1 and err[0].startswith(f"{checkpoint}: unreadable resume checkpoint ("), err
    assert err[0].endswith(f"set aside as {aside}; training starts from scratch"), err
    assert aside.read_bytes() == cut and sorted(p.name for p in (tmp_path / "models/fold1").iterdir()) == [
        "model.pt", "model.pt.sha256"]
    saved = torch.load(tmp_path / "models/fold1/model.pt", weights_only=True)
    assert [r["epoch"] for r in saved["history"]] == [1, 2]
    again = tmp_path / "again"
    assert train.main(model_args(pipeline_run, model_inputs, again) + ["--plots", str(again / "plots")]) == 0
    assert (again / "models/fold1/model.pt").read_bytes() == (tmp_path / "models/fold1/model.pt").read_bytes()


def test_oracle_masks_of_controlled_quality_train_and_score(model_inputs, pipeline_run, tmp_path):
    """The mask-quality study's oracle: ground-truth query and support masks, eroded."""
    from pipeline.datasets.episodes import read_manifests
    from pipeline.datasets.index import read_index_dir
    from pipeline.fewshot.data import open_fold_inputs
    from pipeline.pseudomasks import quality
    from stages import evaluate, train

    model = {"hidden": 8, "pseudo_masks": "truth", "truth_morph": -2}
    params = write_params(tmp_path / "params.yaml", {**TRAIN_SMOKE, "train": {"epochs": 1, "batch_size": 8},
                                                     "model": model})
    args = ["--params", str(params), *model_args(pipeline_run, model_inputs, tmp_path)[2:]]
    assert train.main([*args, "--plots", str(tmp_path / "plots")]) == 0
    assert evaluate.main([*args, "--metrics", str(tmp_path / "metrics"),
                          "--predictions", str(tmp_path / "predictions"),
                          "--splits", str(pipeline_run / "splits")]) == 0
    index, meta = read_index_dir(pipeline_run / "index")
    manifests = read_manifests(pipeline_run / "episodes")
    name = "test/fold1/shot1_seed0"
    inputs = open_fold_inputs(index, manifests, [name], *(pipeline_run / f for f in (
        "features.zarr", "priors.zarr", "pseudo_masks.zarr")), cache_bytes=2**30)
    table = inputs.episodes(name, manifests[name], ModelParams(**model))
    exact = inputs.episodes(name, manifests[name], ModelParams(pseudo_masks="truth"))
    assert table.query_mask.sum() < exact.query_mask.sum() and (table.query_mask <= exact.query_mask).all()
    labels = dict(zip(index.image_id, index.mask_path, strict=True))
    figures = {morph: quality.figures(quality.evaluate_truth(manifests[name], labels.__getitem__,
                                                             len(meta["class_names"]), morph))
               for morph in (-2, 0, 2)}
    assert figures[0]["support_precision"] == figures[0]["support_recall"] == 100.0
    assert figures[-2]["query_precision"] == 100.0 > figures[-2]["query_recall"]
    assert figures[2]["query_recall"] == 100.0 > figures[2]["query_precision"]
    with pytest.raises(ValueError, match="truth_morph"):
        ModelParams(truth_morph=2)


def test_train_of_a_missing_fold_is_one_line(model_inputs, pipeline_run, tmp_path, capsys):
    from stages import train

    args = model_args(pipeline_run, model_inputs, tmp_path)[:-1] + ["7"]
    assert train.main(args) == 1
    assert capsys.readouterr().err.strip() == (f"error: {pipeline_run / 'episodes'}: no train/fold7 manifest "
                                               "(fold 7 of 4?)")


def test_mask_supervision_trains_and_keeps_samples_of_mixed_sizes(model_inputs, pipeline_run, tmp_path):
    """Standard FSS (ground-truth support masks) end to end on mixed-size images; the kept samples
    stacked support labels of different sizes and crashed before."""
    from stages import evaluate, train

    params = write_params(tmp_path / "params.yaml", {**TRAIN_SMOKE, "train": {"epochs": 1, "batch_size": 8},
                                                     "model": {"hidden": 8, "supervision": "mask"},
                                                     "evaluate": {"samples": 4}})
    args = ["--params", str(params), *model_args(pipeline_run, model_inputs, tmp_path)[2:]]
    assert train.main([*args, "--plots", str(tmp_path / "plots")]) == 0
    assert evaluate.main([*args, "--metrics", str(tmp_path / "metrics"),
                          "--predictions", str(tmp_path / "predictions"),
                          "--splits", str(pipeline_run / "splits")]) == 0
    kept = np.load(tmp_path / "predictions/fold1.npz")
    index = pq.read_table(pipeline_run / "index/index.parquet").to_pandas().set_index("image_id")
    shapes = set()
    for j, (query, support) in enumerate(zip(kept["query"], kept["support"], strict=True)):
        assert kept[f"prediction_{j}"].shape == (index.at[query, "height"], index.at[query, "width"])
        assert kept[f"support_mask_{j}"].shape == (index.at[support, "height"], index.at[support, "width"])
        shapes.add(kept[f"prediction_{j}"].shape)
    assert len(kept["query"]) == 4 and len(shapes) > 1


@pytest.mark.parametrize("kind", ["refined", "initial"])
def test_pseudo_masks_made_in_the_training_step_equal_the_stored_ones(model_inputs, pipeline_run, tmp_path,
                                                                        kind):
    from pipeline.datasets.episodes import read_manifests
    from pipeline.datasets.index import read_index_dir
    from pipeline.fewshot.data import open_fold_inputs
    from pipeline.fewshot.train import with_pseudo_masks
    from pipeline.pseudomasks.online import OnlineRefiner

    overrides = {"model": {"hidden": 8, "pseudo_masks": kind}}
    params = load_params(write_params(tmp_path / "params.yaml", overrides))
    index, _ = read_index_dir(pipeline_run / "index")
    manifests, name = read_manifests(pipeline_run / "episodes"), "train/fold1"
    inputs = open_fold_inputs(index, manifests, [name], pipeline_run / "features.zarr",
                              pipeline_run / "priors.zarr", pipeline_run / "pseudo_masks.zarr", cache_bytes=0)
    stored = inputs.episodes(name, manifests[name], params.model)
    online = inputs.episodes(name, manifests[name], params.model, online_masks=True)
    assert online.online_masks and online.query_mask is None and not stored.online_masks
    every = torch.arange(len(stored))
    made = with_pseudo_masks(online.batch(inputs.bank, every), online.mask_inputs(inputs.bank, every),
                             OnlineRefiner.from_params(params))
    want = stored.batch(inputs.bank, every)
    assert torch.equal(made.query_mask, want.query_mask.float())
    assert torch.equal(made.support_mask, want.support_mask.float())
    assert 0 < float(made.query_mask.mean()) < 1


def test_epoch_sampling_draws_every_pair_and_trains_on_fresh_episodes(model_inputs, pipeline_run, tmp_path,
                                                                      monkeypatch):
    from pipeline.datasets.episodes import draw_epoch_episodes, read_manifests
    from pipeline.fewshot import train as train_lib
    from stages import train

    epoch_params = {"train": {"epochs": 2, "batch_size": 8, "sampling": "epoch", "episodes_per_epoch": 16,
                              "lr_schedule": "poly"}, "model": {"hidden": 8}}
    params = write_params(tmp_path / "params.yaml", epoch_params)
    assert episodes.main(["--params", str(params), "--splits", str(pipeline_run / "splits"),
                          "--out", str(tmp_path / "episodes")]) == 0
    assert json.loads((tmp_path / "episodes/meta.json").read_text())["train_sampling"] == "epoch"
    manifest = read_manifests(tmp_path / "episodes")["train/fold1"]
    pairs = pq.read_table(pipeline_run / "splits/pairs.parquet").to_pandas()
    pairs = pairs[(pairs["fold"] == 1) & (pairs["role"] == "train")]
    assert sorted(zip(manifest["query"], manifest["class_id"], strict=True)) == sorted(
        zip(pairs["image_id"], pairs["class_id"], strict=True))  # every training pair, once

    seen: dict[str, list[str]] = {}
    real = train_lib.make_step

    def spy(table, bank, index, cfg, *online):
        step = real(table, bank, index, cfg, *online)
        assert step.masks is not None and step.x.query_mask is None  # made in the training step
        seen.setdefault(table.name, []).extend(table.query[index].tolist())
        return step

    monkeypatch.setattr(train_lib, "make_step", spy)
    # the stores hold the smoke run's images: its pool's query and support pairs stand in for the fold's
    pool = read_manifests(pipeline_run / "episodes")["train/fold1"]
    stand_in = pd.DataFrame({"image_id": [*pool["query"], *(ss[0] for ss in pool["supports"])],
                             "class_id": [*pool["class_id"]] * 2}).drop_duplicates()
    shutil.copytree(pipeline_run / "episodes", tmp_path / "stand_in")
    pq.write_table(draw_epoch_episodes(stand_in, 1, 1, 0, 0), tmp_path / "stand_in/train/fold1.parquet")
    args = ["--params", str(params), *model_args(pipeline_run, model_inputs, tmp_path)[2:]]
    args[args.index("--episodes") + 1] = str(tmp_path / "stand_in")
    assert train.main([*args, "--plots", str(tmp_path / "plots")]) == 0
    assert sorted(seen) == ["train/fold1/epoch0", "train/fold1/epoch1"]
    assert all(len(rows) == 16 for rows in seen.values()) and seen["train/fold1/epoch0"] != seen[
        "train/fold1/epoch1"]
    history = torch.load(tmp_path / "models/fold1/model.pt", weights_only=True)["history"]
    assert [r["epoch"] for r in history] == [1, 2]


def test_online_features_equal_the_stored_ones_and_augmented_training_runs(model_inputs, pipeline_run,
                                                                            tmp_path):
    from pipeline.datasets.episodes import read_manifests
    from pipeline.datasets.index import read_index_dir
    from pipeline.fewshot.data import open_fold_inputs
    from pipeline.fewshot.online import OnlineBatch
    from pipeline.fewshot.train import episode_loss, make_step, on_device, with_features
    from pipeline.model.lfss import LFSS
    from stages import train
    from stages.train import online_parts

    online_params = {"train": {"epochs": 1, "batch_size": 8, "features": "online"}, "model": {"hidden": 8},
                     **IN_PROCESS}
    params = load_params(write_params(tmp_path / "params.yaml", online_params))
    index, _ = read_index_dir(pipeline_run / "index")
    manifests, name = read_manifests(pipeline_run / "episodes"), "train/fold1"
    inputs = open_fold_inputs(index, manifests, [name], pipeline_run / "features.zarr",
                              pipeline_run / "priors.zarr", pipeline_run / "pseudo_masks.zarr",
                              cache_bytes=2**30)
    bank, first = inputs.bank, torch.arange(8)
    stored = make_step(inputs.episodes(name, manifests[name], params.model), bank, first, params.train)
    online = online_parts(params, index, bank, pipeline_run / "clip", torch.device("cpu"))
    table = inputs.episodes(name, manifests[name], params.model, online_masks=True)
    loaded = make_step(table, bank, first, params.train, online.source, seed=0)
    assert isinstance(loaded, OnlineBatch) and loaded.query.images.dtype == torch.uint8  # normalised later
    step = on_device(loaded, params.train, "cpu")
    assert step.images and step.x.query.shape[1:] == (3, 256, 256)
    made = with_features([step.x], online.backbone)[0]
    torch.testing.assert_close(made.query, stored.x.query.float(), atol=2e-3, rtol=2e-3)  # float16 either way
    # the stored layout: kernels follow memory layout, and with the trunk's channels-last view the
    # same values gave other gradients (bf16: other losses), and a full run drifted 0.2-0.7 mIoU
    assert made.query.is_contiguous() and made.support.is_contiguous()
    assert torch.equal(step.query_target, stored.query_target)
    torch.manual_seed(0)
    model = LFSS(bank.features.shape[1], params.model).eval()  # no dropout: the same function twice
    with torch.no_grad():
        losses = [float(episode_loss(model, s, params.train, torch.device("cpu"), o))
                  for s, o in ((stored, type(online)()), (step, online))]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)

    augment = {"train": {**online_params["train"], "augment": "papers", "sampling": "epoch",
                         "episodes_per_epoch": 16}, "model": {"hidden": 8}, **IN_PROCESS}
    params = load_params(write_params(tmp_path / "params.yaml", augment))
    viewed = [on_device(make_step(table, bank, first, params.train, online.source, seed=s), params.train,
                        "cpu") for s in (0, 0, 1)]
    assert torch.equal(viewed[0].x.query, viewed[1].x.query)  # views are a function of the seed
    assert not torch.equal(viewed[0].x.query, viewed[2].x.query) and not torch.equal(viewed[0].x.query,
                                                                                    step.x.query)
    assert (viewed[0].query_target == 255).float().mean() < 0.5
    args = ["--params", str(tmp_path / "params.yaml"), *model_args(pipeline_run, model_inputs, tmp_path)[2:],
            "--clip", str(pipeline_run / "clip"), "--plots", str(tmp_path / "plots")]
    assert train.main(args) == 0
    assert (tmp_path / "models/fold1/model.pt").is_file()


def test_each_evaluation_protocol_scores_and_says_so(model_inputs, pipeline_run, tmp_path):
    from stages import evaluate, train

    params = write_params(tmp_path / "params.yaml", {"train": {"epochs": 1, "batch_size": 8}})
    args = ["--params", str(params), *model_args(pipeline_run, model_inputs, tmp_path)[2:],
            "--clip", str(pipeline_run / "clip")]
    assert train.main([*args, "--plots", str(tmp_path / "plots")]) == 0
    got = {}
    for resize in ("original", "hsnet", "pfenet"):
        params = write_params(tmp_path / "params.yaml", {"train": {"epochs": 1, "batch_size": 8},
                                                         "evaluate": {"resize": resize, "samples": 2},
                                                         **IN_PROCESS})
        out = tmp_path / resize
        assert evaluate.main([*args, "--metrics", str(out), "--predictions", str(out),
                              "--splits", str(pipeline_run / "splits")]) == 0
        got[resize] = json.loads((out / "fold1.json").read_text())
        assert got[resize]["resize"] == resize and got[resize]["scored"]
        kept = np.load(out / "fold1.npz")
        index = pq.read_table(pipeline_run / "index/index.parquet").to_pandas().set_index("image_id")
        query = kept["query"][0]
        assert kept["prediction_0"].shape == (index.at[query, "height"], index.at[query, "width"])
    for resize, metrics in got.items():
        assert 0 < metrics["shot1"]["miou"] < 100 and 0 < metrics["shot1"]["prior_miou"] < 100, resize
    # the same VTP maps, scored three ways (the smoke model itself is too weak to tell them apart)
    assert len({m["shot1"]["prior_miou"] for m in got.values()}) == 3
    assert abs(got["hsnet"]["shot1"]["miou"] - got["original"]["shot1"]["miou"]) < 5  # same input, resampled
