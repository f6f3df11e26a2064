"""Shared fixtures and helpers of the tests; a test file imports a helper from here
(``from tests.conftest import ...``), never from another test file.

Sections: the environment; the small benchmark on disk; the Prefect server; params helpers;
reading artifacts; the run fixtures (the smoke pipeline, stage by stage, built once a session and
shared by ``test_stage_*.py``); a tiny VOC folder; tiny CLIP test models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

# --- the environment: before Prefect is first imported ------------------------------------------------

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from pipeline.core.params import SyntheticParams  # noqa: E402
from pipeline.datasets import synthetic_writer  # noqa: E402

if TYPE_CHECKING:
    import open_clip

# A stage run in-process sets torch's thread count for its tasks (stages/priors.py and others) and,
# as in a stage process of its own, leaves it set. Each test starts from the count a fresh process
# has (bf16 / fp32 reductions depend on it). Other state such a run leaves still moved a bf16
# weight by 4e-6: a test comparing bytes across runs runs each stage as a process of its own.
_PROCESS_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _fresh_process_threads():
    torch.set_num_threads(_PROCESS_THREADS)


# --- the small benchmark ------------------------------------------------------------------------------

SMOKE = SyntheticParams(image_size=64, train_images=120, val_images=200, caption_images=12,
                        shard_size=50)


def write_benchmark(root: Path, cfg: SyntheticParams = SMOKE) -> Path:
    """The synthetic benchmark written through the library, shard by shard."""
    for split, n in (("train", cfg.train_images), ("val", cfg.val_images)):
        for start in range(0, n, cfg.shard_size):
            synthetic_writer.write_benchmark_shard(
                root, split, range(start, min(start + cfg.shard_size, n)), cfg)
    for start in range(0, cfg.caption_images, cfg.shard_size):
        synthetic_writer.write_caption_shard(
            root, range(start, min(start + cfg.shard_size, cfg.caption_images)), cfg)
    synthetic_writer.finalize(root, cfg)
    return root


@pytest.fixture(scope="session")
def benchmark_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_benchmark(tmp_path_factory.mktemp("synthetic"))


# --- the Prefect server -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


# --- params helpers -----------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
# DataLoader workers forked from a process that has run a Prefect flow (this test session; never a
# train/evaluate stage process, which runs none) may exit with code 1: tests that decode images in
# their batches (online features, letterboxed evaluation) read them in the main process, and a test
# module that builds the session's runs in-process sorts after tests/test_fold_data.py, whose
# loaders fork (name it tests/test_stage_*.py).
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


# --- reading artifacts --------------------------------------------------------------------------------

def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def zarr_arrays(path: Path) -> dict[str, np.ndarray]:
    import zarr

    return {name: a[:] for name, a in zarr.open_group(path, mode="r").members(max_depth=None)
            if isinstance(a, zarr.Array)}


# --- the run fixtures: one smoke pipeline a session, each stage's store added to its folder -----------

def run_first_stages(params: Path | str, root: Path) -> None:
    """prepare -> split -> episodes through the stages' main(), as DVC calls them, writing
    ``root/{synthetic,index,splits,episodes}``."""
    from stages import episodes, prepare, split

    params = str(params)
    assert prepare.main(["--params", params, "--synthetic", str(root / "synthetic"),
                         "--index", str(root / "index")]) == 0
    assert split.main(["--params", params, "--index", str(root / "index"),
                       "--out", str(root / "splits")]) == 0
    assert episodes.main(["--params", params, "--splits", str(root / "splits"),
                          "--out", str(root / "episodes")]) == 0


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, prefect_server) -> Path:
    """prepare -> split -> episodes through the stages' main(), as DVC calls them."""
    out = tmp_path_factory.mktemp("run")
    run_first_stages(write_params(out / "params.yaml"), out)
    return out


@pytest.fixture(scope="session")
def priors_run(pipeline_run) -> Path:
    """The priors stage with an untrained tiny CLIP (shapes and plumbing, not quality)."""
    from pipeline.clip.loader import save_local_dir
    from pipeline.tinyclip.model import build_tiny
    from stages import priors

    save_local_dir(build_tiny("tiny-vit", 0), pipeline_run / "clip")
    assert priors.main(priors_args(pipeline_run, pipeline_run / "priors.zarr")) == 0
    return pipeline_run / "priors.zarr"


def priors_args(run: Path, out: Path, overrides: dict | None = None) -> list[str]:
    params = write_params(out.parent / f"{out.name}.params.yaml", overrides)
    return ["--params", str(params), "--index", str(run / "index"), "--episodes", str(run / "episodes"),
            "--clip", str(run / "clip"), "--out", str(out), "--preview", str(out.parent / f"{out.name}.png")]


@pytest.fixture(scope="session")
def features_run(priors_run, pipeline_run) -> Path:
    from stages import features

    run = pipeline_run
    assert features.main(["--params", str(write_params(run / "features.params.yaml")),
                          "--index", str(run / "index"), "--episodes", str(run / "episodes"),
                          "--clip", str(run / "clip"), "--out", str(run / "features.zarr")]) == 0
    return pipeline_run / "features.zarr"


@pytest.fixture(scope="session")
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


# --- a tiny VOC folder --------------------------------------------------------------------------------

def make_voc(root: Path, train: list[str], val: list[str], size=(24, 32)) -> Path:
    """A tiny VOC2012 folder without a train_aug list."""
    rng = np.random.default_rng(0)
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for image_id in train + val:
        pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg")
        label = np.zeros(size, np.uint8)
        label[2:10, 3:12] = 15
        label[10, :] = 255
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{image_id}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(val) + "\n")
    return root


# --- tiny CLIP test models (random open_clip towers) --------------------------------------------------

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VIT = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2,
                                       "head_width": 16, "pool_type": "avg"}, "text_cfg": TEXT}
RESNET = {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8,
                                          "head_width": 32}, "text_cfg": TEXT}


def tiny(cfg: dict, seed: int = 0) -> open_clip.CLIP:
    import torch

    from pipeline.clip import loader

    torch.manual_seed(seed)
    model = loader.build_model(cfg).eval()
    with torch.no_grad():  # open_clip zero-inits each bottleneck's last BN: random nets go flat
        for name, param in model.named_parameters():
            if name.endswith("bn3.weight"):
                param.uniform_(0.5, 1.5)
    return model
