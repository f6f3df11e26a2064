"""The report's content as sections, rendered to Markdown, a self-contained HTML page, and
``tables.tex``; plus the summary metrics (``metrics.json``)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import yaml

from pipeline.report import figures, tables
from pipeline.report.published import Published
from pipeline.report.tables import Table, signed


@dataclass
class Figure:
    name: str  # file stem under reports/figures/
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    code: str | None = None  # preformatted (e.g. params.yaml)


@dataclass
class Inputs:
    """Everything the report shows (read by the report stage)."""

    folds: dict[int, dict]  # data/metrics/fold{k}.json
    pseudo: dict | None  # data/metrics/pseudo_masks.json
    clip: dict | None  # data/metrics/clip.json
    curves: dict[int, pd.DataFrame]  # data/plots/train/fold{k}/ (DVCLive)
    samples: list[figures.Sample]
    ablations: dict | None  # ablations/results.json (python -m pipeline.studies ablation)
    provenance: dict[str, str]
    params_yaml: str
    masks: dict | None = None  # ablations/masks.json (python -m pipeline.studies masks)
    parts: dict | None = None  # ablations/parts.json (python -m pipeline.studies parts)
    dataset: str = "synthetic"  # dataset.name: pascal / coco get the published rows
    published: Published | None = None  # references/published_results.yaml (pascal / coco runs)


def fold_mean(folds: dict[int, dict], shot: int, key: str) -> float:
    """The mean over folds of a fold metric, to two decimals."""
    return round(float(np.mean([folds[k][f"shot{shot}"][key] for k in folds])), 2)


def summary_metrics(folds: dict[int, dict], pseudo: dict | None = None, clip: dict | None = None) -> dict:
    """``metrics.json``, the headline figures DVC shows as metrics (``dvc metrics show``, ``dvc exp
    show``), 17 columns: per shot the mean over folds of mIoU and FB-IoU and each fold's mIoU; the
    priors-alone mIoU once (the VTP prior uses no support: one figure for every shot; the 1-shot
    episodes'); the query pseudo-masks' mean mIoU, initial and refined; the CLIP's zero-shot top-1
    and MaskCLIP dense mIoU (%). With DVCLive's 8 training columns (validation mIoU and epoch per
    fold) ``dvc exp show`` has 25. Everything else stays in ``data/metrics/`` for the report."""
    out: dict = {}
    shots = tables.shots_of(folds)
    for shot in shots:
        per_fold = {f"fold{k}": {"miou": folds[k][f"shot{shot}"]["miou"]} for k in sorted(folds)}
        mean = {key: fold_mean(folds, shot, key) for key in ("miou", "fbiou")}
        out[f"shot{shot}"] = {"mean": mean, **per_fold}
    out["prior_miou"] = fold_mean(folds, shots[0], "prior_miou")
    if pseudo and "mean" in pseudo:
        out["pseudo_masks"] = {key: pseudo["mean"][key]
                               for key in ("query_initial_miou", "query_refined_miou")}
    if clip:
        out["clip"] = {key: round(100 * clip[key], 2) for key in ("zero_shot_top1", "dense_maskclip_miou")
                       if key in clip}
    return out


def study_provenance(results: dict, params: dict | None, path: str) -> str:
    """Where a study's rows come from (its results file is committed, so it may be older than this
    run), whether they were made with this run's params, and what is pending."""
    threads = results.get("threads", 1)
    text = f"Rows from `{path}` (commit {results['commit'][:7]}, {threads} thread{'s' * (threads > 1)} "
    text += "a unit)"
    made_with, required = results.get("params"), results.get("requires") or {}
    if required:
        text += " on a benchmark made with " + ", ".join(f"{k}: {v!s}".lower() for k, v in required.items())
    if made_with is not None and params is not None:
        theirs, ours = flat(made_with), flat({k: v for k, v in params.items() if k != "orchestration"})
        changed = sorted(key for key in theirs.keys() | ours.keys()
                         if theirs.get(key) != ours.get(key) and key not in required)
    if made_with is not None and params is not None and changed:
        text += (f": made with other params than this run ({', '.join(changed[:6])}"
                 f"{', ...' if len(changed) > 6 else ''}): re-run it before comparing with the tables above")
    pending = results.get("pending") or []
    return text + (f". Not yet run: {', '.join(pending)}." if pending else ".")


def flat(params: dict, prefix: str = "") -> dict[str, object]:
    """``{"section.key.subkey": value}`` of a params dict (nested sections flattened)."""
    out: dict[str, object] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def run_params(inputs: Inputs) -> dict | None:
    """This run's params as ``params.yaml`` has them."""
    try:
        loaded = yaml.safe_load(inputs.params_yaml)
    except yaml.YAMLError:
        return None
    return loaded if isinstance(loaded, dict) else None


def verdict(shots: dict[str, dict]) -> str:
    """``helps`` / ``hurts`` when every shot's difference is significant the same way, else
    ``no significant effect`` or ``mixed``."""
    signs = {np.sign(d["delta"]) if d["p"] < 0.05 else 0 for d in shots.values()}
    if signs == {1}:
        return "helps"
    if signs == {-1}:
        return "hurts"
    return "no significant effect" if signs == {0} else "mixed (significant for some shots only)"


