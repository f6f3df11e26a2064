"""`report`: the paper-ready report from every fold's metrics.

Reads ``data/metrics/fold{k}.json`` (evaluate), ``data/metrics/pseudo_masks.json``,
``data/metrics/clip.json``, ``data/plots/train/fold{k}/`` (training curves, DVCLive),
``data/predictions/fold{k}.npz`` (sample predictions), the studies, optional:
``ablations/results.json`` (``make ablation``), ``ablations/masks.json`` (``make mask-study``) and
``ablations/parts.json`` (``make parts-study``), ``data/splits/meta.json`` (folds),
``data/index`` and, on PASCAL-5i / COCO-20i, the published results set beside this run's
(``references/published_results.yaml``, :mod:`pipeline.report.published`); writes
``reports/report.md`` (+ ``reports/figures/``), a self-contained ``reports/report.html``,
``reports/tables.tex`` (booktabs) and ``reports/metrics.json`` (the one DVC metrics file: the
headline figures, :func:`pipeline.report.document.summary_metrics`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from pipeline.core.artifacts import Staging, fingerprint, git_state, write_atomic, write_json
from pipeline.core.errors import PipelineError
from pipeline.core.params import Params
from pipeline.datasets.index import read_index_dir
from pipeline.report import document
from pipeline.report.figures import Sample
from pipeline.report.published import BENCHMARKS, load_published
from pipeline.report.tables import compute_of, scoring_of
from stages._common import stage_main

TITLE = "Language-guided few-shot segmentation with CLIP priors: results"
REPO_PUBLISHED = Path(__file__).resolve().parents[1] / "references/published_results.yaml"


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def study(results: dict | None) -> dict | None:
    """A study's results (``python -m pipeline.studies``); None when absent, empty or of the older format."""
    return results if results and results.get("rows") else None


def git_commit(root: Path = Path(".")) -> str:
    """HEAD's short hash, marked when code or params differ from it. dvc.lock is left out: every
    `dvc repro` that re-ran a stage rewrites it before this stage runs, and it is committed after."""
    state = git_state(root, ignore=("dvc.lock",))
    if state is None:
        return "unknown (not a git checkout)"
    commit, dirty = state
    return commit[:7] + (" (with uncommitted changes)" if dirty else "")


def read_curves(folder: Path) -> pd.DataFrame:
    """A fold's training curves as DVCLive wrote them (stages/train.py): ``epoch, loss, val_miou``."""
    tsvs = sorted((folder / "plots/metrics").glob("*.tsv"))
    columns = [pd.read_csv(tsv, sep="\t", index_col="step") for tsv in tsvs]
    return pd.concat(columns, axis=1).rename_axis("epoch").reset_index()


def load_samples(predictions: Path, index: pd.DataFrame, class_names: list[str]) -> list[Sample]:
    """The sample episodes evaluate kept, with their images and labels."""
    samples = []
    for path in sorted(predictions.glob("fold*.npz")):
        got = np.load(path)
        for j in range(len(got["query"])):
            query, support, c = str(got["query"][j]), str(got["support"][j]), int(got["class_id"][j])
            label = np.asarray(Image.open(index.at[query, "mask_path"]))
            samples.append(
                Sample(
                    title=f"{path.stem}: {class_names[c - 1]}",
                    support=np.asarray(Image.open(index.at[support, "image_path"]).convert("RGB")),
                    support_mask=got[f"support_mask_{j}"],
                    query=np.asarray(Image.open(index.at[query, "image_path"]).convert("RGB")),
                    truth=label == c,
                    prediction=got[f"prediction_{j}"] >= 128,
                )
            )
    return samples


