"""The thread policy: the cores a process may use (affinity capped by a cgroup CPU quota) bound
every stage's threads × tasks, and OpenMP threads sleep rather than spin at a barrier (so a busy
machine slows a stage in proportion, not tenfold) unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import cores

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, no quota
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 cores: 2 threads may run
    ({"cpu.max": "400000 100000\n"}, 4),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no quota
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({}, None),  # no cgroup files at all (macOS, a bare chroot)
])
def test_the_cgroup_quota_in_cores(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cores.cgroup_quota(tmp_path) == expected


def test_usable_cores_are_the_affinity_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(cores, "cgroup_quota", lambda root=cores.CGROUP: None)
    assert cores.usable_cores() == 16 and cores.threads_per_task(4) == 4 and cores.threads_per_task(32) == 1
    monkeypatch.setattr(cores, "cgroup_quota", lambda root=cores.CGROUP: 3)  # e.g. docker --cpus 3
    assert cores.usable_cores() == 3 and cores.threads_per_task(1) == 3 and cores.threads_per_task(2) == 1


def test_tasks_at_once_and_loaders_follow_the_usable_cores(monkeypatch):
    from pipeline.core.orchestration import concurrency
    from pipeline.core.params import OrchestrationParams

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(cores, "cgroup_quota", lambda root=cores.CGROUP: 6)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's count is not what may be used
    assert concurrency(OrchestrationParams(), on_device=False) == 6
    assert concurrency(OrchestrationParams(max_workers=3), on_device=False) == 3


def test_a_stage_process_waits_passively_unless_told_otherwise():
    """Importing the stages (or the library) before torch sets libgomp's wait policy; a value the
    user exported wins."""
    code = "import stages, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(REPO)
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "ACTIVE"


def test_a_stage_never_runs_more_torch_threads_than_usable_cores(monkeypatch):
    import torch

    from stages._common import _threads_within_cores

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(cores, "cgroup_quota", lambda root=cores.CGROUP: 1)
        monkeypatch.setattr("stages._common.usable_cores", cores.usable_cores)
        _threads_within_cores()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
