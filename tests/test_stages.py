"""The stages end to end, as DVC runs them, on a smoke-size benchmark."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from pipeline.clip.loader import save_local_dir
from pipeline.core.params import ModelParams, load_params
from pipeline.datasets import synthetic_writer
from pipeline.priors.store import PriorStore
from pipeline.tinyclip.model import build_tiny
from stages import clip_model, episodes, prepare, priors, split
from tests.conftest import SMOKE, run_first_stages
from tests.test_adapters import make_voc

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# DataLoader workers forked from a process that has run a Prefect flow (this test session; never a
# train/evaluate stage process, which runs none) may exit with code 1: tests that decode images in
# their batches (online features, letterboxed evaluation) read them in the main process.
IN_PROCESS = {"orchestration": {"loader_workers": 0}}
SMOKE_PARAMS = {
    # images of mixed sizes and aspect ratios, as VOC / COCO: every stage below runs on them
    "prepare": {"synthetic": {**SMOKE.model_dump(), "mixed_sizes": True}},
    "clip": {"tiny": {"batch_size": 8, "phase1_steps": 12, "phase2_steps": 4, "warmup": 2,
                      "dtype": "fp32"},
             "zero_shot_images": 40, "dense_eval_images": 20},
    # two test seeds of 30: the 60 test episodes a fold and shot of one seed before, and a std
    "episodes": {"test_episodes": 30, "seeds": [0, 1], "train_episodes": 50, "val_episodes": 20},
    "priors": {"shard_size": 64},
    "train": {"epochs": 1, "batch_size": 8},
    "model": {"hidden": 8},
}


def write_params(path: Path, overrides: dict | None = None) -> Path:
    """The shipped params.yaml at smoke size, with ``{section: {key: value}}`` overrides."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in [*SMOKE_PARAMS.items(), *(overrides or {}).items()]:
        params[section] = {**(params.get(section) or {}), **values}
    path.write_text(yaml.safe_dump(params))
    return path


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, prefect_server) -> Path:
    """prepare -> split -> episodes through the stages' main(), as DVC calls them."""
    out = tmp_path_factory.mktemp("run")
    run_first_stages(write_params(out / "params.yaml"), out)
    return out


def test_pipeline_outputs(pipeline_run):
    index = pq.read_table(pipeline_run / "index" / "index.parquet").to_pandas()
    assert len(index) == SMOKE.train_images + SMOKE.val_images
    assert (index["split"] == "train").sum() == SMOKE.train_images
    meta = json.loads((pipeline_run / "splits" / "meta.json").read_text())
    assert [f["novel"] for f in meta["folds"]] == [list(range(5 * i + 1, 5 * i + 6)) for i in range(4)]
    area = float((index["height"] * index["width"]).median())
    assert meta["min_pixels"] == round(2048 * area / (500 * 375))  # auto: PFENet's 2048 px on 500 x 375
    assert index[["height", "width"]].drop_duplicates().shape[0] > 20  # mixed sizes
    manifests = json.loads((pipeline_run / "episodes" / "meta.json").read_text())["files"]
    assert len(manifests) == 4 * (2 * 2 + 2)  # per fold: shot 1 and 5 test of 2 seeds, train, val
    test = pq.read_table(pipeline_run / "episodes/test/fold2/shot5_seed0.parquet").to_pandas()
    pairs = pq.read_table(pipeline_run / "splits/pairs.parquet").to_pandas()
    fold_test = pairs[(pairs.fold == 2) & (pairs.role == "test")].reset_index(drop=True)
    # the pfenet protocol: each seed draws distinct test pairs of the fold in its own random order
    drawn = list(zip(test["query"], test["class_id"], strict=True))
    assert set(drawn) <= set(zip(fold_test["image_id"], fold_test["class_id"], strict=True))
    assert len(set(drawn)) == min(len(test), len(fold_test))
    other = pq.read_table(pipeline_run / "episodes/test/fold2/shot5_seed1.parquet").to_pandas()
    assert list(other["query"]) != list(test["query"])
    assert set(test["class_id"]) == set(range(11, 16)) and all(len(s) == 5 for s in test["supports"])
    train = pq.read_table(pipeline_run / "episodes/train/fold2.parquet").to_pandas()
    assert not set(train["class_id"]) & set(range(11, 16))  # base classes only


def test_rebuild_of_episodes_is_byte_identical(pipeline_run, tmp_path):
    params = str(write_params(tmp_path / "params.yaml"))
    assert episodes.main(["--params", params, "--splits", str(pipeline_run / "splits"),
                          "--out", str(tmp_path / "again")]) == 0
    assert files_of(tmp_path / "again") == files_of(pipeline_run / "episodes")


