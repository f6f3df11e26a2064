"""Stages interrupted: SIGINT / SIGTERM stop them within seconds with one line and status 130, SIGKILL
leaves nothing in place; a re-run resumes and equals an uninterrupted run (priors, pseudo_masks,
train@k, evaluate@k, clip_model's tiny-CLIP training)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import priors
from tests.conftest import REPO, SMOKE_PARAMS, model_args, priors_args, write_params, zarr_arrays

pytestmark = pytest.mark.slow


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_training_within_seconds_and_a_rerun_resumes(model_inputs, pipeline_run, tmp_path,
                                                                     sig):
    """Ctrl-C (SIGINT: also when the launcher ignores it, as a script's background job does) and
    SIGTERM stop ``train@k`` within seconds with one line and status 130, the epoch checkpoint
    kept; a rerun resumes from it."""
    import signal
    import time

    params = write_params(tmp_path / "params.yaml", {"train": {"epochs": 20, "batch_size": 8},
                                                     "model": {"hidden": 8}})
    cmd = [sys.executable, "-m", "stages.train", *model_args(pipeline_run, params, tmp_path),
           "--plots", str(tmp_path / "plots")]
    checkpoint = tmp_path / "models/.fold1.partial/checkpoint.pt"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), proc.communicate()[0][-2000:]
    sent = time.monotonic()
    proc.send_signal(getattr(signal, sig))
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and time.monotonic() - sent < 15, out[-2000:]
    assert f"train: stopped by {sig}" in out and "Traceback" not in out
    assert checkpoint.exists() and not (tmp_path / "models/fold1").exists()
    if sig == "SIGINT":
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        epochs = [int(e) for e in re.findall(r"fold 1 epoch (\d+):", done.stdout + done.stderr)]
        assert epochs and epochs[0] > 1 and epochs[-1] == 20  # resumed, not restarted
        assert (tmp_path / "models/fold1/model.pt").is_file()


# --- SIGKILL: no handler runs, nothing is flushed; a re-run of the stage itself must recover ----------

def children(pid: int) -> set[int]:
    """The child processes of ``pid`` (a Prefect server, task-runner workers)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def signal_when(cmd: list[str], ready, log: Path, sig: str = "SIGKILL", timeout: float = 300,
                group: bool = False) -> dict:
    """Run a stage in a process of its own and send it ``sig`` as soon as ``ready()`` (``group``: to
    its whole process group, as Ctrl-C in a terminal does); no child of it (its Prefect server,
    task-runner workers) may outlive it by more than a few seconds. Returns its exit status, the
    seconds it took to exit after the signal, its children then and its output."""
    import signal
    import time

    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=group,
                                env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"})
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the signal: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.02)
    orphans = had = children(proc.pid)
    sent = time.monotonic()
    if group:
        os.killpg(proc.pid, getattr(signal, sig))
    else:
        proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=120)
    seconds = time.monotonic() - sent
    while orphans and time.monotonic() < sent + 15:
        orphans = {c for c in orphans if Path(f"/proc/{c}").exists()
                   and Path(f"/proc/{c}/stat").read_text().split()[2] != "Z"}
        time.sleep(0.2)
    assert not orphans, f"left running after {sig}: {orphans}"
    return {"status": proc.returncode, "seconds": seconds, "children": had, "output": log.read_text()}


