"""`make ablation` and `make mask-study`: studies of the model over training seeds, with error bars.

Not a DVC stage: it drives the ``train`` and ``evaluate`` stages. A :class:`Study` is a set of rows
(name -> params overriding the committed ``params.yaml``); every row runs for several training seeds
(``train.seed``) on every fold, on the committed pipeline's test episodes (``episodes.seeds``: the
test seeds). One (configuration, training seed, fold) is a *unit*: ``python -m stages.train`` then
``python -m stages.evaluate`` with the configuration's params, in ``data/ablation_runs/<digest>/``
(git-ignored, not a DVC output). The digest covers the unit's params, the code of both stages and
the DVC hashes of their data, so a re-run resumes (finished units are skipped, a unit's training
resumes from its checkpoint), units equal between studies are run once, and nothing stale is reused. Units run
``--jobs`` at a time: on CUDA one per visible GPU (never two on one device), on a CPU the cores
split between them.

It writes ``ablations/<study>.json``: per row its params, per training seed and fold the metrics,
and per shot the mean over folds with the sample std over training seeds and over test seeds, and
the paired two-level bootstrap difference against the study's reference row
(:mod:`pipeline.report.stats`); the ``masks`` study adds the precision and recall of the masks the
model was given. The report renders both. ``--seeds 0`` runs a cheaper first pass; more seeds later
add to it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from pydantic import ValidationError
from scipy.stats import binomtest

from pipeline.core.artifacts import fingerprint, git_state, write_json
from pipeline.core.params import Params, load_params
from pipeline.datasets.episodes import read_manifests
from pipeline.datasets.index import read_index_dir
from pipeline.pseudomasks import quality
from pipeline.report.stats import Scores, paired_bootstrap, summarize

FULL = "+ DPS + mask refine + CCM (the paper's full model)"
BASELINE = "Baseline: global prototype + RCM, initial masks"
REFINED = "Refined pseudo-masks"
GROUND_TRUTH = "Full model with ground-truth masks"


@dataclass(frozen=True)
class Study:
    """Rows (name -> params overriding the committed ones; ``{}`` is the committed configuration),
    the row the others are compared with, the components' contrasts ``(component, row with it, row
    without it)`` the report puts in words, the default training seeds, and the params the
    benchmark must have been made with (``section.key`` -> value; checked in ``params.yaml``)."""

    rows: dict[str, dict[str, object]]
    reference: str
    contrasts: tuple[tuple[str, str, str], ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    requires: tuple[tuple[str, object], ...] = ()


def _truth(morph: int) -> dict[str, object]:
    return {"model.pseudo_masks": "truth", "model.truth_morph": morph}


def switches(dps: bool = True, masks: str = "refined", ccm: bool = True, vtp: bool = True, pir: bool = True,
             vvp: bool = True) -> dict[str, object]:
    """Every component's switch, explicitly: a row means the same whatever the defaults are."""
    return {"model.dps": dps, "model.pseudo_masks": masks, "model.fcm": ccm, "model.vtp": vtp,
            "model.pir": pir, "model.vvp": vvp}


STUDIES: dict[str, Study] = {
    # the LFSS paper's Table 4, extended with the PI-CLIP priors
    "ablation": Study(
        {
            BASELINE: switches(dps=False, masks="initial", ccm=False),
            "+ DPS": switches(masks="initial", ccm=False),
            "+ DPS + mask refine": switches(ccm=False),
            FULL: switches(),
            "Full model without DPS": switches(dps=False),
            "Full model with initial masks": switches(masks="initial"),
            "Full model without PI-CLIP priors": switches(vtp=False, vvp=False),
            "Full model, VTP without PIR": switches(pir=False),
            "Full model without VVP": switches(vvp=False),
        },
        FULL,
        (
            ("DPS (on the baseline)", "+ DPS", BASELINE),
            ("mask refine (without CCM)", "+ DPS + mask refine", "+ DPS"),
            ("CCM (full-image correlation)", FULL, "+ DPS + mask refine"),
            ("DPS (in the full model)", FULL, "Full model without DPS"),
            ("mask refine (in the full model)", FULL, "Full model with initial masks"),
            ("the PI-CLIP priors (VTP and VVP)", FULL, "Full model without PI-CLIP priors"),
            ("PIR", FULL, "Full model, VTP without PIR"),
            ("VVP", FULL, "Full model without VVP"),
        ),
    ),
    # how good must the masks given to the model (query and supports) be? Controlled precision
    # (dilated ground truth) and recall (eroded), against the pseudo-masks
    "masks": Study(
        {
            REFINED: {"model.pseudo_masks": "refined"},
            "Initial pseudo-masks (MaskCLIP)": {"model.pseudo_masks": "initial"},
            "Ground truth": _truth(0),  # (dilating by 2 px or less stays inside the 255 band: the same)
            "Ground truth eroded 3 px": _truth(-3),
            "Ground truth eroded 5 px": _truth(-5),
            "Ground truth eroded 8 px": _truth(-8),
            "Ground truth dilated 5 px": _truth(5),
            "Ground truth dilated 8 px": _truth(8),
            "Ground truth dilated 12 px": _truth(12),
            "Ground-truth supports, refined query pseudo-mask": {"model.supervision": "mask",
                                                                  "model.pseudo_masks": "refined"},
        },
        REFINED,
        (
            ("refined instead of initial pseudo-masks", REFINED, "Initial pseudo-masks (MaskCLIP)"),
            ("ground-truth instead of refined masks", "Ground truth", REFINED),
            ("ground-truth supports (query pseudo-mask kept)",
             "Ground-truth supports, refined query pseudo-mask", REFINED),
        ),
    ),
    # does DPS help when objects have parts, as the distributed prototypes are meant for? The same
    # contrast as the ablation's on a benchmark of objects in two parts (`make parts-study`)
    "parts": Study(
        {
            FULL: switches(),
            "Full model without DPS": switches(dps=False),
            # the same without the pseudo-masks' errors: can DPS use parts when its seeds are right?
            GROUND_TRUTH: {**switches(masks="truth"), "model.truth_morph": 0},
            GROUND_TRUTH + ", without DPS": {**switches(dps=False, masks="truth"), "model.truth_morph": 0},
        },
        FULL,
        (
            ("DPS (in the full model, objects in two parts)", FULL, "Full model without DPS"),
            ("DPS with ground-truth masks (objects in two parts)", GROUND_TRUTH,
             GROUND_TRUTH + ", without DPS"),
        ),
        requires=(("prepare.synthetic.parts", True),),
    ),
}
RUNS = Path("data/ablation_runs")  # git-ignored, untracked by DVC
RUNNING: set[subprocess.Popen] = set()  # the stages running now (SIGTERM reaches them too)


def sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def with_overrides(params: dict, overrides: dict[str, object]) -> dict:
    """A deep copy of ``params`` with dotted ``section.key`` values replaced."""
    out = json.loads(json.dumps(params))
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        if key not in out.get(section, {}):
            raise SystemExit(f"error: {dotted}: no such param")
        out[section][key] = value
    return out


#: not in the code digest: the params schema's effect on a unit is its resolved params (hashed)
SCHEMA = "pipeline/core/params.py"
#: the params sections train and evaluate read; the others reach a unit through its data's hashes
READ = ("model", "train", "evaluate", "backbone", "pseudo_masks")


def input_digest() -> str:
    """What every unit also depends on besides its resolved params: the source files ``dvc.yaml``
    lists for train and evaluate (their contents; the schema's defaults are in the resolved params)
    and the DVC hashes of their data (``dvc.lock``)."""
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
    sources = sorted({d for name in ("train", "evaluate") for d in stages[name]["deps"]
                      if not d.startswith("data/") and d != SCHEMA})
    trained = {o["path"] for o in lock["train@0"]["outs"]}  # a unit trains its own model
    data = {d["path"]: d.get("md5") for name in ("train@0", "evaluate@0") for d in lock[name]["deps"]
            if d["path"].startswith("data/") and d["path"] not in trained}
    code = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in sources}
    return fingerprint({"code": code, "data": data})


@dataclass(frozen=True)
class Unit:
    row: str
    seed: int
    fold: int
    dir: Path

    @property
    def done(self) -> bool:
        return all((self.dir / "metrics" / f).is_file()
                   for f in (f"fold{self.fold}.json", f"fold{self.fold}_episodes.parquet"))

    def metrics(self) -> dict:
        return json.loads((self.dir / "metrics" / f"fold{self.fold}.json").read_text())

    def run(self, env: dict[str, str]) -> float:
        """Train then evaluate; the seconds it took. Output in ``fold{k}.log``."""
        start = time.monotonic()
        common = ["--params", str(self.dir / "params.yaml"), "--fold", str(self.fold),
                  "--models", str(self.dir / "models")]
        with (self.dir / f"fold{self.fold}.log").open("a") as log:
            for cmd in (["stages.train", *common, "--plots", str(self.dir / "plots")],
                        ["stages.evaluate", *common, "--metrics", str(self.dir / "metrics"),
                         "--predictions", str(self.dir / "predictions")]):
                process = subprocess.Popen([sys.executable, "-m", *cmd], stdout=log, stderr=subprocess.STDOUT,
                                           env=env)
                RUNNING.add(process)
                try:
                    code = process.wait()
                finally:
                    RUNNING.discard(process)
                if code:
                    raise RuntimeError(f"{cmd[0]} exited {code} (log: {self.dir / f'fold{self.fold}.log'})")
        return time.monotonic() - start


