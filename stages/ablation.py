"""`make ablation`: the component ablations as DVC experiments, collected for the report.

Not a DVC stage: it drives DVC. For every row of :data:`ABLATIONS` it runs, in the workspace,
``dvc exp run -n ablation-<n> -S key=value ...`` starting from the committed params (only
``train@*``, ``evaluate@*`` and ``report`` re-run: the switches are ``model.*`` params), reads
each fold's metrics, then writes ``ablations/results.json`` — the report's Ablation table
(the LFSS paper's Table 4, extended with the PI-CLIP priors) — and restores the workspace to the
committed params and outputs. The experiments stay listed in ``dvc exp show``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.core.artifacts import git_state, write_json

# name -> params overriding the committed ones ({} is the committed configuration itself)
ABLATIONS: dict[str, dict[str, object]] = {
    "Baseline: global prototype + RCM, initial masks": {
        "model.dps": False,
        "model.pseudo_masks": "initial",
        "model.fcm": False,
    },
    "+ DPS": {"model.pseudo_masks": "initial", "model.fcm": False},
    "+ DPS + mask refine": {"model.fcm": False},
    "+ DPS + mask refine + CCM (full model)": {},
    "Full model without PI-CLIP priors": {"model.vtp": False, "model.vvp": False},
    "Full model, VTP without PIR": {"model.pir": False},
    "Full model without VVP": {"model.vvp": False},
}


def sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def fold_metrics(metrics_dir: Path) -> dict[str, dict]:
    return {p.stem[4:]: json.loads(p.read_text()) for p in sorted(metrics_dir.glob("fold*.json"))}


def model_params(params: Path) -> dict:
    return yaml.safe_load(params.read_text())["model"]


def restore() -> None:
    sh(
        "git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock"
    )  # HEAD: DVC may have staged the experiment's
    sh(sys.executable, "-m", "dvc", "checkout", "--force", "--quiet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="ablations/results.json")
    parser.add_argument("--only", nargs="*", help="names of the rows to run (default: all)")
    args = parser.parse_args(argv)
    if sh("git", "status", "--porcelain", "--", "params.yaml", "dvc.lock").strip():
        raise SystemExit(
            "error: params.yaml or dvc.lock has uncommitted changes; commit them (the ablations "
            "start from the committed configuration)"
        )
    out, committed = Path(args.out), model_params(Path("params.yaml"))
    done = {r["name"]: r for r in json.loads(out.read_text())["runs"]} if out.is_file() else {}
    runs = []
    try:
        for i, (name, overrides) in enumerate(ABLATIONS.items()):
            if args.only and name not in args.only:
                continue
            if name in done and done[name]["overrides"] == overrides and done[name]["base"] == committed:
                print(f"ablation {i + 1}/{len(ABLATIONS)}: {name}: done before", flush=True)
                runs.append(done[name])  # a resumed run keeps what an interrupted one finished
                continue
            print(f"ablation {i + 1}/{len(ABLATIONS)}: {name}", flush=True)
            restore()  # every row starts from the committed params and outputs
            if overrides:
                sets = [a for key, value in overrides.items() for a in ("-S", f"{key}={json.dumps(value)}")]
                subprocess.run(
                    [sys.executable, "-m", "dvc", "exp", "remove", f"ablation-{i}"], capture_output=True
                )
                sh(
                    sys.executable, "-m", "dvc", "exp", "run", "-n", f"ablation-{i}", *sets
                )  # a re-run replaces it
            else:
                sh(sys.executable, "-m", "dvc", "repro")  # the committed configuration: cached, or run
            runs.append(
                {
                    "name": name,
                    "overrides": overrides,
                    "base": committed,
                    "model": model_params(Path("params.yaml")),
                    "commit": (git_state() or ("unknown", False))[0],
                    "folds": fold_metrics(Path("data/metrics")),
                }
            )
            write_json(out, {"runs": runs})  # after every run: progress survives a crash
    finally:
        restore()
    print(f"ablation: {len(runs)} runs -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
