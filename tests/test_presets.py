"""The papers' presets: applied to params.yaml with its comments kept, validated, and run on a
synthetic dataset laid out like VOC and like COCO."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config.presets import apply_preset, main
from pipeline.core.errors import PipelineError
from pipeline.core.params import load_params

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"configs/pascal-5i.yaml": ("pascal", "VOC2012"), "configs/coco-20i.yaml": ("coco", "COCO")}


LAYOUTS = {"pascal": ("JPEGImages/", "SegmentationClassAug/", "ImageSets/Segmentation/val.txt"),
           "coco": ("train2014/", "val2014/", "annotations/instances_train2014.json",
                    "annotations/instances_val2014.json")}


def empty_layout(root: Path, name: str, leave_out: str = "") -> Path:
    """The folders and (empty) files of ``name``'s layout under ``root``, but ``leave_out``."""
    for item in LAYOUTS[name]:
        if item != leave_out:
            (root / item).parent.mkdir(parents=True, exist_ok=True)
            (root / item).mkdir() if item.endswith("/") else (root / item).touch()
    return root


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_preset_writes_its_values_and_keeps_every_comment(tmp_path, preset):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    empty_layout(tmp_path / "x", PRESETS[preset][0])
    apply_preset(params, REPO / preset, ["dataset.root=x", "train.epochs=7"])  # relative to params.yaml
    got, wanted = load_params(params), yaml.safe_load((REPO / preset).read_text())
    assert got.dataset.name == PRESETS[preset][0] and got.dataset.root == "x" and got.train.epochs == 7
    assert got.backbone.model_dump().items() >= wanted["backbone"].items()
    assert got.clip.model == "ViT-B-16" and got.clip.pretrained == "openai" and got.priors.image_size == 473
    assert got.orchestration == load_params(REPO / "params.yaml").orchestration  # untouched keys kept
    before, after = (REPO / "params.yaml").read_text(), params.read_text()
    comments = [line.split("#", 1)[1] for line in before.splitlines() if "#" in line]
    assert all(c in after for c in comments)
    assert "seeds: [0]" in after and "root: x" in after and "cache_dir: null" in after


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_missing_or_wrong_dataset_root_is_one_line_before_params_yaml_is_written(tmp_path, capsys, preset):
    """`make repro CONFIG=... DATASET_ROOT=/no/such` used to write params.yaml and let DVC remove
    data/synthetic and data/index before `prepare` failed: the root is checked first."""
    from pipeline.config.check import main as check

    name = PRESETS[preset][0]
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_text()
    missing = LAYOUTS[name][-1]
    cases = [(tmp_path / "no" / "such", "no such directory"),
             (empty_layout(tmp_path / "partial", name, leave_out=missing),
              f"not a {'VOC2012' if name == 'pascal' else 'COCO2014'} folder"),
             (tmp_path / "params.yaml", "no such directory")]  # a file is no root either
    for root, expected in cases:
        assert main([str(REPO / preset), "--set", f"dataset.root={root}", "--params", str(params)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {params} with {REPO / preset}: dataset.root = '{root}': {expected}")
        assert "\n" not in err and params.read_text() == before
        if root == cases[1][0]:
            assert err.endswith(f"(missing {missing.rstrip('/')})"), err
    # the same check guards a params.yaml edited by hand, before `make repro` hands it to DVC
    written = tmp_path / "written.yaml"
    written.write_text(before.replace("name: synthetic", f"name: {name}").replace(
        "root: null", f"root: {tmp_path / 'no' / 'such'}"))
    assert check([str(written)]) == 1
    assert f"dataset.root = '{tmp_path / 'no' / 'such'}': no such directory" in capsys.readouterr().err
    empty_layout(tmp_path / "whole", name)
    written.write_text(before.replace("name: synthetic", f"name: {name}").replace(
        "root: null", f"root: {tmp_path / 'whole'}"))
    assert check([str(written)]) == 0


def test_a_bad_preset_value_is_one_line_and_leaves_params_as_they_were(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_text()
    assert main([str(REPO / "configs/pascal-5i.yaml"), "--params", str(params)]) == 1  # no root
    assert "dataset.root: required for dataset.name = 'pascal'" in capsys.readouterr().err
    assert main(["--set", "train.augment=papers", "--params", str(params)]) == 1
    assert "train.augment = 'papers': needs train.features = 'online'" in capsys.readouterr().err
    with pytest.raises(PipelineError, match="no such preset"):
        apply_preset(params, tmp_path / "missing.yaml", [])
    assert params.read_text() == before


def as_coco_2014(root: Path) -> None:
    """The synthetic COCO layout with COCO-2014's 80 categories: shape class k of image i becomes
    category 4 k + a mod 4 of its annotation a (in sorted-id order), so every category has images."""
    from pipeline.datasets.catalog.coco import CLASS_NAMES

    for path in (root / "annotations").glob("instances_*2014.json"):
        data = json.loads(path.read_text())
        shape = {c["id"]: k for k, c in enumerate(data["categories"])}
        data["categories"] = [{"id": k + 1, "name": n, "supercategory": "x"}
                              for k, n in enumerate(CLASS_NAMES)]
        for ann in data["annotations"]:
            ann["category_id"] = 4 * shape[ann["category_id"]] + ann["id"] % 4 + 1
        path.write_text(json.dumps(data))


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_preset_indexes_a_dataset_of_its_layout_and_dvc_plans_every_stage(tmp_path, preset, prefect_server):
    """The embedded generator writes its benchmark as VOC and as COCO: the preset's adapter reads
    it, the split and episodes follow the preset's protocol, and `dvc repro --dry` plans the rest."""
    from tests.conftest import SMOKE, run_first_stages, write_benchmark

    name, layout = PRESETS[preset]
    coco_size = {"train_images": 800, "val_images": 800}  # 80 classes: every one needs images in each role
    size = {"caption_images": 0, **(coco_size if name == "coco" else {})}
    write_benchmark(tmp_path / "synthetic", SMOKE.model_copy(update=size))
    if name == "coco":
        as_coco_2014(tmp_path / "synthetic" / layout)
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("pipeline", "stages", "fixtures", "ablations", "references", "dvc.yaml", "params.yaml"):
        (shutil.copytree if (REPO / item).is_dir() else shutil.copy)(REPO / item, repo / item)
    small = [f"dataset.root={tmp_path / 'synthetic' / layout}", "episodes.test_episodes=20",
             "episodes.val_episodes=10", "episodes.shots=[1]", "split.min_pixels=1",
             "split.novel_in_train=mask"]
    apply_preset(repo / "params.yaml", REPO / preset, small)
    run_first_stages(repo / "params.yaml", repo / "data")
    meta = yaml.safe_load((repo / "data/episodes/meta.json").read_text())
    assert meta["train_sampling"] == "epoch" and meta["protocol"] == "hsnet"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)

    def dvc(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    # a dry run stops at the first stage whose inputs no earlier stage has made yet (DVC #9021): plan
    # the stages this test made the inputs of, and check the graph holds every other
    planned = dvc("repro", "--dry", "episodes")
    assert all(f"Running stage '{s}'" in planned for s in ("prepare", "split", "episodes"))
    graph = dvc("dag", "--md")
    for stage in ("clip_model", "priors", "features", "pseudo_masks", "train@0", "evaluate@3", "report"):
        assert stage in graph
