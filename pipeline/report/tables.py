"""Result tables shaped like the papers', as plain data (:class:`Table`), rendered to Markdown,
HTML and LaTeX (booktabs).

* :func:`results_table` — LFSS Tables 1-2: mIoU per fold and their mean, 1-shot and 5-shot,
  the trained model against the PI-CLIP priors alone; on PASCAL-5i / COCO-20i also the published
  rows (:mod:`pipeline.report.published`), each with its backbone, supervision and protocol.

The tables made from the folds' metrics carry, under them (``Table.notes``), the protocol the
folds were scored under and every convention's value (:func:`protocol_note`).
* :func:`fbiou_table` — FB-IoU, same shape.
* :func:`pseudo_mask_table` — LFSS Table 3: initial and refined pseudo-masks.
* :func:`ablation_table` — LFSS Table 4: which components were on, the mIoU over training and test
  seeds, and the paired difference from the full model with its significance.
* :func:`mask_study_table` — model mIoU against the precision and recall of the masks it is given.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.core.params import ModelParams
from pipeline.report.published import BENCHMARKS, Published, PublishedRow, published_for

YES, NO = "✓", "✗"


@dataclass
class Table:
    """A caption, a header and rows of cells (strings); ``groups`` are row indices after which
    a rule is drawn (e.g. between 1-shot and 5-shot); ``notes``: sentences printed under the table."""

    caption: str
    label: str
    header: list[str]
    rows: list[list[str]]
    groups: list[int] = field(default_factory=list)
    align: str = ""  # one of l/c/r per column; default: first left, the rest right
    notes: list[str] = field(default_factory=list)

    def aligns(self) -> str:
        return self.align or "l" + "r" * (len(self.header) - 1)


def fmt(value: float | None, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.1f}" if not std else f"{value:.1f} ± {std:.1f}"


def _per_fold(folds: dict[int, dict], shot: int, key: str) -> list[str]:
    """Each fold's ``key`` (± its std over test seeds), then the mean over folds (± the sample std
    over test seeds of the mean over folds, when every fold has the same seeds)."""
    values = [folds[k].get(f"shot{shot}", {}).get(key) for k in sorted(folds)]
    stds = [folds[k].get(f"shot{shot}", {}).get(f"{key}_std") for k in sorted(folds)]
    mean = float(np.mean(values)) if all(v is not None for v in values) else None
    return [fmt(v, s) for v, s in zip(values, stds, strict=True)] + [fmt(mean, mean_std(folds, shot, key))]


def mean_std(folds: dict[int, dict], shot: int, key: str) -> float | None:
    """The sample std over test seeds of the mean over folds of ``key`` (None for one seed)."""
    per_fold = [folds[k].get(f"shot{shot}", {}).get("seeds", {}) for k in sorted(folds)]
    seeds = sorted(set.intersection(*(set(s) for s in per_fold))) if per_fold else []
    if len(seeds) < 2 or any(key not in s[t] for s in per_fold for t in seeds):
        return None
    return float(np.std([np.mean([s[t][key] for s in per_fold]) for t in seeds], ddof=1))


def shots_of(folds: dict[int, dict]) -> list[int]:
    return sorted({int(k[4:]) for m in folds.values() for k in m if k.startswith("shot")})


def scoring_of(folds: dict[int, dict]) -> str | None:
    """How the folds' predictions were scored (their ``evaluate.resize``), when they say."""
    return "; ".join(sorted({m["scored"] for m in folds.values() if "scored" in m})) or None


def compute_of(folds: dict[int, dict]) -> str | None:
    """Where and how the folds were computed (torch, CPU kernels, training dtype), when they say."""
    seen = {(m["compute"]["torch"], m["compute"]["device"], m["compute"]["cpu_capability"],
             m["compute"]["native_cpu_bf16"], m.get("train_dtype", "unknown"))
            for m in folds.values() if "compute" in m}
    return "; ".join(f"torch {t} on {d}, CPU kernels {c} (native bf16: {'yes' if b else 'no'}), "
                     f"training in {p}" for t, d, c, b, p in sorted(seen)) or None


def protocols_of(folds: dict[int, dict]) -> list[dict]:
    """The distinct ``protocol`` records of the folds (``evaluate``'s: name and conventions)."""
    seen: list[dict] = []
    for metrics in folds.values():
        if "protocol" in metrics and metrics["protocol"] not in seen:
            seen.append(metrics["protocol"])
    return seen


