"""Faults and interruptions: a stop reaches tasks in other threads at their next batch."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.interrupt import Stopped, check_stop, clear_stop, request_stop
from stages._common import stage_main


@pytest.fixture
def stop_requested():
    request_stop()
    yield
    clear_stop()


def test_every_shard_loop_stops_at_its_next_batch(stop_requested):
    """With a stop requested, each stage's shard loop raises before its next batch."""
    from pipeline.features.extract import extract_shard
    from pipeline.priors.shards import extract_image_shard
    from pipeline.pseudomasks.shards import refine_shard

    class Nothing:  # any use beyond the stop check would fail loudly
        batch_size = 4

    with pytest.raises(Stopped):
        extract_shard(None, range(3), ["a", "b", "c"], torch.nn.Linear(1, 1), 32)
    names = ("images/maskclip_scores", "images/maskclip_labels", "images/tokens_0", "images/tokens_1",
             "pairs/class_id", "pairs/vtp", "pairs/pir")
    root = {name: np.zeros((2, 1)) for name in names}
    with pytest.raises(Stopped):
        extract_image_shard(root, range(2), ["a", "b"], [[1], [1]], [[1], [1]], Nothing())
    episodes = pd.DataFrame({"episode": [0], "query": ["q"], "supports": [["s"]], "class_id": [1]})
    with pytest.raises(Stopped):
        refine_shard(None, "m", episodes, Nothing())


def test_a_signal_stops_a_stage_and_its_task_threads_within_a_batch(tmp_path, capsys):
    """SIGTERM to a stage whose tasks run in threads (the default runner): the main thread stops
    with one line and status 130, and a task thread stops at its next check, not at the end
    of its shard; the stop does not outlive the stage."""
    (tmp_path / "params.yaml").write_text("dataset: {name: synthetic}\n")  # not empty: that is an error
    finished: list[str] = []

    def shard() -> None:  # a 60-s shard of 0.05-s batches
        try:
            for _ in range(1200):
                check_stop()
                time.sleep(0.05)
            finished.append("shard")
        except Stopped:
            finished.append("stopped")

    def run(params, args) -> None:
        worker = threading.Thread(target=shard)
        worker.start()
        try:
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGTERM)
            worker.join()
        finally:  # as a task runner's shutdown: wait for the task
            worker.join()

    start = time.monotonic()
    assert stage_main("demo", run, {}, ["--params", str(tmp_path / "params.yaml")]) == 130
    assert finished == ["stopped"] and time.monotonic() - start < 10  # the shard needed 60 s
    assert capsys.readouterr().err.strip().startswith("demo: stopped by SIGTERM; finished shards")
    check_stop()  # cleared: the next stage in this process runs


def test_push_and_pull_say_in_one_line_when_the_remote_is_missing(tmp_path, monkeypatch, capsys):
    """`make push` / `make pull` (stages._remote): no remote set, an unknown one, a local one whose
    folder is missing (pull) or whose parent is (push): one line on how to fix it, status 1, and DVC
    is not started (it said "Everything is up to date" first, or printed thousands of lines)."""
    import subprocess
    import sys
    from pathlib import Path

    from stages import _remote

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=repo, check=True)
    monkeypatch.chdir(repo)
    started: list[list[str]] = []
    monkeypatch.setattr(_remote.subprocess, "call", lambda cmd: started.append(cmd) or 0)

    def refused(argv: list[str], expected: str) -> None:
        assert _remote.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, err
        assert not started

    add = "add one with `dvc remote add -d NAME URL`"
    refused(["pull"], f"no DVC remote set to pull from: {add} (a folder")
    refused(["push"], f"no DVC remote set to push to: {add}")
    Path(".dvc/config").write_text(f'[core]\n    remote = shared\n[\'remote "shared"\']\n'
                                   f'    url = {tmp_path / "disk" / "store"}\n')
    refused(["pull", "-r", "other"], "DVC remote 'other': not configured (known: shared)")
    refused(["pull"], f"DVC remote 'shared': folder {tmp_path / 'disk' / 'store'} does not exist")
    refused(["push"], f"DVC remote 'shared': folder {tmp_path / 'disk'} does not exist")
    (tmp_path / "disk").mkdir()  # a push creates the store itself; a pull needs it
    refused(["pull"], f"folder {tmp_path / 'disk' / 'store'} does not exist")
    assert _remote.main(["push", "--jobs", "2"]) == 0
    assert started == [[sys.executable, "-m", "dvc", "push", "-r", "shared", "--jobs", "2"]]
    Path(".dvc/config").write_text('[core]\n    remote = s3\n[\'remote "s3"\']\n    url = s3://bucket/x\n')
    assert _remote.main(["pull"]) == 0  # a remote with a scheme is DVC's to check
    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "python -m stages._remote push" in make and "python -m stages._remote pull" in make


def test_pretrained_weights_offline_fail_at_once_and_leave_no_staging_folder(tmp_path, monkeypatch):
    """`clip.pretrained: openai` (any tag) not cached, with no network: one line at once -- the
    download host is looked up first, instead of a minute of the hub's retries -- and no
    `.clip.partial` left (the weights load before the staging folder is made)."""
    import huggingface_hub.constants
    import open_clip.pretrained

    from pipeline.core.errors import PipelineError
    from pipeline.core.params import ClipParams
    from stages.clip_model import build_clip

    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")  # never resolves
    real, online = open_clip.pretrained.download_pretrained_from_hf, []

    def from_hub(*args, **kwargs):  # the cache lookup (offline) as it is; no download attempt at all
        if not huggingface_hub.constants.HF_HUB_OFFLINE:
            online.append(args)
            raise RuntimeError("a download was attempted")
        return real(*args, **kwargs)

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", from_hub)
    cfg = ClipParams(model="RN50", pretrained="openai", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(PipelineError) as err:
        build_clip.fn(cfg, *(tmp_path / name for name in ("synthetic", "clip", "clip.json", "fixtures")))
    message = str(err.value)
    assert message.startswith("clip.pretrained = 'openai': weights for RN50 are not cached and cannot be "
                              "downloaded (hub.invalid: ") and "\n" not in message, message
    assert not online and not (tmp_path / ".clip.partial").exists() and not (tmp_path / "clip").exists()