def plan(study: Study, rows: Sequence[str], seeds: Sequence[int], folds: Sequence[int],
         committed: dict, digest: str) -> list[Unit]:
    """The units of ``rows`` x ``seeds`` x ``folds``, their params files written and validated."""
    units = []
    for row in rows:
        for seed in seeds:
            params = with_overrides(committed, {**study.rows[row], "train.seed": seed})
            try:
                resolved = Params(**params).model_dump(mode="json")
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise SystemExit(f"error: study row {row!r}: {where}: {first['msg']}") from None
            read = {section: resolved[section] for section in READ}  # orchestration: how, not what
            unit_dir = RUNS / fingerprint({"params": read, "inputs": digest})
            unit_dir.mkdir(parents=True, exist_ok=True)
            (unit_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            units += [Unit(row, seed, fold, unit_dir) for fold in folds]
    return units


def execute(units: list[Unit], jobs: int, threads: int, gpus: int) -> None:
    """Run the unfinished units, ``jobs`` at a time (each on its own GPU when there are GPUs)."""
    todo = [u for u in units if not u.done]
    print(f"ablation: {len(units) - len(todo)} of {len(units)} units done before; {len(todo)} to run, "
          f"{jobs} at a time", flush=True)
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(jobs):
        slots.put(slot)
    started, finished = time.monotonic(), 0

    def work(unit: Unit) -> None:
        nonlocal finished
        slot = slots.get()
        try:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            seconds = unit.run(env)
        finally:
            slots.put(slot)
        finished += 1
        metrics = unit.metrics()
        shots = ", ".join(f"{k[4:]}-shot {v['miou']:.2f}" for k, v in sorted(metrics.items())
                          if k.startswith("shot"))
        left = (time.monotonic() - started) / finished * (len(todo) - finished)
        print(f"ablation: [{finished}/{len(todo)}] {unit.row}, seed {unit.seed}, fold {unit.fold}: {shots} "
              f"({seconds:.0f} s; about {left / 60:.0f} min left)", flush=True)

    pool = ThreadPoolExecutor(jobs)
    futures = [pool.submit(work, u) for u in todo]
    try:
        for future in futures:
            future.result()
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


def check_requires(name: str, study: Study, params: Params) -> None:
    """Exit with one line when ``params`` lack what the study's benchmark needs."""
    for key, value in study.requires:
        found = functools.reduce(getattr, key.split("."), params)
        if found != value:
            raise SystemExit(f"error: params.yaml: the {name} study needs {key}: {value} (it is {found}); "
                             f"`make {name}-study` runs it in a worktree of its own that has it")


def default_jobs() -> tuple[int, int, int]:
    """``(jobs, threads per job, GPUs)``: one unit per GPU; on a CPU, one per core pair up to 4 (two
    one-thread trainings do 1.6x the work of one two-thread training on 2 cores)."""
    gpus = torch.cuda.device_count()
    if gpus:
        return gpus, max(1, (os.cpu_count() or 1) // gpus), gpus
    cores = os.cpu_count() or 1
    jobs = min(4, cores)
    return jobs, max(1, cores // jobs), 0


def terminate(signum: int, frame: object) -> None:
    """SIGTERM: stop the running stages (they keep their checkpoints), then stop."""
    for process in list(RUNNING):
        process.terminate()
    raise KeyboardInterrupt("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("study", nargs="?", default="ablation", choices=sorted(STUDIES))
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the study's)")
    parser.add_argument("--only", nargs="+", help="names of the rows to run (default: all)")
    parser.add_argument("--jobs", type=int, help="units at once (default: one per GPU, or min(4, CPU cores))")
    parser.add_argument("--replicates", type=int, default=10_000, help="bootstrap replicates")
    parser.add_argument("--collect", action="store_true", help="only collect what is done")
    parser.add_argument("--out", help="results file (default: ablations/<study>.json)")
    args = parser.parse_args(argv)
    study = STUDIES[args.study]
    unknown = sorted(set(args.only or ()) - set(study.rows))
    if unknown:
        raise SystemExit(f"error: --only: no such row in {args.study}: {', '.join(unknown)}")
    out = Path(args.out or ("ablations/results.json" if args.study == "ablation"
                            else f"ablations/{args.study}.json"))
    jobs, threads, gpus = default_jobs()
    if args.jobs:
        jobs, threads = args.jobs, max(1, (os.cpu_count() or 1) // args.jobs) if not gpus else threads
    committed = yaml.safe_load(Path("params.yaml").read_text())
    check_requires(args.study, study, load_params("params.yaml"))
    sh(sys.executable, "-m", "dvc", "repro", "--quiet", "pseudo_masks")  # inputs current (cached: seconds)
    folds = list(range(committed["split"]["num_folds"]))
    rows = args.only or list(study.rows)
    seeds = args.seeds or list(study.seeds)
    known = sorted(set(seeds) | set(study.seeds))  # collected when done (by this or an earlier run)
    units = plan(study, list(study.rows), known, folds, committed, input_digest())
    chosen = [u for u in units if u.row in rows and u.seed in seeds]
    signal.signal(signal.SIGTERM, terminate)
    try:
        if not args.collect:
            execute(chosen, jobs, threads, gpus)
    except KeyboardInterrupt:
        print("ablation: stopped; finished units are kept: run it again to resume", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results = collect(args.study, study, units, committed, args.replicates, threads)
    write_json(out, results)
    pending = f"; not yet run: {', '.join(results['pending'])}" if results["pending"] else ""
    print(f"ablation: {len(results['rows'])} rows -> {out}{pending}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