def findings(results: dict) -> list[str]:
    """One sentence per component: its paired difference per shot, the interval, p and a verdict."""
    out = []
    for contrast in results.get("contrasts", []):
        if not contrast["shots"]:
            continue
        parts = [f"{signed(d['delta'])} {s}-shot [{signed(d['low'])}, {signed(d['high'])}], p = {d['p']:.3g}"
                 for s, d in sorted(contrast["shots"].items(), key=lambda item: int(item[0]))]
        seeds = len(next(iter(contrast["shots"].values()))["train_seeds"])
        name = contrast["component"][0].upper() + contrast["component"][1:]
        val = contrast.get("val")
        on_val = (f" Validation (base classes): {signed(val['delta'])}, better on {val['wins']} of "
                  f"{val['pairs']} fold × seed pairs (sign test p = {val['p']:.3g})." if val else "")
        out.append(f"**{name}** ({contrast['with']} vs {contrast['without']}, {seeds} training "
                   f"seed{'s' * (seeds > 1)}): {'; '.join(parts)} — {verdict(contrast['shots'])} on this "
                   f"benchmark.{on_val}")
    return out


def build(inputs: Inputs) -> list[Section]:
    """The report's sections in order; a section whose inputs are missing is left out."""
    sections = [summary_section(inputs), results_section(inputs), pseudo_mask_section(inputs),
                ablation_section(inputs), mask_study_section(inputs), parts_section(inputs),
                class_iou_section(inputs), training_section(inputs), qualitative_section(inputs),
                provenance_section(inputs)]
    return [s for s in sections if s is not None]


def summary_section(inputs: Inputs) -> Section:
    folds = inputs.folds
    shots = tables.shots_of(folds)
    headline = ", ".join(
        f"{s}-shot mIoU **{fold_mean(folds, s, 'miou'):.1f}** "
        f"(PI-CLIP priors alone {fold_mean(folds, s, 'prior_miou'):.1f})"
        for s in shots
    )
    beats = all(
        folds[k][f"shot{s}"]["miou"] > folds[k][f"shot{s}"]["prior_miou"] for k in folds for s in shots
    )
    return Section(
        "Summary",
        [
            f"Mean over {len(folds)} folds on {inputs.provenance.get('dataset', 'the dataset')}: "
            f"{headline}.",
            "The trained decoder beats thresholding its priors on every fold and shot."
            if beats
            else "On some fold or shot the trained decoder does **not** beat its priors alone: see the "
            "results table.",
        ],
    )


def results_section(inputs: Inputs) -> Section:
    return Section(
        "Results",
        [
            "Novel classes of each fold's test episodes (the fold's classes were never "
            "seen in training). mIoU per FSS convention: per class, intersections and unions "
            "summed over all episodes, then averaged over the fold's classes. The priors-alone "
            "row thresholds the query's (PIR-refined) VTP at the threshold best on the fold's "
            "base-class validation episodes, with no decoder; VTP depends on the query and the class name "
            "only, so this row is the same for every shot."
        ],
        [tables.results_table(inputs.folds, dataset=inputs.dataset, published=inputs.published),
         tables.fbiou_table(inputs.folds)],
    )


def pseudo_mask_section(inputs: Inputs) -> Section | None:
    if not inputs.pseudo:
        return None
    return Section(
        "Pseudo-masks",
        [
            "Support and query pseudo-masks of the 1-shot test episodes: "
            "MaskCLIP label maps (initial) and after the self-supported "
            "refiner (LFSS Table 3)."
        ],
        [tables.with_notes(tables.pseudo_mask_table(inputs.pseudo), [tables.protocol_note(inputs.folds)])],
    )


def ablation_section(inputs: Inputs) -> Section:
    if not inputs.ablations:
        return Section(
            "Ablation",
            [
                "No ablation results yet: `make ablation` runs the component ablations over three "
                "training seeds and this table appears."
            ],
        )
    return Section(
        "Ablation",
        [
            "Each row is the model trained on every fold for each training seed (`make ablation`) "
            "with the marked components, scored on the test episodes of every test seed.",
            study_provenance(inputs.ablations, run_params(inputs), "ablations/results.json"),
            *findings(inputs.ablations),
        ],
        [tables.ablation_table(inputs.ablations)],
    )


def mask_study_section(inputs: Inputs) -> Section | None:
    if not inputs.masks:
        return None
    return Section(
        "Mask quality",
        [
            "How good must the masks the model is given be? The model trained and tested with "
            "the ground truth, eroded (precision kept, recall lost) or dilated (recall kept, "
            "precision lost), against the pseudo-masks (`make mask-study`).",
            study_provenance(inputs.masks, run_params(inputs), "ablations/masks.json"),
            *findings(inputs.masks),
        ],
        [tables.mask_study_table(inputs.masks)],
        [Figure("mask_quality", "Model mIoU (1-shot) against the recall and precision of the query "
                "masks it was trained and tested with.", figures.mask_quality_figure(inputs.masks))],
    )


