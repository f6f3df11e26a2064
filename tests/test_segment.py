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


# --- users' own images: modes, EXIF orientation, long names, interrupts ----------------------------

def benchmark_picture(run_dir: Path, k: int = 0) -> tuple[str, np.ndarray]:
    """A validation image of the run (an 8-bit RGB JPEG) and its decoded pixels."""
    index = RunDir(run_dir).index()
    path = index[index["split"] == "val"]["image_path"].iloc[k]
    return path, np.asarray(Image.open(path).convert("RGB"))


def plain_copies(copies: dict[str, tuple[Path, np.ndarray]], folder: Path) -> dict[str, Path]:
    """Per converted copy, the plain 8-bit upright RGB PNG it must read as."""
    folder.mkdir()
    out = {}
    for name, (_, want) in copies.items():
        out[name] = folder / f"{name}.png"  # exif6.jpg and exif6.png: two files
        Image.fromarray(want).save(out[name])
    return out


def assert_same_segmentation(segmenter, copies, plain, support: str, what: str) -> None:
    """The copies, as queries of one call, give the masks and probabilities of their plain
    pictures (as queries of the same call: the same batch); the masks are not trivial."""
    names = sorted(copies)
    got = segmenter.segment([str(copies[n][0]) for n in names] + [str(plain[n]) for n in names], what,
                            [support]).predictions
    for j, name in enumerate(names):
        a, b = got[j], got[len(names) + j]
        assert a.mask.shape == b.mask.shape == copies[name][1].shape[:2], name
        np.testing.assert_allclose(a.probability, b.probability, atol=1e-6, err_msg=name)
        assert np.array_equal(a.mask, b.mask), name


def test_16_bit_and_float_grey_images_segment_as_their_8_bit_picture(run_dir, segmenter, tmp_path):
    """A 16-bit PNG (I;16), a big-endian 16-bit TIFF (I;16B), a 32-bit integer TIFF (I) and a float
    TIFF (F) of a benchmark image in grey give the masks of the 8-bit grey picture (the same
    pixels once scaled: probabilities to 1e-6, the float rounding of one batched forward) -- not of
    an all-white one, as Pillow's clipping conversion made them."""
    from tests.image_copies import gray_copies

    support, rgb = benchmark_picture(run_dir, 10)
    _, query = benchmark_picture(run_dir, 0)
    gray = np.asarray(Image.fromarray(query).convert("L"))
    copies = gray_copies(gray, tmp_path / "copies")
    plain = plain_copies(copies, tmp_path / "plain")
    assert_same_segmentation(segmenter, copies, plain, support, "star")
    white = tmp_path / "white.png"
    Image.fromarray(np.full_like(query, 255)).save(white)
    got = segmenter.segment([str(plain["I;16.png"]), str(white)], "star", [support]).predictions
    assert not np.allclose(got[0].probability, got[1].probability, atol=1e-3)  # the test has teeth


def test_palette_cmyk_alpha_and_exif_rotated_images_segment_as_shown(run_dir, segmenter, tmp_path):
    """Palette (with a transparent colour too), CMYK, RGBA and LA (transparency composited on white),
    and images stored sideways with an EXIF orientation (PNG 3, 6, 8; a phone's JPEG 6) give the
    masks of the plain 8-bit upright picture they show, at its upright size."""
    from tests.image_copies import color_copies

    support, _ = benchmark_picture(run_dir, 10)
    _, query = benchmark_picture(run_dir, 1)
    copies = color_copies(query, tmp_path / "copies")
    plain = plain_copies(copies, tmp_path / "plain")
    assert_same_segmentation(segmenter, copies, plain, support, "star")