def protocol_note(folds: dict[int, dict]) -> str:
    """The sentence under each table of the folds' figures: the protocol and every convention."""
    records = protocols_of(folds)
    if not records:
        return "Protocol: not recorded (metrics from an evaluate stage before protocols were recorded)."
    texts = [f"{r['name']} ({', '.join(f'{k}: {v}' for k, v in r['conventions'].items())})" for r in records]
    if len(texts) > 1:
        return "Protocols differ between folds: " + "; ".join(texts) + "."
    return f"Protocol: {texts[0]}."


def with_notes(table: Table, notes: list[str]) -> Table:
    """``table`` with ``notes`` printed under it."""
    table.notes = [*table.notes, *notes]
    return table


def scored_as(folds: dict[int, dict]) -> str:
    """:func:`scoring_of` as a caption's sentence."""
    scored = scoring_of(folds)
    return f" Scored: {scored}." if scored else ""


def published_cells(row: PublishedRow, folds: Sequence[int]) -> list[str]:
    """A published row's cells under this run's fold columns (folds 0-3; a fold the paper has no
    column for here is left out, one it does not report is "–")."""
    name = f"{row.method} ({row.backbone}, {row.supervision}; published, {row.protocol} protocol)"
    cells = [fmt(row.folds[k]) if 0 <= k < len(row.folds) else "–" for k in folds]
    return [name, f"{row.shot}", *cells, fmt(row.mean)]


def published_notes(dataset: str, published: Published | None, rows: Sequence[PublishedRow],
                    folds: dict[int, dict]) -> list[str]:
    """What the results table says of the published numbers: where each row is printed and how it
    compares, or that none apply (a dataset of the project's own)."""
    if dataset not in BENCHMARKS:
        return ["No published numbers apply: this dataset (the embedded synthetic benchmark, or one of "
                "the project's own) is not a benchmark with published few-shot results."]
    if published is None:
        return [f"Published {BENCHMARKS[dataset]} rows: not read (no published results file)."]
    if not rows:
        return [f"No published {BENCHMARKS[dataset]} rows for these shots in the published results file."]
    cited = " ".join(f"{r.method} ({r.backbone}): {published.citation(r)}." for r in rows)
    ours = {rec["name"] for rec in protocols_of(folds)}
    same = sorted({r.protocol for r in rows} & ours)
    match = (f"; published rows under the same protocol: {', '.join(same)}." if same else
             "; no published row was scored under it: compare with care "
             "(docs/method.md#reference-conventions).")
    return [f"Published {BENCHMARKS[dataset]} rows, as printed (not re-run here): {cited}",
            "This run's protocol: " + (", ".join(sorted(ours)) or "not recorded") + match]


def results_table(folds: dict[int, dict], model_name: str = "LFSS + PI-CLIP priors (ours)", *,
                  dataset: str = "synthetic", published: Published | None = None) -> Table:
    """mIoU (%) per fold and mean; per shot, the priors alone then the trained model, then (PASCAL-5i,
    COCO-20i) the published rows of that shot; the protocol and conventions under the table."""
    header = ["Method", "Shot", *[f"Fold {k}" for k in sorted(folds)], "Mean"]
    rows, groups, shown = [], [], []
    for shot in shots_of(folds):
        rows.append(
            ["PI-CLIP priors alone (VTP, no decoder)", f"{shot}", *_per_fold(folds, shot, "prior_miou")]
        )
        rows.append([model_name, f"{shot}", *_per_fold(folds, shot, "miou")])
        of_shot = published_for(published, dataset, shot) if published else []
        rows += [published_cells(row, sorted(folds)) for row in of_shot]
        shown += of_shot
        groups.append(len(rows))
    return Table(
        "Novel-class mIoU (%) of the test episodes, per fold and their mean." + scored_as(folds),
        "tab:results",
        header,
        rows,
        groups[:-1],
        "ll" + "r" * (len(folds) + 1),
        [protocol_note(folds), *published_notes(dataset, published, shown, folds)],
    )


def fbiou_table(folds: dict[int, dict]) -> Table:
    header = ["Shot", *[f"Fold {k}" for k in sorted(folds)], "Mean"]
    rows = [[f"{shot}", *_per_fold(folds, shot, "fbiou")] for shot in shots_of(folds)]
    caption = "FB-IoU (%) of the trained model on the test episodes." + scored_as(folds)
    return Table(caption, "tab:fbiou", header, rows, notes=[protocol_note(folds)])