def truncate_a_finished_shard(partial: Path) -> str:
    """Cut the first file a finished shard recorded to half its size; returns the shard."""
    for marker in sorted((partial / ".done").iterdir()):
        record = json.loads(marker.read_text())
        name = next((n for n, digest in sorted(record.items()) if digest), None)
        if name:
            data = (partial / name).read_bytes()
            (partial / name).write_bytes(data[: len(data) // 2])
            return marker.name
    raise AssertionError(f"no finished shard with files in {partial}")


def test_priors_killed_then_rerun_equal_an_uninterrupted_run(priors_run, pipeline_run, tmp_path, capsys):
    """SIGKILL once a shard is finished, then a finished shard's file cut short on disk: the re-run
    redoes that shard and the missing ones, and the store equals an uninterrupted run bit for bit."""
    out = tmp_path / "priors.zarr"
    args = priors_args(pipeline_run, out)
    partial = tmp_path / ".priors.zarr.partial"
    killed = signal_when([sys.executable, "-m", "stages.priors", *args],
                         lambda: any((partial / ".done").glob("images-*")), tmp_path / "killed.log")
    assert killed["children"]  # a stage run by hand starts its own Prefect server: it went too
    assert not out.exists()
    shard = truncate_a_finished_shard(partial)
    assert priors.main(args) == 0
    assert f"shard {shard}: " in capsys.readouterr().err
    expected, got = zarr_arrays(priors_run), zarr_arrays(out)
    assert expected.keys() == got.keys() and not partial.exists()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name


def test_pseudo_masks_killed_then_rerun_equal_an_uninterrupted_run(model_inputs, pipeline_run, tmp_path,
                                                                   capsys):
    from stages import pseudo_masks

    out, partial = tmp_path / "pseudo_masks.zarr", tmp_path / ".pseudo_masks.zarr.partial"
    args = ["--params", str(model_inputs), "--index", str(pipeline_run / "index"),
            "--episodes", str(pipeline_run / "episodes"), "--priors", str(pipeline_run / "priors.zarr"),
            "--features", str(pipeline_run / "features.zarr"), "--out", str(out),
            "--metrics", str(tmp_path / "pseudo_masks.json")]
    signal_when([sys.executable, "-m", "stages.pseudo_masks", *args],
                lambda: any((partial / ".done").glob("*")), tmp_path / "killed.log")
    assert not out.exists() and not (tmp_path / "pseudo_masks.json").exists()
    shard = truncate_a_finished_shard(partial)
    assert pseudo_masks.main(args) == 0
    assert f"shard {shard}: " in capsys.readouterr().err
    expected, got = zarr_arrays(pipeline_run / "pseudo_masks.zarr"), zarr_arrays(out)
    assert expected.keys() == got.keys() and not partial.exists()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    assert (tmp_path / "pseudo_masks.json").read_bytes() == (pipeline_run / "pseudo_masks.json").read_bytes()


def test_train_and_evaluate_killed_then_rerun_equal_an_uninterrupted_run(model_inputs, pipeline_run,
                                                                         tmp_path):
    """``train@k`` SIGKILLed after its first epoch's checkpoint resumes from it; ``evaluate@k``
    SIGKILLed while it scores leaves nothing; both re-runs write the bytes of uninterrupted runs.
    Every run is a stage process of its own, as under DVC: run in this process after the priors
    tests, training moved one bf16 conv weight by 4e-6 (process state those stages leave behind,
    not the resume: thread count reset, it stayed)."""
    def train_cmd(root: Path) -> list[str]:
        return [sys.executable, "-m", "stages.train", *model_args(pipeline_run, model_inputs, root),
                "--plots", str(root / "plots")]

    def eval_cmd(root: Path) -> list[str]:
        return [sys.executable, "-m", "stages.evaluate", *model_args(pipeline_run, model_inputs, root),
                "--metrics", str(root / "metrics"), "--predictions", str(root / "predictions"),
                "--splits", str(pipeline_run / "splits")]

    def run(cmd: list[str]) -> None:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(train_cmd(reference))
    run(eval_cmd(reference))
    checkpoint = killed / "models/.fold1.partial/checkpoint.pt"
    signal_when(train_cmd(killed), checkpoint.exists, tmp_path / "train.log")
    assert not (killed / "models/fold1").exists()
    run(train_cmd(killed))
    log = tmp_path / "evaluate.log"
    signal_when(eval_cmd(killed), lambda: "evaluate fold 1" in log.read_text(), log)
    assert not [p for d in ("metrics", "predictions") for p in (killed / d).rglob("*") if p.is_file()]
    run(eval_cmd(killed))
    for path in ("models/fold1/model.pt", "models/fold1/model.pt.sha256", "plots/fold1/metrics.json",
                 "metrics/fold1.json", "predictions/fold1.npz"):
        assert (killed / path).read_bytes() == (reference / path).read_bytes(), path


def test_sigterm_stops_a_process_pool_stage_and_its_workers(priors_run, pipeline_run, tmp_path):
    """With ``task_runner: processes`` the tasks run in worker processes, which the stop flag does
    not reach: SIGTERM terminates them (a pool would wait for their shards), the stage exits 130
    within seconds with one line, finished shards kept, and no worker or server is left."""
    out, partial = tmp_path / "priors.zarr", tmp_path / ".priors.zarr.partial"
    args = priors_args(pipeline_run, out, {"orchestration": {"task_runner": "processes", "max_workers": 2},
                                           "priors": {"shard_size": 16}})
    stopped = signal_when([sys.executable, "-m", "stages.priors", *args],
                          lambda: any((partial / ".done").glob("images-*")), tmp_path / "stage.log",
                          "SIGTERM")
    assert stopped["status"] == 130 and stopped["seconds"] < 20, stopped["output"][-2000:]
    assert len(stopped["children"]) >= 3  # two workers and the Prefect server
    assert "priors: stopped by SIGTERM" in stopped["output"] and "Traceback" not in stopped["output"]
    assert list((partial / ".done").glob("images-*")) and not out.exists()


def test_ctrl_c_stops_a_stage_with_one_line_and_no_prefect_traceback(priors_run, pipeline_run, tmp_path):
    """Ctrl-C in a terminal (SIGINT to the stage and its own Prefect server alike) mid-run: the
    stage used to print each stopped task's Prefect traceback and then retry the server it had
    lost for a minute; now its one line, status 130 within seconds, and no server left."""
    out, partial = tmp_path / "priors.zarr", tmp_path / ".priors.zarr.partial"
    args = priors_args(pipeline_run, out, {"priors": {"shard_size": 16}})
    stopped = signal_when([sys.executable, "-m", "stages.priors", *args],
                          lambda: any((partial / ".done").glob("images-*")), tmp_path / "stage.log",
                          "SIGINT", group=True)
    lines = [line for line in stopped["output"].splitlines() if line.strip() and "image shards" not in line]
    assert stopped["status"] == 130 and stopped["seconds"] < 20, stopped["output"][-3000:]
    assert lines == ["priors: stopped by SIGINT; finished shards and checkpoints are kept: run it again "
                     "to resume"], stopped["output"][-3000:]


def test_sigint_stops_the_tiny_clip_training_and_a_rerun_resumes(pipeline_run, tmp_path, capsys):
    """``clip_model`` training the tiny CLIP (in the flow itself, not a task): Ctrl-C stops it within
    seconds, its phase-1 checkpoint kept; the re-run resumes and leaves neither the checkpoint
    nor the rendered caption corpus."""
    from stages import clip_model

    params = write_params(tmp_path / "params.yaml", {"clip": {
        **SMOKE_PARAMS["clip"], "tiny": {**SMOKE_PARAMS["clip"]["tiny"], "phase1_steps": 300,
                                         "checkpoint_every": 10}}})
    out = tmp_path / "clip"
    args = ["--params", str(params), "--synthetic", str(pipeline_run / "synthetic"), "--out", str(out),
            "--metrics", str(tmp_path / "clip.json")]
    checkpoint = tmp_path / ".clip.partial/phase1.ckpt"
    stopped = signal_when([sys.executable, "-m", "stages.clip_model", *args], checkpoint.exists,
                          tmp_path / "stage.log", "SIGINT")
    assert stopped["status"] == 130 and stopped["seconds"] < 15, stopped["output"][-2000:]
    assert "clip_model: stopped by SIGINT" in stopped["output"] and "Traceback" not in stopped["output"]
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < step < 300 and not out.exists()
    assert clip_model.main(args) == 0
    assert f"| {step}/300 [" in capsys.readouterr().err  # phase 1 went on from the checkpoint
    assert json.loads((tmp_path / "clip.json").read_text())["source"] == "trained"
    assert not (tmp_path / ".clip.partial").exists() and not list(out.rglob("phase1.ckpt"))
    assert not list(out.rglob("captions"))