def test_expected_errors_are_one_line_with_no_artifact(pipeline_run, tmp_path, capsys):
    cases = [
        ({"dataset": {"name": "pascal", "root": str(tmp_path / "nowhere")}},
         prepare, ["--synthetic", str(tmp_path / "s"), "--index", str(tmp_path / "i")],
         "no such directory"),
        ({"episodes": {"shots": [1, 50]}},
         episodes, ["--splits", str(pipeline_run / "splits"), "--out", str(tmp_path / "e")],
         "episodes.shots: 50-shot needs 51 images of class"),
        ({"split": {"custom_folds": [["circle", "dog"]]}},
         split, ["--index", str(pipeline_run / "index"), "--out", str(tmp_path / "sp")],
         "split.custom_folds: unknown class name 'dog'"),
        ({"clip": {"model": "tiny-vit"}},
         clip_model, ["--synthetic", str(tmp_path / "nothing"), "--out", str(tmp_path / "m"),
                      "--metrics", str(tmp_path / "clip.json")],
         "clip.model = 'tiny-vit' is made from the synthetic benchmark's caption corpus"),
        ({"clip": {"model": "tiny-vit", "pretrained": "openai"}},
         clip_model, ["--out", str(tmp_path / "m")], "the tiny models are trained by the clip_model stage"),
        ({"split": {"min_pixels": -1}},
         split, ["--index", str(pipeline_run / "index"), "--out", str(tmp_path / "sp")],
         "split.min_pixels = -1"),
    ]
    for overrides, stage, paths, expected in cases:
        params = str(write_params(tmp_path / "params.yaml", overrides))
        assert stage.main(["--params", params, *paths]) == 1
        err = capsys.readouterr().err.strip()
        assert expected in err and err.startswith("error: ") and "\n" not in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_error_inside_a_task_is_one_line_on_the_whole_stderr(tmp_path):
    """As DVC runs it: a subprocess, Prefect's own logging included."""
    root = make_voc(tmp_path / "VOC2012", ["a", "b"], ["c"])
    (root / "JPEGImages" / "b.jpg").write_bytes(b"truncated")
    params = write_params(tmp_path / "params.yaml", {"dataset": {"name": "pascal", "root": str(root)}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    done = subprocess.run(
        [sys.executable, "-m", "stages.prepare", "--params", str(params),
         "--synthetic", str(tmp_path / "out" / "synthetic"), "--index", str(tmp_path / "out" / "index")],
        cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if "index shards" not in line and line.strip()]
    assert lines == [f"error: {root / 'JPEGImages' / 'b.jpg'}: unreadable image "
                     "(cannot identify image file '" + str(root / "JPEGImages" / "b.jpg") + "')"], done.stderr
    assert not (tmp_path / "out" / "index").exists() and not (tmp_path / "out" / "synthetic").exists()


def test_prepare_resumes_after_a_crash(pipeline_run, tmp_path, monkeypatch):
    params = str(write_params(tmp_path / "params.yaml"))
    args = ["--params", params, "--synthetic", str(tmp_path / "synthetic"),
            "--index", str(tmp_path / "index")]
    real, calls, crashed = synthetic_writer.write_benchmark_shard, [], []

    def crash_once_on_third(root, split_name, indices, cfg):
        calls.append(f"{split_name}-{indices.start:06d}")
        if len(calls) == 3 and not crashed:
            crashed.append(True)
            raise RuntimeError("simulated crash")
        real(root, split_name, indices, cfg)

    monkeypatch.setattr(synthetic_writer, "write_benchmark_shard", crash_once_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare.main(args)
    assert not (tmp_path / "synthetic").exists()  # nothing half-written in place
    finished = {p.name for p in (tmp_path / ".synthetic.partial" / ".done").iterdir()}
    assert finished >= set(calls) - {calls[2]}  # every shard but the failed one was kept
    calls.clear()
    assert prepare.main(args) == 0
    shards = {f"{s}-{start:06d}" for s, n in (("train", SMOKE.train_images), ("val", SMOKE.val_images))
              for start in range(0, n, SMOKE.shard_size)}
    assert finished & shards  # something was resumed, not redone
    assert set(calls) == shards - finished
    assert files_of(tmp_path / "synthetic") == files_of(pipeline_run / "synthetic")


def test_prepare_fails_on_a_truncated_image_or_skips_and_lists_it(tmp_path, prefect_server, capsys):
    root = make_voc(tmp_path / "VOC2012", ["a", "b", "c"], ["d", "e"], size=(60, 80))
    jpeg = (root / "JPEGImages" / "b.jpg").read_bytes()
    (root / "JPEGImages" / "b.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # its header still reads
    paths = ["--synthetic", str(tmp_path / "synthetic"), "--index", str(tmp_path / "index")]
    for on_bad in ("fail", "skip"):
        params = write_params(tmp_path / "params.yaml", {"dataset": {"name": "pascal", "root": str(root)},
                                                         "prepare": {"on_bad_image": on_bad}})
        code = prepare.main(["--params", str(params), *paths])
        if on_bad == "fail":
            err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
            assert code == 1 and err.startswith(f"error: {root / 'JPEGImages' / 'b.jpg'}: unreadable image "
                                                "(image file is truncated") and "\n" not in err, err
            assert not (tmp_path / "index").exists()
    assert code == 0
    meta = json.loads((tmp_path / "index/meta.json").read_text())
    assert meta["images"] == {"train": 2, "val": 2} and len(meta["skipped"]) == 1
    assert meta["skipped"][0].startswith(f"{root / 'JPEGImages' / 'b.jpg'}: unreadable image")
    assert "1 broken ones skipped" in capsys.readouterr().out


def test_dvc_reruns_only_the_stages_a_param_touches(tmp_path):
    """`dvc repro` in a copy of the project; then which stages does each param change dirty?"""
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("pipeline", "stages", "fixtures", "ablations", "dvc.yaml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    write_params(repo / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(repo)}
    env.pop("PREFECT_API_URL", None)  # each stage is its own process, as under DVC

    def run(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    # a clone has commits (DVCLive's Live() fails in a git repo without any: scmrepo "Empty git repo")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "code")
    run(sys.executable, "-m", "stages._prefect_server", sys.executable, "-m", "dvc", "repro")  # as make repro

    def dirty_after(overrides: dict) -> set[str]:
        write_params(repo / "params.yaml", overrides)
        status = json.loads(run(sys.executable, "-m", "dvc", "status", "--json"))
        return set(status)

    assert dirty_after({}) == set()
    # a collaborator's clone gets every artifact from the remote instead of recomputing it
    run(sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    run(sys.executable, "-m", "dvc", "push", "-q")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run")
    run("git", "clone", "-q", str(repo), str(tmp_path / "clone"))
    clone = {**env, "PYTHONPATH": str(tmp_path / "clone")}

    def in_clone(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=tmp_path / "clone", env=clone, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    in_clone(sys.executable, "-m", "dvc", "pull", "-q")
    assert json.loads(in_clone(sys.executable, "-m", "dvc", "status", "--json")) == {}
    assert "up to date" in in_clone(sys.executable, "-m", "dvc", "repro")
    for output in ("reports/metrics.json", "data/models/fold0/model.pt"):
        assert (tmp_path / "clone" / output).read_bytes() == (repo / output).read_bytes()
    # the report lists the params its provenance shows (dataset, split, episodes, backbone, ...)
    assert dirty_after({"episodes": {"test_episodes": 61}}) == {"episodes", "report"}
    assert dirty_after({"split": {"novel_in_train": "mask"}}) == {"split", "report"}
    assert dirty_after({"orchestration": {"task_runner": "processes"}}) == set()
    assert dirty_after({"clip": {"zero_shot_images": 41}}) == {"clip_model"}
    assert dirty_after({"priors": {"pir_threshold": 0.5}}) == {"priors"}
    assert dirty_after({"pseudo_masks": {"alpha": 0.3}}) == {"pseudo_masks"}
    assert dirty_after({"backbone": {"image_size": 96}}) == {"features", "pseudo_masks", "report"}
    folds = {f"train@{k}" for k in range(4)}
    assert dirty_after({"model": {"vvp": False}}) == folds
    assert dirty_after({"train": {"lr": 0.002}}) == folds
    out = run(sys.executable, "-m", "dvc", "repro", "--dry")
    assert all(f"Running stage '{s}'" in out for s in folds)
    assert not any(f"Running stage '{s}'" in out for s in ("features", "priors", "pseudo_masks", "episodes"))
    assert dirty_after({"prepare": {"synthetic": {**SMOKE.model_dump(), "seed": 1}}}) == {"prepare"}
    clip = json.loads((repo / "data/metrics/clip.json").read_text())
    assert clip["model"] == "tiny-vit" and clip["source"] == "trained"  # smoke params: no fixture matches
    # the caption corpus is rendered by clip_model, for its training only, and not kept
    assert not list(repo.glob("data/**/captions")) and not list(repo.glob("data/.*.partial"))
    assert (repo / "data/priors_preview.png").is_file() and (repo / "data/pseudo_masks.zarr").is_dir()
    assert "fold0" in json.loads((repo / "data/metrics/pseudo_masks.json").read_text())
    for k in range(4):
        assert "prior_miou" in json.loads((repo / f"data/metrics/fold{k}.json").read_text())["shot1"]
    summary = json.loads((repo / "reports/metrics.json").read_text())
    assert set(summary["shot1"]["mean"]) == {"miou", "fbiou"} and "prior_miou" in summary
    shown = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=repo, env=env,
                           capture_output=True, text=True, check=True).stdout

    def leaves(tree: object) -> int:
        return sum(leaves(v) for v in tree.values()) if isinstance(tree, dict) else 1

    assert leaves(json.loads(shown)) <= 25  # headline figures only (DVCLive's included)
    assert "Novel-class mIoU" in (repo / "reports/report.html").read_text()
    assert r"\begin{tabular}" in (repo / "reports/tables.tex").read_text()
    dirty_after({"episodes": {"shots": [1, 2]}})
    out = run(sys.executable, "-m", "dvc", "repro", "--dry")
    assert "Running stage 'episodes'" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'split'" not in out


@pytest.fixture(scope="module")
def priors_run(pipeline_run) -> Path:
    """The priors stage with an untrained tiny CLIP (shapes and plumbing, not quality)."""
    save_local_dir(build_tiny("tiny-vit", 0), pipeline_run / "clip")
    assert priors.main(priors_args(pipeline_run, pipeline_run / "priors.zarr")) == 0
    return pipeline_run / "priors.zarr"


def priors_args(run: Path, out: Path, overrides: dict | None = None) -> list[str]:
    params = write_params(out.parent / f"{out.name}.params.yaml", overrides)
    return ["--params", str(params), "--index", str(run / "index"), "--episodes", str(run / "episodes"),
            "--clip", str(run / "clip"), "--out", str(out), "--preview", str(out.parent / f"{out.name}.png")]


def zarr_arrays(path: Path) -> dict[str, np.ndarray]:
    import zarr

    return {name: a[:] for name, a in zarr.open_group(path, mode="r").members(max_depth=None)
            if isinstance(a, zarr.Array)}


def test_priors_cover_every_episode_and_round_trip(priors_run, pipeline_run):
    from pipeline.datasets.episodes import image_classes, read_manifests
    from pipeline.priors.shards import load_extractor

    store = PriorStore(priors_run)
    manifests = read_manifests(pipeline_run / "episodes")
    wanted = image_classes(manifests.values())
    assert store.attrs["image_ids"] == sorted(wanted)
    got = store.pairs.groupby("image_id")["class_id"].apply(sorted).to_dict()
    assert got == wanted
    assert store.attrs["clip_sha256"] == (pipeline_run / "clip/sha256.txt").read_text().strip()
    h, w = store.attrs["grid"]
    assert (h, w) == (8, 8) and store.attrs["preprocess"]["size"] == 128
    assert not any(name.startswith("episodes") for name in store.root)  # VVP is the model's, not stored
    last = manifests["test/fold1/shot5_seed0"].iloc[-1]
    index = pq.read_table(pipeline_run / "index/index.parquet").to_pandas().set_index("image_id")
    masks = [np.asarray(Image.open(index.at[s, "mask_path"])) == last["class_id"] for s in last["supports"]]
    maps = store.vvp(last["query"], list(last["supports"]), masks)
    assert maps.shape == (5, 2, 8, 8) and maps.max() == 1 and maps.min() == 0
    # what the store holds equals a direct extraction of the same images (float16 round trip)
    ids = store.attrs["image_ids"][:3]
    cfg = load_params(priors_run.parent / "priors.zarr.params.yaml").priors
    ex = load_extractor(pipeline_run / "clip", cfg, store.attrs["class_names"])
    direct = ex.priors(ex.load_images([index.at[i, "image_path"] for i in ids]), [wanted[i] for i in ids],
                       [list(index.at[i, "class_ids"]) for i in ids])
    flat = [(i, c) for i in ids for c in wanted[i]]
    for p, (image, c) in enumerate(flat):
        assert np.allclose(store.vtp(image, c), direct.vtp[p].numpy(), atol=2e-3)
        assert np.allclose(store.vtp(image, c, refined=True), direct.pir[p].numpy(), atol=2e-3)
    assert np.array_equal(store.maskclip_labels(ids[0]), direct.maskclip_labels[0].numpy())
    pixels = store.maskclip_labels(ids[0], size=(64, 48))
    assert pixels.shape == (64, 48) and set(np.unique(pixels)) <= set(range(1, 21))
    assert (priors_run.parent / "priors.zarr.png").stat().st_size > 10_000


def test_priors_resume_after_a_crash_computes_only_missing_shards(priors_run, pipeline_run, tmp_path,
                                                                  monkeypatch):
    real, calls = priors.extract_image_shard, []

    def crash_on_second(root, rows, *args):
        calls.append(rows.start)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        real(root, rows, *args)

    monkeypatch.setattr(priors, "extract_image_shard", crash_on_second)
    out = tmp_path / "priors.zarr"
    with pytest.raises(RuntimeError, match="simulated crash"):
        priors.main(priors_args(pipeline_run, out))  # same threads per task as the run it is compared with
    assert not out.exists()  # nothing half-written in place
    finished = {p.name for p in (tmp_path / ".priors.zarr.partial" / ".done").iterdir()}
    crashed = f"images-{calls[1]:07d}"
    assert crashed not in finished and f"images-{calls[0]:07d}" in finished
    calls.clear()
    assert priors.main(priors_args(pipeline_run, out)) == 0
    assert [f"images-{c:07d}" for c in calls] == [crashed]  # only what was missing
    expected, got = zarr_arrays(priors_run), zarr_arrays(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name


def test_priors_run_on_a_dask_local_cluster(priors_run, pipeline_run, tmp_path):
    out = tmp_path / "priors.zarr"
    args = priors_args(pipeline_run, out, {"orchestration": {"task_runner": "dask", "max_workers": 2},
                                           "priors": {"shard_size": 128}})
    assert priors.main(args) == 0
    expected, got = zarr_arrays(priors_run), zarr_arrays(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.allclose(expected[name].astype(np.float32), got[name].astype(np.float32), atol=2e-3), name


@pytest.fixture(scope="module")
def features_run(priors_run, pipeline_run) -> Path:
    from stages import features

    run = pipeline_run
    assert features.main(["--params", str(write_params(run / "features.params.yaml")),
                          "--index", str(run / "index"), "--episodes", str(run / "episodes"),
                          "--clip", str(run / "clip"), "--out", str(run / "features.zarr")]) == 0
    return pipeline_run / "features.zarr"


def test_features_are_the_backbones_for_every_episode_image(features_run, pipeline_run):
    from pipeline.clip.loader import load_local_dir
    from pipeline.core.images import load_normalized
    from pipeline.datasets.episodes import episode_images, read_manifests
    from pipeline.features.backbone import build_backbone
    from pipeline.features.store import FeatureStore

    store = FeatureStore(features_run)
    assert store.attrs["image_ids"] == episode_images(read_manifests(pipeline_run / "episodes").values())
    index = pq.read_table(pipeline_run / "index/index.parquet").to_pandas().set_index("image_id")
    ids = store.attrs["image_ids"][-3:]
    net = build_backbone("clip", load_local_dir(pipeline_run / "clip"))
    direct = net(load_normalized([index.at[i, "image_path"] for i in ids], 256, net.mean, net.std))
    assert store.read(ids).shape == direct.shape == (3, 192, 16, 16)
    assert torch.allclose(store.read(ids).float(), direct, atol=2e-2, rtol=1e-2)  # float16 storage


def test_pseudo_masks_stage_writes_masks_and_their_miou(priors_run, features_run, pipeline_run, tmp_path):
    import zarr

    from pipeline.datasets.episodes import read_manifests
    from stages import pseudo_masks

    out, metrics = tmp_path / "pseudo_masks.zarr", tmp_path / "pseudo_masks.json"
    params = write_params(tmp_path / "params.yaml")
    assert pseudo_masks.main(["--params", str(params), "--index", str(pipeline_run / "index"),
                              "--episodes", str(pipeline_run / "episodes"), "--priors", str(priors_run),
                              "--features", str(features_run), "--out", str(out),
                              "--metrics", str(metrics)]) == 0
    report = json.loads(metrics.read_text())
    assert sorted(k for k in report if k.startswith("fold")) == ["fold0", "fold1", "fold2", "fold3"]
    assert set(report["mean"]) == {f"{role}_{kind}_{figure}" for role in ("support", "query")
                                   for kind in ("initial", "refined")
                                   for figure in ("miou", "precision", "recall", "missed")}
    assert all(0 <= v <= 100 for v in report["mean"].values())
    root, store = zarr.open_group(out, mode="r"), PriorStore(priors_run)
    manifests = read_manifests(pipeline_run / "episodes")
    size = load_params(params).backbone.image_size
    for name in ("test/fold0/shot5_seed0", "train/fold1"):
        table = manifests[name]
        assert root[f"{name}/support_refined"].shape == (len(table), int(table["shot"].max()), size, size)
        row = table.iloc[-1]
        expected = store.maskclip_labels(row["query"], size=(size, size)) == row["class_id"]
        assert np.array_equal(root[f"{name}/query_initial"][len(table) - 1], expected)


@pytest.fixture(scope="module")
def model_inputs(priors_run, features_run, pipeline_run) -> Path:
    """Pseudo-masks next to the smoke run (train and evaluate read them with the features)."""
    from stages import pseudo_masks

    params = write_params(pipeline_run / "model.params.yaml", TRAIN_SMOKE)
    assert pseudo_masks.main(["--params", str(params), "--index", str(pipeline_run / "index"),
                              "--episodes", str(pipeline_run / "episodes"), "--priors", str(priors_run),
                              "--features", str(features_run),
                              "--out", str(pipeline_run / "pseudo_masks.zarr"),
                              "--metrics", str(pipeline_run / "pseudo_masks.json")]) == 0
    return params


TRAIN_SMOKE = {"train": {"epochs": 2, "batch_size": 8}, "model": {"hidden": 8}}


def model_args(run: Path, params: Path, out: Path) -> list[str]:
    return ["--params", str(params), "--index", str(run / "index"), "--episodes", str(run / "episodes"),
            "--features", str(run / "features.zarr"), "--priors", str(run / "priors.zarr"),
            "--pseudo_masks", str(run / "pseudo_masks.zarr"), "--models", str(out / "models"), "--fold", "1"]


def test_train_resumes_then_evaluate_reports_model_and_priors(model_inputs, pipeline_run, tmp_path,
                                                              monkeypatch):
    from pipeline.fewshot import train as train_lib
    from stages import evaluate, train

    real, calls = train_lib.episode_loss, []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # 50 episodes / 8 per step = 7 steps per epoch
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    args = model_args(pipeline_run, model_inputs, tmp_path) + ["--plots", str(tmp_path / "plots")]
    monkeypatch.setattr(train_lib, "episode_loss", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(args)
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
    monkeypatch.setattr(train_lib, "episode_loss", real)
    again = tmp_path / "again"
    assert train.main(model_args(pipeline_run, model_inputs, again) + ["--plots", str(again / "plots")]) == 0
    curve_files = ("plots/fold1/plots/metrics/val_miou.tsv", "plots/fold1/metrics.json")
    for path in ("models/fold1/model.pt", *curve_files):  # resumed == uninterrupted, byte for byte
        assert (again / path).read_bytes() == (tmp_path / path).read_bytes(), path

    metrics_dir = tmp_path / "metrics"
    eval_args = [*model_args(pipeline_run, model_inputs, tmp_path), "--metrics", str(metrics_dir),
                 "--predictions", str(tmp_path / "predictions")]
    assert evaluate.main(eval_args) == 0
    report = json.loads((metrics_dir / "fold1.json").read_text())
    novel = {"ring", "cross", "crescent", "hexagon", "pentagon"}  # fold 1: classes 6-10
    for shot in ("shot1", "shot5"):
        figures = report[shot]
        assert all(0 <= figures[key] <= 100 for key in ("miou", "prior_miou", "fbiou"))
        seeds = [s["miou"] for s in figures["seeds"].values()]
        assert set(figures["class_iou"]) <= novel
        assert figures["miou"] == pytest.approx(np.mean(seeds), abs=0.01)
    assert 0.1 <= report["prior_threshold"] <= 0.9
    assert (tmp_path / "predictions/fold1.npz").is_file()  # nothing written outside the given paths
    from pipeline.report.stats import Scores

    counts = pd.read_parquet(metrics_dir / "fold1_episodes.parquet")  # what the ablations' bootstrap reads
    for shot in (1, 5):
        mine = counts[counts["shot"] == shot]
        for seed in (0, 1):
            assert list(mine[mine["seed"] == seed]["episode"]) == list(range(30))  # in manifest order
        assert Scores.of([mine]).miou() == pytest.approx(report[f"shot{shot}"]["miou"], abs=0.01)


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
                          "--predictions", str(tmp_path / "predictions")]) == 0
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
                          "--predictions", str(tmp_path / "predictions")]) == 0
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
    from pipeline.fewshot.train import episode_loss, make_step, with_features
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
    step = make_step(table, bank, first, params.train, online.source, seed=0)
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
    viewed = [make_step(table, bank, first, params.train, online.source, seed=s) for s in (0, 0, 1)]
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
        assert evaluate.main([*args, "--metrics", str(out), "--predictions", str(out)]) == 0
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


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_training_within_seconds_and_a_rerun_resumes(model_inputs, pipeline_run, tmp_path,
                                                                     sig):
    """Ctrl-C (SIGINT: also when the launcher ignores it, as a script's background job does) and
    SIGTERM stop ``train@k`` within seconds with one line and status 130, the epoch checkpoint
    kept; a rerun resumes from it."""
    import signal
    import time

    params = write_params(tmp_path / "params.yaml", {"train": {"epochs": 20, "batch_size": 8},
                                                     "model": {"hidden": 8}})
    cmd = [sys.executable, "-m", "stages.train", *model_args(pipeline_run, params, tmp_path),
           "--plots", str(tmp_path / "plots")]
    checkpoint = tmp_path / "models/.fold1.partial/checkpoint.pt"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), proc.communicate()[0][-2000:]
    sent = time.monotonic()
    proc.send_signal(getattr(signal, sig))
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and time.monotonic() - sent < 15, out[-2000:]
    assert f"train: stopped by {sig}" in out and "Traceback" not in out
    assert checkpoint.exists() and not (tmp_path / "models/fold1").exists()
    if sig == "SIGINT":
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        epochs = [int(e) for e in re.findall(r"fold 1 epoch (\d+):", done.stdout + done.stderr)]
        assert epochs and epochs[0] > 1 and epochs[-1] == 20  # resumed, not restarted
        assert (tmp_path / "models/fold1/model.pt").is_file()


# --- SIGKILL: no handler runs, nothing is flushed; a re-run of the stage itself must recover ----------

def children(pid: int) -> set[int]:
    """The child processes of ``pid`` (a Prefect server, task-runner workers)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def signal_when(cmd: list[str], ready, log: Path, sig: str = "SIGKILL", timeout: float = 300) -> dict:
    """Run a stage in a process of its own and send it ``sig`` as soon as ``ready()``; no child of
    it (its Prefect server, task-runner workers) may outlive it by more than a few seconds.
    Returns its exit status, the seconds it took to exit after the signal, its children then and
    its output."""
    import signal
    import time

    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"})
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the signal: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.02)
    orphans = had = children(proc.pid)
    sent = time.monotonic()
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=120)
    seconds = time.monotonic() - sent
    while orphans and time.monotonic() < sent + 15:
        orphans = {c for c in orphans if Path(f"/proc/{c}").exists()
                   and Path(f"/proc/{c}/stat").read_text().split()[2] != "Z"}
        time.sleep(0.2)
    assert not orphans, f"left running after {sig}: {orphans}"
    return {"status": proc.returncode, "seconds": seconds, "children": had, "output": log.read_text()}


def truncate_a_finished_shard(partial: Path) -> str:
    """Cut the first file a finished shard recorded to half its size; returns the shard."""
    for marker in sorted((partial / ".done").iterdir()):
        record = json.loads(marker.read_text())
        name = next((n for n, digest in sorted(record.items()) if digest), None)
        if name:
            data = (partial / name).read_bytes()
            (partial / name).write_bytes(data[: len(data) // 2])
            return marker.name
    raise AssertionError(f"no finished shard with files in {partial}")


def test_priors_killed_then_rerun_equal_an_uninterrupted_run(priors_run, pipeline_run, tmp_path, capsys):
    """SIGKILL once a shard is finished, then a finished shard's file cut short on disk: the re-run
    redoes that shard and the missing ones, and the store equals an uninterrupted run bit for bit."""
    out = tmp_path / "priors.zarr"
    args = priors_args(pipeline_run, out)
    partial = tmp_path / ".priors.zarr.partial"
    killed = signal_when([sys.executable, "-m", "stages.priors", *args],
                         lambda: any((partial / ".done").glob("images-*")), tmp_path / "killed.log")
    assert killed["children"]  # a stage run by hand starts its own Prefect server: it went too
    assert not out.exists()
    shard = truncate_a_finished_shard(partial)
    assert priors.main(args) == 0
    assert f"shard {shard}: " in capsys.readouterr().err
    expected, got = zarr_arrays(priors_run), zarr_arrays(out)
    assert expected.keys() == got.keys() and not partial.exists()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name


def test_pseudo_masks_killed_then_rerun_equal_an_uninterrupted_run(model_inputs, pipeline_run, tmp_path,
                                                                   capsys):
    from stages import pseudo_masks

    out, partial = tmp_path / "pseudo_masks.zarr", tmp_path / ".pseudo_masks.zarr.partial"
    args = ["--params", str(model_inputs), "--index", str(pipeline_run / "index"),
            "--episodes", str(pipeline_run / "episodes"), "--priors", str(pipeline_run / "priors.zarr"),
            "--features", str(pipeline_run / "features.zarr"), "--out", str(out),
            "--metrics", str(tmp_path / "pseudo_masks.json")]
    signal_when([sys.executable, "-m", "stages.pseudo_masks", *args],
                lambda: any((partial / ".done").glob("*")), tmp_path / "killed.log")
    assert not out.exists() and not (tmp_path / "pseudo_masks.json").exists()
    shard = truncate_a_finished_shard(partial)
    assert pseudo_masks.main(args) == 0
    assert f"shard {shard}: " in capsys.readouterr().err
    expected, got = zarr_arrays(pipeline_run / "pseudo_masks.zarr"), zarr_arrays(out)
    assert expected.keys() == got.keys() and not partial.exists()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    assert (tmp_path / "pseudo_masks.json").read_bytes() == (pipeline_run / "pseudo_masks.json").read_bytes()


def test_train_and_evaluate_killed_then_rerun_equal_an_uninterrupted_run(model_inputs, pipeline_run,
                                                                         tmp_path):
    """``train@k`` SIGKILLed after its first epoch's checkpoint resumes from it; ``evaluate@k``
    SIGKILLed while it scores leaves nothing; both re-runs write the bytes of uninterrupted runs."""
    from stages import evaluate, train

    def train_args(root: Path) -> list[str]:
        return [*model_args(pipeline_run, model_inputs, root), "--plots", str(root / "plots")]

    def eval_args(root: Path) -> list[str]:
        return [*model_args(pipeline_run, model_inputs, root), "--metrics", str(root / "metrics"),
                "--predictions", str(root / "predictions")]

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert train.main(train_args(reference)) == 0 and evaluate.main(eval_args(reference)) == 0
    checkpoint = killed / "models/.fold1.partial/checkpoint.pt"
    signal_when([sys.executable, "-m", "stages.train", *train_args(killed)], checkpoint.exists,
                tmp_path / "train.log")
    assert not (killed / "models/fold1").exists()
    assert train.main(train_args(killed)) == 0
    log = tmp_path / "evaluate.log"
    signal_when([sys.executable, "-m", "stages.evaluate", *eval_args(killed)],
                lambda: "evaluate fold 1" in log.read_text(), log)
    assert not [p for d in ("metrics", "predictions") for p in (killed / d).rglob("*") if p.is_file()]
    assert evaluate.main(eval_args(killed)) == 0
    for path in ("models/fold1/model.pt", "models/fold1/model.pt.sha256", "plots/fold1/metrics.json",
                 "metrics/fold1.json", "predictions/fold1.npz"):
        assert (killed / path).read_bytes() == (reference / path).read_bytes(), path


def test_sigterm_stops_a_process_pool_stage_and_its_workers(priors_run, pipeline_run, tmp_path):
    """With ``task_runner: processes`` the tasks run in worker processes, which the stop flag does
    not reach: SIGTERM terminates them (a pool would wait for their shards), the stage exits 130
    within seconds with one line, finished shards kept, and no worker or server is left."""
    out, partial = tmp_path / "priors.zarr", tmp_path / ".priors.zarr.partial"
    args = priors_args(pipeline_run, out, {"orchestration": {"task_runner": "processes", "max_workers": 2},
                                           "priors": {"shard_size": 16}})
    stopped = signal_when([sys.executable, "-m", "stages.priors", *args],
                          lambda: any((partial / ".done").glob("images-*")), tmp_path / "stage.log",
                          "SIGTERM")
    assert stopped["status"] == 130 and stopped["seconds"] < 20, stopped["output"][-2000:]
    assert len(stopped["children"]) >= 3  # two workers and the Prefect server
    assert "priors: stopped by SIGTERM" in stopped["output"] and "Traceback" not in stopped["output"]
    assert list((partial / ".done").glob("images-*")) and not out.exists()


def test_sigint_stops_the_tiny_clip_training_and_a_rerun_resumes(pipeline_run, tmp_path, capsys):
    """``clip_model`` training the tiny CLIP (in the flow itself, not a task): Ctrl-C stops it within
    seconds, its phase-1 checkpoint kept; the re-run resumes and leaves neither the checkpoint
    nor the rendered caption corpus."""
    from stages import clip_model

    params = write_params(tmp_path / "params.yaml", {"clip": {
        **SMOKE_PARAMS["clip"], "tiny": {**SMOKE_PARAMS["clip"]["tiny"], "phase1_steps": 300,
                                         "checkpoint_every": 10}}})
    out = tmp_path / "clip"
    args = ["--params", str(params), "--synthetic", str(pipeline_run / "synthetic"), "--out", str(out),
            "--metrics", str(tmp_path / "clip.json")]
    checkpoint = tmp_path / ".clip.partial/phase1.ckpt"
    stopped = signal_when([sys.executable, "-m", "stages.clip_model", *args], checkpoint.exists,
                          tmp_path / "stage.log", "SIGINT")
    assert stopped["status"] == 130 and stopped["seconds"] < 15, stopped["output"][-2000:]
    assert "clip_model: stopped by SIGINT" in stopped["output"] and "Traceback" not in stopped["output"]
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < step < 300 and not out.exists()
    assert clip_model.main(args) == 0
    assert f"| {step}/300 [" in capsys.readouterr().err  # phase 1 went on from the checkpoint
    assert json.loads((tmp_path / "clip.json").read_text())["source"] == "trained"
    assert not (tmp_path / ".clip.partial").exists() and not list(out.rglob("phase1.ckpt"))
    assert not list(out.rglob("captions"))
