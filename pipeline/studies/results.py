"""A study's results from its finished units: per row the metrics of every training seed and fold,
the mean over folds with the sample std over training and test seeds, the paired two-level bootstrap
difference against the reference row (:mod:`pipeline.report.stats`), base-class validation contrasts
with a sign test, and for the ``masks`` study the quality of the masks each row gives the model."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from scipy.stats import binomtest

from pipeline.core.artifacts import git_state
from pipeline.datasets.episodes import read_manifests
from pipeline.datasets.index import read_index_dir
from pipeline.pseudomasks import quality
from pipeline.report.stats import Scores, paired_bootstrap, summarize
from pipeline.studies.definitions import Study, with_overrides
from pipeline.studies.units import Unit


@functools.cache
def episode_counts(path: Path) -> pd.DataFrame:
    """A unit's per-episode counts, read once per process (the reference row's serve every row)."""
    return pd.read_parquet(path)


def unit_scores(units: list[Unit], shot: int) -> dict[int, Scores]:
    """Per fold, the :class:`Scores` of ``units`` (one configuration, every training seed)."""
    folds: dict[int, list[pd.DataFrame]] = {}
    for unit in sorted(units, key=lambda u: (u.fold, u.seed)):
        table = episode_counts(unit.dir / "metrics" / f"fold{unit.fold}_episodes.parquet")
        folds.setdefault(unit.fold, []).append(table[table["shot"] == shot])
    return {fold: Scores.of(tables) for fold, tables in folds.items()}


def mask_quality(row_params: dict, folds: Sequence[int]) -> dict[str, float]:
    """Mean over folds of the mIoU, precision and recall (%) of the masks the model is given, on
    each fold's first 1-shot test manifest (the one ``data/metrics/pseudo_masks.json`` measures)."""
    model = row_params["model"]
    pseudo = json.loads(Path("data/metrics/pseudo_masks.json").read_text())
    kind = model["pseudo_masks"]
    truth_roles = ("support", "query") if kind == "truth" else ()
    if model["supervision"] == "mask":
        truth_roles = ("support",)
    if truth_roles:
        index, meta = read_index_dir(Path("data/index"))
        manifests = read_manifests(Path("data/episodes"))
        labels = dict(zip(index.image_id, index.mask_path, strict=True))
    out: dict[str, list[float]] = {}
    for fold in folds:
        figures = {k.replace(f"_{kind}", ""): v for k, v in pseudo[f"fold{fold}"].items() if f"_{kind}_" in k}
        if truth_roles:
            name = next(n for n in pseudo["evaluated"] if n.startswith(f"test/fold{fold}/"))
            meters = quality.evaluate_truth(manifests[name], labels.__getitem__, len(meta["class_names"]),
                                            model["truth_morph"])
            figures |= {k: v for k, v in quality.figures(meters).items() if k.split("_")[0] in truth_roles}
        for key, value in figures.items():
            out.setdefault(key, []).append(value)
    return {key: round(sum(v) / len(v), 2) for key, v in sorted(out.items())}


def finite(value: float) -> float | None:
    """Rounded, or None for a std of one seed (JSON has no NaN)."""
    return None if math.isnan(value) else round(value, 2)


def compare(ours: list[Unit], theirs: list[Unit], shot: int, replicates: int) -> dict | None:
    """The paired bootstrap difference ``ours - theirs`` over their common training seeds."""
    common = sorted({u.seed for u in ours} & {u.seed for u in theirs})
    if not common:
        return None
    diff = paired_bootstrap(unit_scores([u for u in ours if u.seed in common], shot),
                            unit_scores([u for u in theirs if u.seed in common], shot), replicates)
    return {"delta": round(diff.delta, 2), "low": round(diff.low, 2), "high": round(diff.high, 2),
            "p": round(diff.p, 4), "mark": diff.mark(), "train_seeds": common}