def test_an_exif_rotated_run_writes_upright_outputs(run_dir, tmp_path, capsys):
    """Through the command: a query and a support stored sideways (EXIF 6) give the masks, overlays
    and summary sizes of the upright pictures, as a browser shows them; a support mask drawn on
    the upright picture fits, one of the stored orientation gets a line saying so."""
    from tests.image_copies import STORED, exif

    support, s_rgb = benchmark_picture(run_dir, 10)
    _, q_rgb = benchmark_picture(run_dir, 2)
    q_rgb = q_rgb[:, : q_rgb.shape[1] * 3 // 4]  # not square: a turn shows in the sizes
    s_rgb = s_rgb[: s_rgb.shape[0] * 2 // 3]
    files = {}
    for name, rgb in (("q", q_rgb), ("s", s_rgb)):
        files[name] = tmp_path / f"{name}.png"
        Image.fromarray(rgb).save(files[name])
        files[f"{name}6"] = tmp_path / f"{name}6.png"
        Image.fromarray(np.ascontiguousarray(STORED[6](rgb))).save(files[f"{name}6"], exif=exif(6))
    mask = tmp_path / "m.png"
    drawn = np.zeros(s_rgb.shape[:2], np.uint8)
    drawn[:, : s_rgb.shape[1] // 2] = 255  # the upright picture's left half
    Image.fromarray(drawn).save(mask)

    def run(query: str, support: str, support_mask: Path, out: Path) -> int:
        return cli.main(["--run", str(run_dir), "--class", "star", "--support", str(files[support]),
                         "--support-mask", str(support_mask), "--query", str(files[query]), "--out", str(out),
                         "--no-progress"])

    outs = {"plain": tmp_path / "plain", "turned": tmp_path / "turned"}
    assert run("q", "s", mask, outs["plain"]) == 0 and run("q6", "s6", mask, outs["turned"]) == 0
    summaries = {k: json.loads((o / "summary.json").read_text()) for k, o in outs.items()}
    plain, turned = summaries["plain"]["queries"][0], summaries["turned"]["queries"][0]
    assert (turned["height"], turned["width"]) == q_rgb.shape[:2] == (plain["height"], plain["width"])
    for kind in ("mask", "overlay"):
        assert np.array_equal(np.asarray(Image.open(outs["turned"] / turned[kind])),
                              np.asarray(Image.open(outs["plain"] / plain[kind]))), kind
    stored_mask = tmp_path / "m6.png"
    Image.fromarray(np.ascontiguousarray(STORED[6](drawn))).save(stored_mask)
    assert run("q6", "s6", stored_mask, tmp_path / "x") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "EXIF orientation 6" in err and "give the mask upright" in err, err


def test_a_class_name_beyond_the_text_context_is_refused(run_dir, segmenter, tmp_path, capsys):
    """A name whose prompts do not fit the CLIP's text context (32 tokens for the tiny CLIP) is one
    line, nothing written -- never cut short silently; the longest name the line allows is taken."""
    import re as _re

    from pipeline.core.errors import PipelineError

    support, _ = benchmark_picture(run_dir, 10)
    query, _ = benchmark_picture(run_dir, 0)
    out = tmp_path / "out"
    args = ["--run", str(run_dir), "--support", support, "--query", query, "--out", str(out), "--no-progress"]
    long_name = " ".join(["bright"] * 50)  # 300 characters, 50 tokens
    assert cli.main(["--class", long_name, *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --class 'bright bright") and "\n" not in err, err
    assert "too long for the CLIP's 32-token text context (the name is 50 tokens" in err, err
    assert not out.exists()
    most = int(_re.search(r"at most (\d+) tokens", err).group(1))
    context = segmenter.extractor.bundle.model.context_length
    tokenizer = segmenter.extractor.bundle.tokenizer()
    from pipeline.clip.prompts import MASKCLIP_TEMPLATES

    fits = " ".join(["bright"] * most)
    longest = max(len(tokenizer.encode(t.format(fits))) + 2 for t in MASKCLIP_TEMPLATES)
    assert longest == context  # the limit the line gives is the context, exactly
    assert segmenter.segment([query], fits, [support]).target.name == fits
    with pytest.raises(PipelineError, match="too long for the CLIP"):
        segmenter.segment([query], fits + " bright", [support])


def output_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_interrupted_run_leaves_no_half_folder(run_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the first batch's files are written: one line, status 130, the earlier output in
    ``--out`` as it was and no staging folder left; a later run into the folder replaces the
    leftovers of an old interrupted run (``.index.html.cards``, stray masks) instead of mixing
    with them, and a folder of other files is refused, untouched."""
    import signal

    from pipeline.segment import outputs

    index = RunDir(run_dir).index()
    val = list(index[index["split"] == "val"]["image_path"][:6])
    out = tmp_path / "out"

    def args(queries: list[str], folder: Path = out) -> list[str]:
        return ["--run", str(run_dir), "--class", "star", "--support", val[0], "--query", *queries,
                "--out", str(folder), "--batch-size", "1", "--no-progress"]

    assert cli.main(args(val[1:4])) == 0
    before = output_files(out)
    capsys.readouterr()
    add = outputs.OutputWriter.add

    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM only once SIGINT passed: unhandled, it ends pytest

        def add_then_interrupt(self, part, sig=sig):
            add(self, part)
            if len(self.rows) == 2:
                os.kill(os.getpid(), sig)

        monkeypatch.setattr(outputs.OutputWriter, "add", add_then_interrupt)
        try:
            code = cli.main(args(val[1:6]))
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped lfss-segment as a traceback")
        monkeypatch.undo()
        err = capsys.readouterr().err.strip()
        assert code == 130, err
        assert err == f"lfss-segment: stopped by {sig.name}; nothing written ({out} is as it was)", err
        assert output_files(out) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left

    (out / ".index.html.cards").write_text("<figure>stale</figure>")  # what an old interrupted run left
    (out / "zz_stale_mask.png").write_bytes(before["summary.json"])
    (out / "summary.json").unlink()
    assert cli.main(args(val[1:4])) == 0
    assert output_files(out) == before  # the same run's files, and nothing else
    assert "stale" not in (out / "index.html").read_text()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cli.main(args(val[1:4], mine)) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --out {mine}: holds 'notes.txt', which lfss-segment does not write (it replaces "
                   "the folder: give a new one, an empty one or an earlier output of lfss-segment)"), err
    assert output_files(mine) == {"notes.txt": b"keep me"}
    shutil.copy(val[1], out / "q_overlay.png")  # an input inside an earlier output: refused, kept
    assert cli.main(args([str(out / "q_overlay.png")])) == 1
    err = capsys.readouterr().err.strip()
    inside = out / "q_overlay.png"
    assert err == f"error: --out {out}: holds the input {inside} (it replaces the folder: give another)", err
    assert (out / "q_overlay.png").is_file()


def test_ctrl_c_stops_the_command_with_one_line(run_dir, tmp_path):
    """A real SIGINT to the command while it writes: one line on stderr, no traceback, status 130,
    neither the output folder nor its staging folder left."""
    import signal
    import time

    index = RunDir(run_dir).index()
    val = list(index[index["split"] == "val"]["image_path"])
    queries = tmp_path / "queries"
    queries.mkdir()
    for k in range(60):
        shutil.copy(val[1 + k % 20], queries / f"q{k:02d}.jpg")
    out = tmp_path / "out"
    staging = tmp_path / ".out.partial"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.segment.cli", "--run", str(run_dir), "--class",
                             "star", "--support", val[0], "--query", str(queries), "--out", str(out),
                             "--batch-size", "1", "--threads", "1", "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (staging.is_dir() and any(staging.glob("*_mask.png"))):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no output was being written"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip() == f"lfss-segment: stopped by SIGINT; nothing written ({out} is as it was)", err[-999:]
    assert not out.exists() and not staging.exists()
