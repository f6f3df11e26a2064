"""A store damaged after its run, in a DVC project whose outputs are hardlinks into the cache: the
stage that reads it says so in one line naming the repair command, and that command leaves both
the workspace and the cache good (docs/operations.md, "Damaged data")."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SMOKE, files_of, write_params

pytestmark = pytest.mark.slow

# The stages up to the first reader of priors.zarr; the CLIP folder is given (untrained tiny-vit).
PROGRESS = re.compile(r"^[^:]+: [^:]*: *\d+%\|.*\d+/\d+ \[")  # a tqdm bar's line
STAGES = ("prepare", "split", "episodes", "priors", "features", "pseudo_masks")


def test_a_truncated_shard_is_named_and_make_repair_mends_workspace_and_cache(tmp_path):
    from pipeline.clip.loader import save_local_dir
    from pipeline.core.prefect_server import start_server, stop
    from pipeline.tinyclip.model import build_tiny

    repo = tmp_path / "repo"
    for item in ("pipeline", "stages"):
        shutil.copytree(REPO / item, repo / item)
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in STAGES}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    write_params(repo / "params.yaml", {
        "prepare": {"synthetic": {**SMOKE.model_dump(), "mixed_sizes": True, "train_images": 100,
                                  "val_images": 100}},
        "episodes": {"test_episodes": 10, "seeds": [0], "train_episodes": 20, "val_episodes": 10}})
    save_local_dir(build_tiny("tiny-vit", 0), repo / "data/models/clip")
    server, url = start_server(tmp_path / "prefect.log")  # one Prefect server for every stage run here
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(repo), "PREFECT_API_URL": url}

    def run(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert (done.returncode == 0) == ok, done.stderr[-3000:]
        return done

    dvc = (sys.executable, "-m", "dvc")
    try:
        run("git", "init", "-q")
        run(*dvc, "init", "-q")
        run(*dvc, "config", "cache.type", "hardlink,symlink,copy")  # as the project's .dvc/config
        run(*dvc, "repro", "-q", "priors", "features")  # the inputs of pseudo_masks
        store = repo / "data/priors.zarr"
        good = files_of(store)
        shard = store / "images/maskclip_scores/c/0/0/0/0"
        assert shard.stat().st_nlink == 2  # the workspace file is the cache object
        os.truncate(shard, shard.stat().st_size - 100)  # a write in place: the cache object is cut too

        # the reader: one line naming the store, the array and the repair command (beside its progress bar)
        failed = run(sys.executable, "-m", "stages.pseudo_masks", ok=False)
        lines = [line for line in failed.stderr.splitlines() if line and not PROGRESS.match(line)]
        assert failed.returncode == 1 and len(lines) == 1, failed.stderr
        assert re.fullmatch(r"error: data/priors\.zarr: array images/maskclip_scores is unreadable "
                            r"\(ValueError: Stored and computed checksum do not match\. .*\): "
                            r"the store is damaged; repair it with: make repair STAGE=priors", lines[0])
        # DVC alone does not see it: the damaged workspace file is still "the cached one"
        run(*dvc, "repro", "-q", "-s", "priors")
        assert shard.stat().st_size < len(good["images/maskclip_scores/c/0/0/0/0"])

        repaired = run(sys.executable, "-m", "stages._repair", "priors")  # `make repair STAGE=priors`
        assert re.search(r"repair priors: 1 of \d+ cache objects damaged, removed", repaired.stderr)
        assert files_of(store) == good
        assert shard.stat().st_nlink == 2  # linked to the cache again: the store costs its size once
        shutil.rmtree(store)  # as a fresh checkout: the cache alone gives the good bytes
        run(*dvc, "checkout", "-q", "data/priors.zarr")
        assert files_of(store) == good
        assert "up to date" in run(*dvc, "repro", "priors", "features").stdout
    finally:
        stop(server)
