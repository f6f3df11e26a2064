"""The report renders from fixture metrics: tables in the papers' shape, valid LaTeX, a
self-contained HTML page (and, where Chromium is installed, one that renders)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from pipeline.report import document, tables
from pipeline.report.figures import Sample

CLASSES = [f"class_{i}%" for i in range(1, 21)]  # names with LaTeX specials on purpose


def fold_metrics(k: int, shift: float = 0.0) -> dict:
    names = CLASSES[5 * k : 5 * k + 5]
    return {
        "fold": k,
        "prior_threshold": 0.5,
        **{
            f"shot{s}": {
                "miou": 50.0 + k + s + shift,
                "miou_std": 0.0,
                "fbiou": 70.0 + k,
                "fbiou_std": 0.0,
                "prior_miou": 30.0 + k,
                "prior_miou_std": 0.0,
                "class_iou": {n: 40.0 + i for i, n in enumerate(names)},
            }
            for s in (1, 5)
        },
    }


def inputs(ablations: bool = True) -> document.Inputs:
    folds = {k: fold_metrics(k) for k in range(4)}
    pseudo = {
        f"fold{k}": {
            "support_initial_miou": 20.0,
            "support_refined_miou": 25.0,
            "query_initial_miou": 19.0,
            "query_refined_miou": 24.0,
        }
        for k in range(4)
    }
    pseudo["mean"] = pseudo["fold0"]
    curves = {
        k: pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.2, 0.1, 0.05], "val_miou": [40, 50, 55]})
        for k in range(4)
    }
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    samples = [Sample("fold0: class_1%", image, mask, image, mask, np.roll(mask, 2, 0))]
    return document.Inputs(
        folds,
        pseudo,
        {"zero_shot_top1": 0.92},
        curves,
        samples,
        study(folds) if ablations else None,
        {"dataset": "synthetic", "git commit": "abc123"},
        "model:\n  dps: true\n",
        study(folds, masks=True) if ablations else None,
        {**study(folds), "requires": {"prepare.synthetic.parts": True}} if ablations else None,
    )


def study(folds: dict[int, dict], masks: bool = False) -> dict:
    """A ``pipeline.studies`` result: a reference row (its seed 0 the main table's) and one more."""
    def row(name: str, model: dict, shift: float, diff: dict | None) -> dict:
        shots = {str(s): {"mean": 52.5 + s + shift, "train_std": 0.8, "test_std": 0.3, "train_seeds": 3,
                          "test_seeds": 5, **({"vs_reference": diff} if diff else {})} for s in (1, 5)}
        out = {"name": name, "model": model, "train_seeds": [0, 1, 2], "shots": shots,
               "val_miou": {"mean": 60.0 + shift, "train_std": 0.5},
               "metrics": {"seed0": {f"fold{k}": {f"shot{s}": {"miou": folds[k][f"shot{s}"]["miou"] + shift}
                                                  for s in (1, 5)} for k in folds}}}
        if masks:
            out["mask_quality"] = {"support_precision": 90.0, "support_recall": 50.0, "support_miou": 47.0,
                                   "query_precision": 40.0, "query_recall": 60.0}
        return out

    worse = {"delta": -3.0, "low": -3.6, "high": -2.4, "p": 0.0001, "mark": "**", "train_seeds": [0, 1, 2]}
    return {
        "commit": "abcdef0123", "reference": "full", "test": {"seeds": [0, 1, 2, 3, 4], "episodes": 200},
        "bootstrap": {"replicates": 10000}, "pending": ["not run"],
        # rows spell out their masks, as every study's rows do (the paper's rows: refined)
        "rows": [row("full", {"pseudo_masks": "refined"}, 0.0, None),
                 row("no DPS", {"dps": False, "pseudo_masks": "refined"}, -3.0, worse)],
        "contrasts": [{"component": "DPS", "with": "full", "without": "no DPS",
                       "val": {"delta": 1.5, "wins": 11, "pairs": 12, "p": 0.0063},
                       "shots": {"1": {**worse, "delta": 3.0, "low": 2.4, "high": 3.6},
                                 "5": {**worse, "delta": 0.4, "low": -0.2, "high": 1.0, "p": 0.2,
                                       "mark": "n.s."}}}],
    }


def test_results_table_has_the_papers_shape():
    table = tables.results_table(inputs().folds)
    assert table.header == ["Method", "Shot", "Fold 0", "Fold 1", "Fold 2", "Fold 3", "Mean"]
    assert [row[:2] for row in table.rows] == [
        ["PI-CLIP priors alone (VTP, no decoder)", "1"],
        ["LFSS + PI-CLIP priors (ours)", "1"],
        ["PI-CLIP priors alone (VTP, no decoder)", "5"],
        ["LFSS + PI-CLIP priors (ours)", "5"],
    ]
    assert table.rows[1][2:] == ["51.0", "52.0", "53.0", "54.0", "52.5"]  # folds, then their mean
    assert table.groups == [2]  # a rule between 1-shot and 5-shot


def test_seeds_show_mean_and_std():
    folds = {k: fold_metrics(k) for k in range(4)}
    folds[0]["shot1"]["miou_std"] = 1.25
    assert tables.results_table(folds).rows[1][2] == "51.0 ± 1.2"


def test_ablation_marks_follow_the_switches_with_error_bars_and_significance():
    table = tables.ablation_table(inputs().ablations)
    assert table.header[1:8] == ["DPS", "Refine", "CCM", "VTP", "PIR", "VVP", "Seeds"]
    assert table.rows[0][1:7] == ["✓"] * 6 and table.rows[1][1:7] == ["✗"] + ["✓"] * 5
    assert table.rows[0][7:] == ["3 × 5", "53.5 ± 0.8 (0.3)", "ref.", "57.5 ± 0.8 (0.3)", "ref."]
    assert table.rows[1][8:10] == ["50.5 ± 0.8 (0.3)", "−3.0 [−3.6, −2.4] **"]
    masks = tables.mask_study_table(inputs().masks)
    assert masks.rows[0][1:5] == ["90 / 50 / 47", "40 / 60 / –", "3 × 5", "60.0 ± 0.5"]


def test_ablation_section_says_which_components_help_and_how_sure():
    sections = {s.title: s for s in document.build(inputs())}
    text = " ".join(sections["Ablation"].text)
    assert "**DPS** (full vs no DPS, 3 training seeds): +3.0 1-shot [+2.4, +3.6], p = 0.0001" in text
    assert "mixed (significant for some shots only)" in text  # 5-shot within noise
    assert "Validation (base classes): +1.5, better on 11 of 12 fold × seed pairs (sign test p = 0.0063)" \
        in text
    assert "Not yet run: not run." in text
    assert sections["Mask quality"].tables[0].label == "tab:masks"
    assert document.verdict({"1": {"delta": -1.0, "p": 0.001}, "5": {"delta": -2.0, "p": 0.04}}) == "hurts"
    assert document.verdict({"1": {"delta": 1.0, "p": 0.3}}) == "no significant effect"


def test_latex_is_balanced_booktabs_with_escaped_text():
    sections = document.build(inputs())
    tex = document.render_latex(sections)
    begins, ends = re.findall(r"\\begin\{(\w+)\}", tex), re.findall(r"\\end\{(\w+)\}", tex)
    # results, FB-IoU, pseudo-masks, ablation, mask quality, DPS on parts
    assert sorted(begins) == sorted(ends) and begins.count("table") == 6 and "tab:parts" in tex
    for block in re.findall(r"\\begin\{tabular\}\{(\w+)\}(.*?)\\end\{tabular\}", tex, re.S):
        columns, body = len(block[0]), block[1]
        assert body.count(r"\toprule") == 1 and body.count(r"\bottomrule") == 1
        for line in body.splitlines():
            if line.endswith(r"\\"):
                assert line.count("&") - line.count(r"\&") == columns - 1, line
    assert r"\hline" not in tex and "%" not in tex.split("\n", 2)[2].replace(r"\%", "")
    assert r"\checkmark" in tex and r"$-$3.0" in tex and r"3 $\times$ 5" in tex


def test_markdown_and_html_show_every_section():
    sections = document.build(inputs())
    md = document.render_markdown(sections, "Results")
    titles = [
        "Summary",
        "Results",
        "Pseudo-masks",
        "Ablation",
        "Mask quality",
        "DPS on objects with parts",
        "Per-class IoU",
        "Training",
        "Qualitative results",
        "Provenance",
    ]
    assert [s.title for s in sections] == titles
    assert all(f"## {t}" in md for t in titles) and "| LFSS + PI-CLIP priors (ours) | 1 | 51.0 |" in md
    page = document.render_html(sections, "Results")
    assert page.count("data:image/png;base64,") == 4  # per-class IoU, curves, qualitative, mask quality
    assert not re.search(r"""(src|href)=["'](https?:|//)""", page)  # self-contained
    assert "beats thresholding its priors on every fold" in page


def test_ablation_section_says_how_to_fill_it():
    sections = document.build(inputs(ablations=False))
    ablation = next(s for s in sections if s.title == "Ablation")
    assert not ablation.tables and "make ablation" in ablation.text[0]


def test_summary_metrics_average_the_folds_in_few_columns():
    data = inputs()
    data.clip = {"zero_shot_top1": 0.921999990940094, "dense_maskclip_miou": 0.3101, "zero_shot_chance": 0.05}
    summary = document.summary_metrics(data.folds, data.pseudo, data.clip)
    assert summary["shot1"]["mean"] == {"miou": 52.5, "fbiou": 71.5} and summary["prior_miou"] == 31.5
    assert summary["shot5"]["fold3"] == {"miou": 58.0}
    assert summary["clip"] == {"zero_shot_top1": 92.2, "dense_maskclip_miou": 31.01}
    assert summary["pseudo_masks"] == {"query_initial_miou": 19.0, "query_refined_miou": 24.0}

    def leaves(tree: dict) -> int:
        return sum(leaves(v) if isinstance(v, dict) else 1 for v in tree.values())

    # with DVCLive's two columns per fold (validation mIoU, step): `dvc exp show` stays readable
    assert leaves(summary) + 2 * len(data.folds) <= 25


@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")),
    reason="Chromium is not installed (apt-get install chromium)",
)
def test_html_renders_in_headless_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(document.render_html(document.build(inputs()), "Results"))
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1000,2000",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-500:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # not a blank page


