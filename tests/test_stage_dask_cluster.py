"""The stages on a real Dask cluster: a ``dask scheduler`` and two ``dask worker`` processes on
127.0.0.1, started here as on a cluster (the workers in a working directory of their own, the
project on their ``PYTHONPATH``), and each stage run as DVC runs it (``python -m stages.X``, its
paths relative to its own working directory). Its stores equal the threads runner's, byte for byte.

The commands are those of docs/operations.md "Orchestration"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from pipeline.core.interrupt import die_with_parent
from pipeline.core.prefect_server import start_server, stop
from tests.conftest import REPO, TRAIN_SMOKE, files_of, write_params

pytestmark = pytest.mark.slow

DASK = str(Path(sys.executable).parent / "dask")


@contextmanager
def dask_cluster(root: Path, workers: int = 2) -> Iterator[str]:
    """A scheduler on a free port of 127.0.0.1 and ``workers`` one-thread workers (in
    ``root/worker-i``, the project on their ``PYTHONPATH``); yields the scheduler's address. Every
    process is stopped on the way out, however the block ends (and by the kernel if this one dies)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    scheduler_file = root / "scheduler.json"
    with ExitStack() as stack:
        def start(cmd: list[str], cwd: Path, log: str) -> subprocess.Popen:
            cwd.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context((root / log).open("w"))
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=die_with_parent)
            stack.callback(stop, proc)  # terminate, then kill after 10 s
            return proc

        start([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
               "--scheduler-file", str(scheduler_file)], root / "scheduler", "scheduler.log")
        for i in range(workers):
            start([DASK, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                   "--no-dashboard", "--name", f"worker-{i}"], root / f"worker-{i}", f"worker-{i}.log")
        # asked from a process of its own: a distributed Client in this one leaves threads behind, and
        # the DataLoader workers later tests fork from it would die (exit code 1)
        ready = subprocess.run([sys.executable, "-c", READY, str(scheduler_file), str(workers)], env=env,
                               capture_output=True, text=True, timeout=240, check=True)
        address, where = json.loads(ready.stdout)
        assert sorted(where) == [str(root / f"worker-{i}") for i in range(workers)]
        yield address


READY = """
import json, os, sys
from distributed import Client
with Client(scheduler_file=sys.argv[1], timeout="60s") as client:
    client.wait_for_workers(int(sys.argv[2]), timeout=120)
    print(json.dumps([client.scheduler.address, list(client.run(os.getcwd).values())]))
"""


def run_stage(name: str, cwd: Path, env: dict, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_priors_features_and_pseudo_masks_on_a_real_cluster_equal_the_threads_runner(
        priors_run, features_run, model_inputs, pipeline_run, tmp_path):
    run = tmp_path / "run"  # the stage's working directory: the smoke run's inputs, relative paths
    run.mkdir()
    for name in ("index", "episodes", "clip"):
        (run / name).symlink_to(pipeline_run / name)
    with ExitStack() as stack:
        server, url = start_server(tmp_path / "prefect.log")  # one Prefect server for the three stages
        stack.callback(stop, server)
        address = stack.enter_context(dask_cluster(tmp_path / "cluster"))
        env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": url}
        on_cluster = {"orchestration": {"task_runner": "dask", "dask_address": address}}
        params = str(write_params(run / "params.yaml", on_cluster))
        run_stage("priors", run, env, "--params", params, "--index", "index", "--episodes", "episodes",
                  "--clip", "clip", "--out", "priors.zarr", "--preview", "priors.png")
        run_stage("features", run, env, "--params", params, "--index", "index", "--episodes", "episodes",
                  "--clip", "clip", "--out", "features.zarr")
        model = str(write_params(run / "model.params.yaml", {**TRAIN_SMOKE, **on_cluster}))
        run_stage("pseudo_masks", run, env, "--params", model, "--index", "index", "--episodes", "episodes",
                  "--priors", "priors.zarr", "--features", "features.zarr", "--out", "pseudo_masks.zarr",
                  "--metrics", "pseudo_masks.json")
    for store in (priors_run, features_run, pipeline_run / "pseudo_masks.zarr"):
        expected, got = files_of(store), files_of(run / store.name)
        assert expected.keys() == got.keys(), store.name
        assert [f for f in expected if expected[f] != got[f]] == [], store.name
    assert (json.loads((run / "pseudo_masks.json").read_text())
            == json.loads((pipeline_run / "pseudo_masks.json").read_text()))
