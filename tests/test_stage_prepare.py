"""prepare, split and episodes as DVC runs them, on the smoke benchmark; one-line errors of any stage;
which stages `dvc repro` re-runs after each param change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.datasets import synthetic_writer
from stages import clip_model, episodes, prepare, split
from tests.conftest import REPO, SMOKE, files_of, make_voc, write_params

pytestmark = pytest.mark.slow


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
    for item in ("pipeline", "stages", "fixtures", "ablations", "references", "dvc.yaml"):
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
    # evaluate records the conventions (its protocol in fold{k}.json), novel_in_train among them
    assert dirty_after({"split": {"novel_in_train": "mask"}}) == {"split", "report", *(f"evaluate@{k}"
                                                                                        for k in range(4))}
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
