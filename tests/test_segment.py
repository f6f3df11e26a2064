"""``lfss-segment`` and its API on a smoke-size run: its masks are evaluate@k's for the same
episodes (text-only and mask supports), bad input is one line, the outputs are complete."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.clip.loader import save_local_dir
from pipeline.segment import cli
from pipeline.segment.compare import evaluate_episodes
from pipeline.segment.run import RunDir
from pipeline.segment.segmenter import Segmenter
from pipeline.tinyclip.model import build_tiny
from tests.conftest import REPO, run_first_stages, write_params

pytestmark = pytest.mark.slow
FOLD, MANIFEST, MANIFEST5 = 0, "test/fold0/shot1_seed0", "test/fold0/shot5_seed0"
AGREE = 0.999  # pixels of each mask equal to evaluate's (float16 stores: an exact tie may round)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, prefect_server) -> Path:
    """A smoke run laid out as ``make repro`` leaves one (params.yaml, data/...; index paths
    relative to the run), with the shipped tiny CLIP and fold 0 trained for two epochs."""
    from stages import features, priors, pseudo_masks, train

    root = tmp_path_factory.mktemp("run")
    params = str(write_params(root / "params.yaml", {"train": {"epochs": 2, "batch_size": 8},
                                                     "model": {"hidden": 8}}))
    before = Path.cwd()
    os.chdir(root)  # the stages' default paths, as DVC runs them: index paths relative to the run
    try:
        run_first_stages(params, Path("data"))
        shutil.copytree(REPO / "fixtures" / "tiny-vit", "data/models/clip")
        for stage in (priors, features, pseudo_masks):
            assert stage.main(["--params", params]) == 0
        assert train.main(["--params", params, "--fold", str(FOLD)]) == 0
    finally:
        os.chdir(before)
    return root


@pytest.fixture(scope="module")
def segmenter(run_dir) -> Segmenter:
    return Segmenter.from_run(run_dir, fold=FOLD, device="cpu")


def first_of_each_class(run: RunDir, manifest: str) -> list[int]:
    from pipeline.datasets.episodes import read_manifests

    table = read_manifests(run.root / "data" / "episodes")[manifest]
    return [int(table.index[table["class_id"] == c][0]) for c in sorted(set(table["class_id"]))]


def cli_masks(run_dir: Path, out: Path, episode, names: list[str],
              masks: list[Path] | None = None) -> np.ndarray:
    """The command's mask of one episode's query (its supports, text-only or with ``masks``)."""
    run = RunDir(run_dir)
    paths = dict(zip(run.index().image_id, run.index().image_path, strict=True))
    args = ["--run", str(run_dir), "--class", names[int(episode["class_id"]) - 1],
            "--support", *[paths[s] for s in episode["supports"]], "--query", paths[episode["query"]],
            "--out", str(out), "--no-progress"]
    if masks is not None:
        args += ["--support-mask", *map(str, masks)]
    assert cli.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    return np.asarray(Image.open(out / summary["queries"][0]["mask"])) > 0


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


@pytest.mark.parametrize("manifest", [MANIFEST, MANIFEST5])
def test_text_only_masks_are_evaluates(run_dir, segmenter, tmp_path, manifest):
    """Supports without masks (pseudo-masks made here: MaskCLIP + refiner) give evaluate@k's
    masks, 1-shot and 5-shot, at each query's own size; the API's probabilities are evaluate's
    to float rounding (the stores' float16 is reproduced, not approximated)."""
    run = RunDir(run_dir)
    rows = first_of_each_class(run, manifest)[:5 if manifest == MANIFEST else 2]
    ref = evaluate_episodes(run, FOLD, manifest, rows)
    names = run.class_names()
    paths = dict(zip(run.index().image_id, run.index().image_path, strict=True))
    fractions = []
    for j, episode in ref.episodes.iterrows():
        got = cli_masks(run_dir, tmp_path / f"e{j}", episode, names)
        want = ref.probabilities[j] >= 0.5
        assert got.shape == ref.labels[j].shape
        assert agreement(got, want) >= AGREE, (j, agreement(got, want))
        fractions.append(want.mean())
        api = segmenter.segment([paths[episode["query"]]], names[episode["class_id"] - 1],
                                [paths[s] for s in episode["supports"]])
        assert api.mask_source == "pseudo-mask" and len(api.support_masks) == len(episode["supports"])
        np.testing.assert_allclose(api.predictions[0].probability, ref.probabilities[j], atol=1e-5)
    assert any(0 < f < 1 for f in fractions)  # not a trivial all-or-nothing model


def test_mask_supports_are_evaluates_with_ground_truth_supports(run_dir, segmenter, tmp_path):
    """With one mask per support (standard few-shot) the masks are evaluate's with ground-truth
    support masks (``supervision: mask``, the same model); the API's probabilities agree too."""
    run = RunDir(run_dir)
    rows = first_of_each_class(run, MANIFEST)[:4]
    ref = evaluate_episodes(run, FOLD, MANIFEST, rows, supervision="mask")
    text = evaluate_episodes(run, FOLD, MANIFEST, rows)
    index = run.index().set_index("image_id")
    names = run.class_names()
    differs = 0
    for j, episode in ref.episodes.iterrows():
        masks = []
        for k, support in enumerate(episode["supports"]):
            label = np.asarray(Image.open(index.at[support, "mask_path"]))
            masks.append(tmp_path / f"m{j}_{k}.png")
            Image.fromarray((label == episode["class_id"]).astype(np.uint8) * 255).save(masks[-1])
        got = cli_masks(run_dir, tmp_path / f"e{j}", episode, names, masks)
        assert agreement(got, ref.probabilities[j] >= 0.5) >= AGREE, j
        api = segmenter.segment([index.at[episode["query"], "image_path"]], names[episode["class_id"] - 1],
                                [index.at[s, "image_path"] for s in episode["supports"]],
                                [np.asarray(Image.open(m)) > 0 for m in masks])
        assert api.mask_source == "given"
        np.testing.assert_allclose(api.predictions[0].probability, ref.probabilities[j], atol=1e-5)
        differs += not np.array_equal(ref.probabilities[j], text.probabilities[j])
    assert differs  # the given masks were used: not the pseudo-mask predictions


def test_outputs_summary_and_gallery(run_dir, segmenter, tmp_path):
    run = RunDir(run_dir)
    index = run.index()
    val = index[index["split"] == "val"]
    folder = tmp_path / "queries"
    folder.mkdir()
    for p in val["image_path"][:5]:
        shutil.copy(p, folder)
    (folder / "notes.txt").write_text("not an image")  # a folder's non-images are not queries
    support = val["image_path"].iloc[10]
    out = tmp_path / "out"
    assert cli.main(["--run", str(run_dir), "--class", "Star", "--support", support, "--query", str(folder),
                     "--out", str(out), "--batch-size", "2", "--threads", "1", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["class"] == "star" and summary["class_id"] == 4 and summary["in_vocabulary"]
    assert summary["support_masks"] == "pseudo-mask" and summary["supports"][0]["image"] == support
    sha = (run_dir / "data/models/fold0/model.pt.sha256").read_text().split()[0]
    assert summary["model"]["sha256"] == sha
    assert summary["clip"]["sha256"] == (run_dir / "data/models/clip/sha256.txt").read_text().strip()
    assert summary["model"]["fold"] == 0 and summary["params"]["backbone"]["image_size"] == 256
    names = sorted(Path(p).name for p in val["image_path"][:5])
    assert [Path(q["image"]).name for q in summary["queries"]] == names
    for q in summary["queries"]:
        mask = np.asarray(Image.open(out / q["mask"]))
        assert mask.shape == (q["height"], q["width"]) == np.asarray(Image.open(q["image"])).shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        assert q["foreground_fraction"] == pytest.approx((mask > 0).mean(), abs=1e-4)
        assert 0 <= q["mean_probability"] <= 1
        assert Image.open(out / q["overlay"]).size == (q["width"], q["height"])
    # the API gives the same masks in one batch as the command in batches of two
    api = segmenter.segment(sorted(str(p) for p in folder.glob("*.jpg")), "star", [support])
    for pred, q in zip(api.predictions, summary["queries"], strict=True):
        assert np.array_equal(pred.mask, np.asarray(Image.open(out / q["mask"])) > 0)
    assert Image.open(out / "gallery.png").size == (5 * 160, 30 + 2 * (160 + 28))  # supports, queries
    page = (out / "index.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == 5 + 1 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "<link" not in page and "url(" not in page  # self-contained
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("Chromium is not installed: the gallery was checked as HTML only")
    shot = tmp_path / "shot.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                           "--window-size=1000,1000", (out / "index.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert np.asarray(Image.open(shot).convert("L")).std() > 10  # not a blank page


def test_a_name_outside_the_vocabulary_is_added_to_it(run_dir, segmenter):
    index = RunDir(run_dir).index()
    val = list(index[index["split"] == "val"]["image_path"][:3])
    got = segmenter.segment(val[1:], "  Blue   Blob ", val[:1])
    assert not got.target.in_vocabulary and got.target.name == "Blue Blob"
    assert got.target.class_id == 21 and got.target.vocabulary[-1] == "Blue Blob"
    assert len(got.target.vocabulary) == 21
    assert all(p.mask.shape == p.probability.shape for p in got.predictions)
    known = segmenter.segment(val[1:], "star", val[:1])
    assert known.target.in_vocabulary and known.target.vocabulary == segmenter.vocabulary
    assert not all(np.array_equal(a.probability, b.probability)
                   for a, b in zip(got.predictions, known.predictions, strict=True))


def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
    index = RunDir(run_dir).index()
    val = list(index[index["split"] == "val"]["image_path"][:3])
    size = Image.open(val[0]).size
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a jpeg")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((size[1] + 3, size[0]), np.uint8)).save(small)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((size[1], size[0]), np.uint8)).save(good)
    other = tmp_path / "other" / "data" / "models"
    (other / "fold0").mkdir(parents=True)
    for name in ("model.pt", "model.pt.sha256"):
        shutil.copy(run_dir / "data/models/fold0" / name, other / "fold0" / name)
    save_local_dir(build_tiny("tiny-vit", 1), other / "clip")
    base = ["--run", str(run_dir), "--class", "star", "--support", val[0], "--query", val[1],
            "--out", str(tmp_path / "out"), "--no-progress"]

    def with_(**changes: list[str]) -> list[str]:
        args = list(base)
        for key, values in changes.items():
            flag = f"--{key.replace('_', '-')}"
            if flag in args:
                i = args.index(flag)
                args[i + 1: i + 2] = values
            else:
                args += [flag, *values]
        return args

    cases = [
        (with_(query=[str(broken)]), f"error: {broken}: unreadable image (cannot identify image file"),
        (with_(support=[str(broken)]), f"error: {broken}: unreadable image"),
        (with_(query=[str(tmp_path / "nowhere.jpg")]), "unreadable image (no such file or folder)"),
        (with_(support_mask=[str(good), str(good)]), "error: --support-mask: 2 masks for 1 supports"),
        (with_(support_mask=[str(small)]),
         f"error: {small}: mask is {size[0]}x{size[1] + 3} but its support"),
        (with_(support_mask=[str(broken)]), f"error: {broken}: unreadable mask"),
        (with_(**{"class": ["  "]}), "error: --class: an empty class name"),
        (with_(model=[str(other / "fold0" / "model.pt")]), "a checkpoint from another CLIP"),
        (with_(run=[str(tmp_path / "no_run")]), f"error: {tmp_path / 'no_run'}: no such run directory"),
        (with_(run=[str(tmp_path)]), f"error: {tmp_path}: not a run directory (no params.yaml)"),
        (with_(fold=["3"]), "model.pt: missing (run the train stage for this fold)"),
    ]
    for args, expected in cases:
        assert cli.main(args) == 1, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err, (expected, err)
    assert not (tmp_path / "out").exists()  # nothing written for bad input


def test_a_checkpoint_of_another_width_is_refused(run_dir, tmp_path):
    """A checkpoint whose features have other channels (another CLIP or backbone), wherever it is."""
    import hashlib

    from pipeline.core.errors import PipelineError
    from pipeline.model.lfss import LFSS

    saved = torch.load(run_dir / "data/models/fold0/model.pt", weights_only=True)
    from pipeline.core.params import ModelParams

    saved["feat_channels"] = 96
    saved["state_dict"] = LFSS(96, ModelParams(**saved["model"])).state_dict()
    path = tmp_path / "model.pt"
    torch.save(saved, path)
    (tmp_path / "model.pt.sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  model.pt\n")
    with pytest.raises(PipelineError,
                       match="trained on 96-channel features; this run's clip backbone gives 192"):
        Segmenter.from_checkpoint(path, run=run_dir)


def test_the_command_runs_as_a_module(run_dir, tmp_path):
    """As the console script runs it (``lfss-segment`` = ``pipeline.segment.cli:main``)."""
    index = RunDir(run_dir).index()
    val = list(index[index["split"] == "val"]["image_path"][:2])
    done = subprocess.run([sys.executable, "-m", "pipeline.segment.cli", "--run", str(run_dir),
                           "--class", "ring", "--support", val[0], "--query", val[1],
                           "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    assert "lfss-segment: 1 queries of 'ring'" in done.stdout and (tmp_path / "o/index.html").is_file()
    assert 'lfss-segment = "pipeline.segment.cli:main"' in (REPO / "pyproject.toml").read_text()


def test_gallery_pictures_stay_small_and_names_stay_unique_across_batches():
    """The command writes batch by batch: the gallery keeps a thumbnail per query (at most
    ``THUMBNAIL`` px a side), and output names stay unique across batches."""
    from pipeline.segment.outputs import THUMBNAIL, thumbnail, unique_names

    assert thumbnail(Image.new("RGB", (1200, 600))).size == (THUMBNAIL, THUMBNAIL // 2)
    small = Image.new("RGB", (100, 50))
    assert thumbnail(small) is small
    seen: dict[str, int] = {}
    assert unique_names(["a/x.jpg", "b/x.jpg"], seen) + unique_names(["c/x.png"], seen) == ["x", "x_2", "x_3"]