def parts_section(inputs: Inputs) -> Section | None:
    if not inputs.parts:
        return None
    return Section(
        "DPS on objects with parts",
        [
            "Does DPS help where its distributed prototypes are meant to, on objects whose parts "
            "look different? The ablation's DPS contrast on a benchmark of the same shapes in two "
            "parts: beyond each shape's axis a second colour and its class's texture "
            "(`make parts-study`).",
            study_provenance(inputs.parts, run_params(inputs), "ablations/parts.json"),
            *findings(inputs.parts),
        ],
        [tables.ablation_table(inputs.parts, "DPS on objects in two parts", "tab:parts")],
    )


def class_iou_section(inputs: Inputs) -> Section:
    return Section(
        "Per-class IoU",
        figures=[Figure("class_iou", "IoU of each novel class, per fold and shot.",
                        figures.class_iou_figure(inputs.folds))],
    )


def training_section(inputs: Inputs) -> Section | None:
    if not inputs.curves:
        return None
    return Section(
        "Training",
        figures=[
            Figure(
                "training_curves",
                "Training loss and validation mIoU (held-out base-class episodes) per epoch; the "
                "best validation epoch is kept.",
                figures.curves_figure(inputs.curves),
            )
        ],
    )


def qualitative_section(inputs: Inputs) -> Section | None:
    if not inputs.samples:
        return None
    return Section(
        "Qualitative results",
        figures=[
            Figure(
                "qualitative",
                "1-shot test episodes: the support with its language-guided pseudo-mask (green), the "
                "query with its ground truth (blue), the prediction (orange).",
                figures.qualitative_figure(inputs.samples),
            )
        ],
    )


def provenance_section(inputs: Inputs) -> Section:
    rows = [[key, value] for key, value in inputs.provenance.items()]
    if inputs.clip:  # its figures are in the provenance already, rounded: here what else it says
        rows += [
            [f"CLIP {key.replace('_', ' ')}", str(value)]
            for key, value in sorted(inputs.clip.items())
            if isinstance(value, str) and key not in ("model", "dtype", "sha256")
        ]
    return Section(
        "Provenance",
        tables=[
            Table("How these numbers were made.", "tab:provenance", ["Item", "Value"], rows, align="ll")
        ],
        code=inputs.params_yaml,
    )


def render_markdown(sections: Sequence[Section], title: str, figure_dir: str = "figures") -> str:
    parts = [f"# {title}\n"]
    for s in sections:
        parts.append(f"## {s.title}\n")
        parts += [f"{t}\n" for t in s.text]
        parts += [tables.to_markdown(t) for t in s.tables]
        parts += [f"![{f.caption}]({figure_dir}/{f.name}.png)\n\n*{f.caption}*\n" for f in s.figures]
        if s.code:
            parts.append(f"```yaml\n{s.code.rstrip()}\n```\n")
    return "\n".join(parts)


CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 960px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .4em; }
th, td { padding: .25em .7em; } thead th { border-top: 2px solid #222; border-bottom: 1px solid #222; }
tbody tr:last-child td { border-bottom: 2px solid #222; } tr.group td { border-top: 1px solid #222; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: .92em; }
p.note { color: #555; font-size: .92em; margin-top: -.4em; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: .85em; }
nav a { margin-right: .8em; }
"""


def _inline_markdown(text: str) -> str:
    """``**bold**`` and ``code`` spans of the report's own sentences."""
    out, parts = [], html.escape(text).split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{part}</code>")
        else:
            bold = part.split("**")
            out.append("".join(f"<strong>{b}</strong>" if j % 2 else b for j, b in enumerate(bold)))
    return "".join(out)


def render_html(sections: Sequence[Section], title: str) -> str:
    """One self-contained page: figures embedded as base64 PNG, no external resources."""
    anchors = [s.title.lower().replace(" ", "-") for s in sections]
    nav = " ".join(
        f'<a href="#{a}">{html.escape(s.title)}</a>' for a, s in zip(anchors, sections, strict=True)
    )
    body = [f"<h1>{html.escape(title)}</h1>", f"<nav>{nav}</nav>"]
    for anchor, s in zip(anchors, sections, strict=True):
        body.append(f'<h2 id="{anchor}">{html.escape(s.title)}</h2>')
        body += [f"<p>{_inline_markdown(t)}</p>" for t in s.text]
        body += [tables.to_html(t) for t in s.tables]
        for f in s.figures:
            data = base64.b64encode(f.png).decode()
            body.append(
                f'<figure><img alt="{html.escape(f.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
            )
        if s.code:
            body.append(f"<details><summary>params.yaml</summary><pre>{html.escape(s.code)}</pre></details>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def render_latex(sections: Sequence[Section]) -> str:
    header = (
        "% Generated by the report stage. Needs \\usepackage{booktabs} and \\usepackage{amssymb} "
        "(for \\checkmark).\n\n"
    )
    return header + "\n".join(
        tables.to_latex(t) for s in sections for t in s.tables if t.label != "tab:provenance"
    )