def test_provenance_commit_is_marked_dirty_by_code_or_params_but_not_by_dvc_lock(tmp_path):
    from stages.report import git_commit

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    assert git_commit(tmp_path) == "unknown (not a git checkout)"
    git("init", "-q")
    for name in ("dvc.lock", "params.yaml"):
        (tmp_path / name).write_text("a\n")
    git("add", ".")
    git("commit", "-qm", "start")
    head = git_commit(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{7,}", head)
    (tmp_path / "dvc.lock").write_text("b\n")  # a repro that re-ran stages, not committed yet
    assert git_commit(tmp_path) == head
    (tmp_path / "params.yaml").write_text("b\n")
    assert git_commit(tmp_path) == head + " (with uncommitted changes)"


def test_tables_say_how_the_folds_were_scored():
    folds = {k: fold_metrics(k) | {"scored": "label and prediction at 400x400 (HSNet)"} for k in range(4)}
    assert tables.results_table(folds).caption.endswith("Scored: label and prediction at 400x400 (HSNet).")
    assert "Scored:" not in tables.results_table({k: fold_metrics(k) for k in range(4)}).caption


def test_provenance_repeats_no_raw_clip_floats():
    """clip.json's figures reach the provenance rounded (stages/report.py); the table adds only
    what else it says in words, never a float such as 0.921999990940094."""
    data = inputs()
    data.clip = {"zero_shot_top1": 0.921999990940094, "dense_chance_miou": 0.024807209976451815,
                 "source": "trained", "model": "tiny-vit", "dtype": "bf16", "sha256": "ab12"}
    table = next(s for s in document.build(data) if s.title == "Provenance").tables[0]
    cells = [value for _, value in table.rows]
    assert ["CLIP source", "trained"] in table.rows
    assert not {"CLIP sha256", "CLIP dtype", "CLIP model"} & {item for item, _ in table.rows}  # above
    assert not any(re.search(r"\d\.\d{4,}", cell) for cell in cells), cells


def test_provenance_says_which_broken_images_prepare_skipped(tmp_path):
    from pipeline.core.params import Params
    from stages.report import provenance

    splits = {"class_names": ["a", "b"], "folds": [{"fold": 0, "novel": [1]}, {"fold": 1, "novel": [2]}],
              "convention": "contiguous", "min_pixels": 2, "novel_in_train": "drop"}
    assert "images skipped" not in provenance(Params(), splits, tmp_path, None)
    line = provenance(Params(), splits, tmp_path, None, skipped=["x/b.jpg: unreadable image (truncated)"] * 3)
    assert line["images skipped"].startswith("3 broken images or masks left out by prepare")
    assert line["images skipped"].endswith("first: x/b.jpg: unreadable image (truncated)")


def test_the_ablation_table_says_where_its_rows_come_from_and_if_they_match():
    data = inputs()
    params = {"model": {"dps": True}, "orchestration": {"max_workers": 2}}
    text = document.study_provenance({**data.ablations, "params": {"model": {"dps": True}}}, params, "a.json")
    assert text == "Rows from `a.json` (commit abcdef0, 1 thread a unit). Not yet run: not run."
    other = {**data.ablations, "params": {"model": {"dps": False}}, "pending": []}
    assert document.study_provenance(other, params, "a.json").endswith(
        ": made with other params than this run (model.dps): re-run it before comparing with the tables "
        "above.")
    # a study on a benchmark of its own says so, and does not count that as a difference
    parts = {**other, "params": {"model": {"dps": True}, "prepare": {"synthetic": {"parts": True}}},
             "requires": {"prepare.synthetic.parts": True}}
    ours = {**params, "prepare": {"synthetic": {"parts": False}}}
    assert document.study_provenance(parts, ours, "p.json") == (
        "Rows from `p.json` (commit abcdef0, 1 thread a unit) on a benchmark made with "
        "prepare.synthetic.parts: true.")
    ours["prepare"]["synthetic"]["seed"] = 3
    assert "(prepare.synthetic.seed)" in document.study_provenance(parts, ours, "p.json")


PROTOCOL = {"name": "hsnet", "conventions": {"episodes.protocol": "hsnet", "evaluate.resize": "hsnet",
                                             "evaluate.absent_class": "zero", "split.novel_in_train": "drop",
                                             "priors.cam_scale": "pi-clip", "priors.box": "pi-clip"}}


def test_pascal_results_sit_beside_the_published_rows_with_protocol_and_citation():
    from pipeline.report.published import load_published
    from stages.report import REPO_PUBLISHED

    published = load_published(REPO_PUBLISHED)
    folds = {k: {**fold_metrics(k), "protocol": PROTOCOL} for k in range(4)}
    table = tables.results_table(folds, dataset="pascal", published=published)
    lfss = [r for r in table.rows if r[0].startswith("LFSS (ResNet-50, text")]
    assert lfss == [["LFSS (ResNet-50, text; published, hsnet protocol)", "1", "59.9", "69.1", "56.7", "58.9",
                     "61.2"]]  # LFSS Table 1, as printed
    shot1 = table.rows[: table.groups[0]]
    assert [r[1] for r in shot1] == ["1"] * len(shot1) and len(shot1) == 2 + 8  # ours, then 8 published
    assert all(r[1] == "5" for r in table.rows[table.groups[0]:])  # no published 5-shot rows
    assert table.notes[0] == ("Protocol: hsnet (episodes.protocol: hsnet, evaluate.resize: hsnet, "
                              "evaluate.absent_class: zero, split.novel_in_train: drop, priors.cam_scale: "
                              "pi-clip, priors.box: pi-clip).")
    assert "Language-guided few-shot semantic segmentation, Table 1" in table.notes[1]
    assert "published rows under the same protocol: hsnet" in table.notes[2]
    latex = tables.to_latex(table)
    assert r"LFSS (ResNet-50, text; published, hsnet protocol) & 1 & 59.9" in latex
    assert r"\footnotesize Protocol: hsnet" in latex
    coco = tables.results_table(folds, dataset="coco", published=published)
    assert ["HSNet (ResNet-50, mask; published, hsnet protocol)", "1", "36.3", "43.1", "38.7", "38.7",
            "39.2"] in coco.rows
    synthetic = tables.results_table(folds, published=published)
    assert len(synthetic.rows) == 4 and synthetic.notes[1].startswith("No published numbers apply")


def test_a_bad_published_file_is_one_line(tmp_path):
    from pipeline.core.errors import PipelineError
    from pipeline.report.published import load_published

    path = tmp_path / "published.yaml"
    path.write_text("citations: {a: x}\nrows:\n  - {dataset: pascal, shot: 1, method: M, backbone: B, "
                    "supervision: text, folds: [1, 2, 3, 4], mean: 2.5, protocol: hsnet, cite: b, "
                    "where: T1}\n")
    with pytest.raises(PipelineError, match=r"published.yaml: rows\[0\].cite = 'b': not a key of citations"):
        load_published(path)
    path.write_text("citations: {}\nrows:\n  - {dataset: pascal, shot: 1, folds: [1]}\n")
    with pytest.raises(PipelineError, match=r"published.yaml: rows.0.method: Field required"):
        load_published(path)


@pytest.mark.slow
def test_a_tiny_voc_layout_run_reports_the_published_rows(tmp_path, prefect_server):
    """prepare, split and episodes of the embedded benchmark laid out as VOC (dataset: pascal), then the
    report stage on fold metrics as evaluate writes them: the main table of report.md and tables.tex
    sets the run beside LFSS's 61.2 and the other published PASCAL-5i rows, the protocol under it."""
    import json

    from stages import report
    from tests.conftest import SMOKE, run_first_stages, write_benchmark, write_params

    write_benchmark(tmp_path / "synthetic", SMOKE.model_copy(update={"caption_images": 0}))
    params = write_params(tmp_path / "params.yaml", {
        "dataset": {"name": "pascal", "root": str(tmp_path / "synthetic" / "VOC2012")},
        "split": {"min_pixels": 1}, "episodes": {"protocol": "hsnet", "test_episodes": 20, "val_episodes": 10,
                                                 "shots": [1], "seeds": [0]},
        "evaluate": {"resize": "hsnet"}})
    run_first_stages(params, tmp_path / "data")
    metrics = tmp_path / "data/metrics"
    metrics.mkdir()
    for k in range(4):
        fold = fold_metrics(k)
        fold = {**fold, "protocol": PROTOCOL, "shot1": fold["shot1"]}
        del fold["shot5"]
        (metrics / f"fold{k}.json").write_text(json.dumps(fold))
    out = tmp_path / "reports"
    assert report.main(["--params", str(params), "--index", str(tmp_path / "data/index"),
                        "--splits", str(tmp_path / "data/splits"), "--metrics", str(metrics),
                        "--curves", str(tmp_path / "none"), "--predictions", str(tmp_path / "none"),
                        "--ablations", str(tmp_path / "none.json"), "--masks", str(tmp_path / "none.json"),
                        "--parts", str(tmp_path / "none.json"), "--clip", str(tmp_path / "none"),
                        "--out", str(out)]) == 0
    markdown, latex = (out / "report.md").read_text(), (out / "tables.tex").read_text()
    row = "| LFSS (ResNet-50, text; published, hsnet protocol) | 1 | 59.9 | 69.1 | 56.7 | 58.9 | 61.2 |"
    assert row in markdown
    assert "*Protocol: hsnet (episodes.protocol: hsnet, evaluate.resize: hsnet" in markdown
    assert "LFSS (ResNet-50, text; published, hsnet protocol) & 1 & 59.9 & 69.1 & 56.7 & 58.9 & 61.2" in latex
    assert "PFENet (ResNet-50, mask; published, pfenet protocol)" in latex