def compare_val(ours: list[Unit], theirs: list[Unit]) -> dict | None:
    """The base-class validation mIoU (what defaults are chosen on) of ``ours`` minus ``theirs`` over
    their common (fold, training seed) pairs: the mean difference, how many pairs ``ours`` wins, and
    the two-sided sign test's p."""
    def val(units: list[Unit]) -> dict[tuple[int, int], float]:
        return {(u.fold, u.seed): u.metrics()["best_val_miou"] for u in units}

    a, b = val(ours), val(theirs)
    pairs = sorted(set(a) & set(b))
    if not pairs:
        return None
    diffs = [a[p] - b[p] for p in pairs]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
    return {"delta": round(sum(diffs) / len(diffs), 2), "wins": wins, "pairs": len(pairs), "p": round(p, 4)}


def collect(name: str, study: Study, units: list[Unit], committed: dict, replicates: int,
            threads: int = 1) -> dict:
    """The study's results: rows whose units are all done, summarized and compared with the reference."""
    by_row: dict[str, list[Unit]] = {}
    for unit in units:
        by_row.setdefault(unit.row, []).append(unit)
    folds = sorted({u.fold for u in units})
    complete = {}
    for row, row_units in by_row.items():
        seeds = sorted(s for s in {u.seed for u in row_units}
                       if all(u.done for u in row_units if u.seed == s))
        if seeds:
            complete[row] = [u for u in row_units if u.seed in seeds]
    reference = complete.get(study.reference)
    rows = []
    for row, row_units in complete.items():
        seeds = sorted({u.seed for u in row_units})
        metrics = {f"seed{u.seed}": {} for u in row_units}
        for u in row_units:
            metrics[f"seed{u.seed}"][f"fold{u.fold}"] = u.metrics()
        val = pd.Series({seed: sum(m["best_val_miou"] for m in folds_.values()) / len(folds_)
                         for seed, folds_ in metrics.items()})  # per training seed, the mean over folds
        shots = {}
        for shot in sorted({int(k[4:]) for s in metrics.values() for m in s.values() for k in m
                            if k.startswith("shot")}):
            scores = unit_scores(row_units, shot)
            summary = summarize(scores)
            figures = {"mean": round(summary.mean, 2), "train_std": finite(summary.train_std),
                       "test_std": finite(summary.test_std), "train_seeds": summary.train_seeds,
                       "test_seeds": summary.test_seeds,
                       "folds": {str(f): round(s.miou(), 2) for f, s in scores.items()}}
            if reference is not None and row != study.reference:
                diff = compare(row_units, reference, shot, replicates)
                if diff:
                    figures["vs_reference"] = diff
            shots[str(shot)] = figures
        row_params = with_overrides(committed, study.rows[row])
        out = {"name": row, "overrides": study.rows[row], "model": row_params["model"], "train_seeds": seeds,
               "default": row_params["model"] == committed["model"],
               "val_miou": {"mean": round(float(val.mean()), 2),
                            "train_std": round(float(val.std(ddof=1)), 2) if len(val) > 1 else None},
               "shots": shots, "metrics": metrics}
        if name == "masks":
            out["mask_quality"] = mask_quality(row_params, folds)
        rows.append(out)
    order = list(study.rows)
    rows.sort(key=lambda r: order.index(r["name"]))
    contrasts = []
    all_shots = sorted({s for r in rows for s in r["shots"]})
    for component, with_it, without_it in study.contrasts:
        if with_it in complete and without_it in complete:
            diffs = {s: compare(complete[with_it], complete[without_it], int(s), replicates)
                     for s in all_shots}
            contrasts.append({"component": component, "with": with_it, "without": without_it,
                              "shots": {s: d for s, d in diffs.items() if d},
                              "val": compare_val(complete[with_it], complete[without_it])})
    episodes = committed["episodes"]
    return {
        "study": name,
        "reference": study.reference,
        "commit": (git_state() or ("unknown", False))[0],
        "params": {k: v for k, v in committed.items() if k != "orchestration"},  # the committed ones
        "threads": threads,  # per unit: training differs a little with the thread count
        "folds": folds,
        "test": {"protocol": episodes["protocol"], "episodes": episodes["test_episodes"],
                 "seeds": episodes["seeds"]},
        "bootstrap": {"replicates": replicates, "method": "two-level paired bootstrap: test episodes within "
                      "each test seed and training seeds, the same draws for both rows; 95 % percentile "
                      "interval; two-sided p"},
        "requires": dict(study.requires),  # the benchmark it was made on
        "pending": sorted(row for row in by_row if row not in complete),
        "rows": rows,
        "contrasts": contrasts,
    }
