"""``python -m pipeline.studies <study>`` (``make ablation``, ``make mask-study``, ``make parts-study``):
the studies of the model over training seeds, with error bars (docs/studies.md).

Not a DVC stage: it drives the ``train`` and ``evaluate`` stages, one unit (configuration, training
seed, fold) at a time or a few at once (:mod:`pipeline.studies.units`), on the committed pipeline's
test episodes, and writes ``ablations/<study>.json`` (:mod:`pipeline.studies.results`), which the
report renders. ``--seeds 0`` runs a cheaper first pass; more seeds later add to it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import yaml

from pipeline.core.artifacts import write_json
from pipeline.core.errors import PipelineError
from pipeline.core.params import load_params
from pipeline.studies.definitions import STUDIES, check_requires
from pipeline.studies.results import collect
from pipeline.studies.units import default_jobs, execute, input_digest, plan, sh, terminate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.studies", description=__doc__.split("\n\n")[0])
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
    try:
        params = load_params("params.yaml")  # one line for a bad or empty file, before any work
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out or ("ablations/results.json" if args.study == "ablation"
                            else f"ablations/{args.study}.json"))
    jobs, threads, gpus = default_jobs()
    if args.jobs:
        jobs, threads = args.jobs, max(1, (os.cpu_count() or 1) // args.jobs) if not gpus else threads
    committed = yaml.safe_load(Path("params.yaml").read_text())
    check_requires(args.study, study, params)
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
