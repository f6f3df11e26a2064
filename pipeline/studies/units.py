"""Study units: one (configuration, training seed, fold) is ``python -m stages.train`` then
``python -m stages.evaluate`` with the configuration's params, in ``data/ablation_runs/<digest>/``
(git-ignored, not a DVC output). The digest covers the unit's params, the code of both stages and
the DVC hashes of their data, so a re-run resumes (finished units are skipped, a unit's training
resumes from its checkpoint), units equal between studies run once, and nothing stale is reused.
Units run ``jobs`` at a time: on CUDA one per visible GPU (never two on one device), on a CPU the
cores split between them.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from pipeline.core.artifacts import fingerprint
from pipeline.core.params import Params
from pipeline.studies.definitions import Study, with_overrides

RUNS = Path("data/ablation_runs")  # git-ignored, untracked by DVC
RUNNING: set[subprocess.Popen] = set()  # the stages running now (SIGTERM reaches them too)


def sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


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