def pseudo_mask_table(pseudo: dict) -> Table:
    """LFSS Table 3: mIoU (%) of the pseudo-masks of the 1-shot test episodes per fold, with the mean
    precision and recall (pixels summed over episodes) and the % of masks that miss their target."""
    folds = sorted(k for k in pseudo if k.startswith("fold"))
    extra = [(key, name) for key, name in (("precision", "Precision"), ("recall", "Recall"),
                                           ("missed", "Missed")) if f"query_refined_{key}" in pseudo["mean"]]
    header = ["Masks", *[f"Fold {k[4:]}" for k in folds], "Mean", *[name for _, name in extra]]
    rows = []
    for role in ("support", "query"):
        for kind, name in (("initial", "initial (MaskCLIP)"), ("refined", "refined")):
            key = f"{role}_{kind}"
            mean = pseudo["mean"]
            rows.append([f"{role.capitalize()}, {name}", *[fmt(pseudo[f][f"{key}_miou"]) for f in folds],
                         fmt(mean[f"{key}_miou"]), *[fmt(mean[f"{key}_{k}"]) for k, _ in extra]])
    return Table(
        "mIoU (%) of the language-guided pseudo-masks of the 1-shot test episodes against the ground "
        "truth, before and after the self-supported refiner"
        + ("; mean precision and recall, and the % of masks that cover less than a tenth of their "
           "target (missed)." if extra else "."),
        "tab:pseudo",
        header,
        rows,
        [2],
    )


ABLATION_SWITCHES = (
    ("dps", "DPS"),
    ("pseudo_masks", "Refine"),
    ("ccm", "CCM"),
    ("vtp", "VTP"),
    ("pir", "PIR"),
    ("vvp", "VVP"),
)


def switch_marks(model: dict) -> list[str]:
    """A study row's switches (its ``model`` params; the schema's defaults for keys it omits)."""
    cfg = ModelParams(**model)
    on = {"dps": cfg.dps, "pseudo_masks": cfg.pseudo_masks == "refined", "ccm": cfg.ccm, "vtp": cfg.vtp,
          "pir": cfg.vtp and cfg.pir, "vvp": cfg.vvp}
    return [YES if on[key] else NO for key, _ in ABLATION_SWITCHES]


def study_shots(results: dict) -> list[int]:
    return sorted({int(s) for row in results["rows"] for s in row["shots"]})


def miou_cell(figures: dict | None) -> str:
    """``mean ± std over training seeds (std over test seeds)``."""
    if not figures:
        return "–"
    cell = fmt(figures["mean"], figures.get("train_std") if figures.get("train_seeds", 1) > 1 else None)
    test_std = figures.get("test_std")
    return cell + (f" ({test_std:.1f})" if figures.get("test_seeds", 1) > 1 and test_std is not None else "")


def delta_cell(figures: dict | None, reference: bool) -> str:
    """The paired difference against the reference row: ``Δ [95 % interval] mark``."""
    if reference:
        return "ref."
    diff = (figures or {}).get("vs_reference")
    if not diff:
        return "–"
    return f"{signed(diff['delta'])} [{signed(diff['low'])}, {signed(diff['high'])}] {diff['mark']}"


def signed(value: float) -> str:
    """``+1.2`` / ``−1.2`` (a true minus sign)."""
    return f"{value:+.1f}".replace("-", "−")


def row_name(row: dict) -> str:
    """The row's name, marked when it is the committed configuration (``params.yaml``'s model)."""
    return row["name"] + (" (default)" if row.get("default") else "")


def seeds_cell(row: dict, results: dict) -> str:
    return f"{len(row['train_seeds'])} × {len(results['test']['seeds'])}"


def shot_header(shots: list[int]) -> list[str]:
    return [f"{s}-shot {what}" for s in shots for what in ("mIoU", "Δ")]


def shot_cells(row: dict, results: dict, shots: list[int]) -> list[str]:
    """Per shot, the row's mIoU cell and its difference from the reference row."""
    reference = row["name"] == results["reference"]
    figures = [row["shots"].get(str(s)) for s in shots]
    return [cell for f in figures for cell in (miou_cell(f), delta_cell(f, reference))]


def quality_cell(quality: dict, role: str) -> str:
    """``precision / recall / mIoU`` (%) of the role's masks."""
    keys = [f"{role}_precision", f"{role}_recall", f"{role}_miou"]
    return " / ".join(f"{quality[k]:.0f}" if k in quality else "–" for k in keys)


def significance_note(results: dict) -> str:
    test = results["test"]
    return (f"mIoU: mean over folds, ± sample std over training seeds (in parentheses over the "
            f"{len(test['seeds'])} test seeds of {test['episodes']} episodes); Δ: paired difference with "
            f"the reference row (ref.) and its 95 % interval by a two-level paired bootstrap over training "
            f"seeds and test episodes ({results['bootstrap']['replicates']} replicates): ** p < 0.01, "
            f"* p < 0.05, n.s. within noise.")