def provenance(params: Params, splits: dict, clip_dir: Path, clip: dict | None,
               scored: str = "the prediction upsampled to each label's own size",
               compute: str | None = None, skipped: list[str] | None = None) -> dict[str, str]:
    """What a reader needs to reproduce or cite the numbers (``scored``: how the folds were scored;
    ``compute``: where and in which dtype; ``skipped``: broken images ``prepare`` left out)."""
    episodes, names = params.episodes, splits["class_names"]
    sha_file = clip_dir / "sha256.txt"
    out = {
        "dataset": params.dataset.name
        + (f" ({params.dataset.root})" if params.dataset.root else " (the embedded synthetic benchmark)"),
        **({"images skipped": f"{len(skipped)} broken images or masks left out by prepare "
                              f"(on_bad_image: skip; listed in data/index/meta.json), first: {skipped[0]}"}
           if skipped else {}),
        "folds": f"{len(splits['folds'])}, {splits['convention']} convention",
        **{
            f"fold {f['fold']} novel classes": ", ".join(names[c - 1] for c in f["novel"])
            for f in splits["folds"]
        },
        "class presence": f"at least {splits['min_pixels']} pixels; training images with a novel class: "
        f"{splits['novel_in_train']}",
        "protocol": f"{episodes.protocol}: {episodes.test_episodes} test episodes per fold, shot and seed; "
        f"shots {episodes.shots}, seeds {episodes.seeds}; evaluate.resize {params.evaluate.resize}: {scored}",
        "supervision": params.model.supervision
        + (
            " (language-guided: pseudo-masks as support masks)"
            if params.model.supervision == "text"
            else " (ground-truth support masks)"
        ),
        "CLIP model": params.clip.model + (f" / {params.clip.pretrained}" if params.clip.pretrained else ""),
        "CLIP weights sha256": sha_file.read_text().split()[0] if sha_file.is_file() else "unknown",
    }
    if clip and "zero_shot_top1" in clip:
        out["CLIP zero-shot top-1"] = (
            f"{100 * clip['zero_shot_top1']:.1f} % (chance {100 * clip['zero_shot_chance']:.1f} %)"
        )
    if clip and "dense_maskclip_miou" in clip:
        out["MaskCLIP dense mIoU"] = (
            f"{100 * clip['dense_maskclip_miou']:.1f} % (chance {100 * clip['dense_chance_miou']:.1f} %)"
        )
    out["backbone"] = f"{params.backbone.name} at {params.backbone.image_size} px (frozen)"
    if clip and "dtype" in clip:
        out["tiny CLIP trained in"] = clip["dtype"]
    out["compute"] = compute or "unknown"
    out["git commit"] = git_commit()
    return out


def run(params: Params, args: argparse.Namespace) -> None:
    metrics_dir = Path(args.metrics)
    folds = {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(metrics_dir.glob("fold*.json"))}
    if not folds:
        raise PipelineError(f"{metrics_dir}: no fold*.json (run the evaluate stages first)")
    index, meta = read_index_dir(Path(args.index))
    curves = {int(p.name[4:]): read_curves(p) for p in sorted(Path(args.curves).glob("fold*")) if p.is_dir()}
    ablations, clip = read_json(Path(args.ablations)), read_json(metrics_dir / "clip.json")
    splits = read_json(Path(args.splits) / "meta.json")
    if splits is None:
        raise PipelineError(f"{args.splits}/meta.json: missing (run the split stage first)")
    inputs = document.Inputs(
        folds=folds,
        pseudo=read_json(metrics_dir / "pseudo_masks.json"),
        clip=clip,
        curves=curves,
        samples=load_samples(Path(args.predictions), index.set_index("image_id"), meta["class_names"]),
        ablations=study(ablations),
        provenance=provenance(params, splits, Path(args.clip), clip, scoring_of(folds) or "unknown",
                              compute_of(folds), meta.get("skipped")),
        params_yaml=Path(args.params).read_text()
        if Path(args.params).is_file()
        else yaml.safe_dump(params.model_dump()),
        masks=study(read_json(Path(args.masks))),
        parts=study(read_json(Path(args.parts))),
        dataset=params.dataset.name,
        published=load_published(Path(args.published)) if params.dataset.name in BENCHMARKS else None,
    )
    sections = document.build(inputs)
    out = Path(args.out)
    figures = Staging(out / "figures", fingerprint(str(folds)))
    for section in sections:
        for figure in section.figures:
            (figures.path / f"{figure.name}.png").write_bytes(figure.png)
    figures.commit()
    write_atomic(out / "report.md", lambda tmp: tmp.write_text(document.render_markdown(sections, TITLE)))
    write_atomic(out / "report.html", lambda tmp: tmp.write_text(document.render_html(sections, TITLE)))
    write_atomic(out / "tables.tex", lambda tmp: tmp.write_text(document.render_latex(sections)))
    write_json(out / "metrics.json", document.summary_metrics(folds, inputs.pseudo, clip))
    print(f"report: {out / 'report.html'}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "report",
        run,
        {
            "index": "data/index",
            "splits": "data/splits",
            "metrics": "data/metrics",
            "curves": "data/plots/train",
            "predictions": "data/predictions",
            "ablations": "ablations/results.json",
            "masks": "ablations/masks.json",
            "parts": "ablations/parts.json",
            "clip": "data/models/clip",
            "published": "references/published_results.yaml",
            "out": "reports",
        },
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