def ablation_table(results: dict, title: str = "Ablation", label: str = "tab:ablation") -> Table:
    """LFSS Table 4 (extended with the PI-CLIP priors): one row per configuration, its switches, its
    mIoU over training and test seeds and its difference from the full model, per shot.
    ``results``: ``ablations/results.json`` (``python -m pipeline.studies``; or a study of some of its
    rows)."""
    shots = study_shots(results)
    header = ["Run", *[name for _, name in ABLATION_SWITCHES], "Seeds", *shot_header(shots)]
    rows = [[row_name(row), *switch_marks(row["model"]), seeds_cell(row, results),
             *shot_cells(row, results, shots)] for row in results["rows"]]
    return Table(
        f"{title}: novel-class mIoU (%) with components switched off (Refine: refined pseudo-masks; CCM "
        "off keeps RCM only, as the paper's baseline). Seeds: training × test. " + significance_note(results),
        label,
        header,
        rows,
        align="l" + "c" * (len(ABLATION_SWITCHES) + 1) + "r" * (2 * len(shots)),
    )


def mask_study_table(results: dict) -> Table:
    """The mask-quality study: the masks the model was given (precision, recall and mIoU of the
    support and query masks against the ground truth), its base-class validation mIoU and its
    novel-class test mIoU per shot. ``results``: ``ablations/masks.json``."""
    shots = study_shots(results)
    header = ["Masks given", "Support P / R / IoU", "Query P / R / IoU", "Seeds", "Val mIoU",
              *shot_header(shots)]
    rows = [[row_name(row), *(quality_cell(row.get("mask_quality", {}), r) for r in ("support", "query")),
             seeds_cell(row, results), fmt(row["val_miou"]["mean"], row["val_miou"].get("train_std")),
             *shot_cells(row, results, shots)]
            for row in results["rows"]]
    return Table(
        "Mask quality: the model trained and tested with masks (query and supports) of controlled "
        "precision (P) and recall (R) against the ground truth (%, pixels of the 1-shot test episodes); "
        "Val mIoU: base-class validation episodes (what defaults are chosen on). "
        + significance_note(results),
        "tab:masks",
        header,
        rows,
        align="l" + "c" * 3 + "r" * (1 + 2 * len(shots)),
    )


def to_markdown(table: Table) -> str:
    align = {"l": ":--", "c": ":-:", "r": "--:"}
    lines = ["| " + " | ".join(table.header) + " |", "|" + "|".join(align[a] for a in table.aligns()) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    notes = "".join(f"\n*{note}*\n" for note in table.notes)
    return f"**{table.caption}**\n\n" + "\n".join(lines) + "\n" + notes


def to_html(table: Table) -> str:
    style = {"l": "left", "c": "center", "r": "right"}
    aligns = table.aligns()
    head = "".join(
        f'<th style="text-align:{style[a]}">{html.escape(h)}</th>'
        for h, a in zip(table.header, aligns, strict=True)
    )
    body = []
    for i, row in enumerate(table.rows):
        cls = ' class="group"' if i in table.groups else ""
        cells = "".join(
            f'<td style="text-align:{style[a]}">{html.escape(c)}</td>'
            for c, a in zip(row, aligns, strict=True)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    notes = "".join(f'<p class="note">{html.escape(note)}</p>' for note in table.notes)
    return (
        f'<table id="{table.label.replace(":", "-")}"><caption>{html.escape(table.caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>" + notes
    )


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_SYMBOLS = {YES: r"\checkmark", NO: "--", "±": r"$\pm$", "–": "--", "≥": r"$\geq$", "−": "$-$",
                  "×": r"$\times$", "Δ": r"$\Delta$"}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    for symbol, command in _LATEX_SYMBOLS.items():
        out = out.replace(symbol, command)
    return out


def to_latex(table: Table) -> str:
    """A ``table`` environment with a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``, and
    ``amssymb`` for ``\\checkmark``)."""
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(table.caption)}}}",
        rf"\label{{{table.label}}}",
        rf"\begin{{tabular}}{{{table.aligns()}}}",
        r"\toprule",
        " & ".join(latex_escape(h) for h in table.header) + r" \\",
        r"\midrule",
    ]
    for i, row in enumerate(table.rows):
        if i in table.groups:
            lines.append(r"\midrule")
        lines.append(" & ".join(latex_escape(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par\smallskip{{\footnotesize {latex_escape(note)}}}" for note in table.notes]
    lines += [r"\end{table}"]
    return "\n".join(lines) + "\n"
