import logging

import pytest
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from pipeline.core.errors import PipelineError
from pipeline.core.orchestration import _HideExpectedErrors, concurrency, task_runner
from pipeline.core.params import OrchestrationParams


@pytest.mark.parametrize(("kind", "cls"), [("threads", ThreadPoolTaskRunner),
                                           ("processes", ProcessPoolTaskRunner),
                                           ("dask", DaskTaskRunner)])
def test_task_runner_follows_params(kind, cls):
    runner = task_runner(OrchestrationParams(task_runner=kind), 2)
    assert isinstance(runner, cls)


def test_a_device_stage_runs_one_task_at_a_time_on_cuda_unless_told(monkeypatch):
    """Never N shards on one GPU by default; CPU stages (and every stage without CUDA) use the cores."""
    import os

    import torch

    cpus = os.cpu_count()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert concurrency(OrchestrationParams(), on_device=True) == 1
    assert concurrency(OrchestrationParams(), on_device=False) == cpus
    assert concurrency(OrchestrationParams(max_workers=3), on_device=True) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert concurrency(OrchestrationParams(), on_device=True) == cpus
    # what the stage's memory budget holds caps it, whatever was asked for
    assert concurrency(OrchestrationParams(), on_device=True, at_most=1) == 1
    assert concurrency(OrchestrationParams(max_workers=3), on_device=False, at_most=2) == 2
    assert concurrency(OrchestrationParams(max_workers=3), on_device=False, at_most=5) == 3


def test_dask_address_connects_to_an_existing_cluster():
    runner = task_runner(OrchestrationParams(task_runner="dask", dask_address="tcp://10.0.0.1:8786"), 2)
    assert runner.address == "tcp://10.0.0.1:8786"


def test_prefect_does_not_repeat_expected_errors():
    keep = _HideExpectedErrors()
    try:
        raise PipelineError("x.png: unreadable mask")
    except PipelineError as exc:
        expected = logging.LogRecord("prefect", 40, "", 0, "failed", None, (type(exc), exc, None))
    bug = logging.LogRecord("prefect", 40, "", 0, "failed: KeyError('x')", None, None)
    assert not keep.filter(expected) and keep.filter(bug)


def test_prefect_does_not_report_the_tasks_a_stop_ended():
    """A stop raises Stopped in every running task: Prefect's traceback for each, and its "Finished
    in state Failed" line, are dropped (the stage says "stopped by SIGINT" once)."""
    from pipeline.core.interrupt import Stopped, check_stop, clear_stop, request_stop

    keep = _HideExpectedErrors()
    request_stop()
    try:
        check_stop()
    except Stopped as exc:
        traced = logging.LogRecord("prefect.task_runs", 40, "", 0, "Task run failed with exception: %r",
                                   (exc,), (type(exc), exc, None))
    finally:
        clear_stop()
    failed = "Finished in state Failed('Task run encountered an exception {}')"
    state, other = (logging.LogRecord("prefect.task_runs", 40, "", 0, failed.format(why), None, None)
                    for why in ("Stopped: stop requested", "ValueError: stopped early"))
    assert not keep.filter(traced) and not keep.filter(state) and keep.filter(other)


FAILING_FLOW = '''
import sys
from prefect import flow, task
from pipeline.core.errors import PipelineError
from pipeline.core.orchestration import gather, run_flow
from pipeline.core.params import OrchestrationParams
from stages._common import stage_main

@task
def read_shard(i: int) -> int:
    if i == 1:
        raise PipelineError("x.zarr: array y is unreadable (z): the store is damaged; "
                            "repair it with: make repair")
    return i

@flow
def shards() -> None:
    gather([read_shard.submit(i) for i in range(3)])

if __name__ == "__main__":  # pool processes are spawned: they import this file
    sys.exit(stage_main("check", lambda params, args: run_flow(shards, OrchestrationParams(
        task_runner=sys.argv[1], max_workers=2)), {}, argv=["--params", sys.argv[2]]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["threads", "processes", "dask"])
def test_a_tasks_expected_error_is_the_stages_one_line_in_any_runner(tmp_path, kind):
    """A PipelineError raised in a task -- in a thread, a pool process or a LocalCluster worker,
    each logging through Prefect -- ends the stage with its one line: no worker's traceback."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "flow.py").write_text(FAILING_FLOW)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)  # the stage starts a temporary server of its own
    done = subprocess.run([sys.executable, str(tmp_path / "flow.py"), kind, str(REPO / "params.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "PipelineError" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == ("error: x.zarr: array y is unreadable (z): the store is damaged; "
                                            "repair it with: make repair")


def test_a_task_the_stop_cancelled_is_not_reported_but_a_cancel_otherwise_is():
    """Prefect's "Crash detected ... CancelledError: Task run cancelled by the task runner" for a task
    a stop cut short is dropped (the stage says "stopped" once); the same line without a stop is kept."""
    from pipeline.core.interrupt import clear_stop, request_stop

    keep = _HideExpectedErrors()
    line = ("Crash detected! Execution was interrupted by an unexpected exception: CancelledError: Task run "
            "cancelled by the task runner")
    record = logging.LogRecord("prefect.task_runs", 40, "", 0, line, None, None)
    assert keep.filter(record)
    request_stop()
    try:
        assert not keep.filter(record)
    finally:
        clear_stop()


def test_an_unreachable_dask_address_is_one_line_in_seconds():
    """No scheduler at ``dask_address``: the stage's one line naming the address and the param,
    within the check's few seconds (before: a minute of retries, 167 lines and 4 tracebacks)."""
    import socket
    import time

    from pipeline.core.orchestration import SCHEDULER_TIMEOUT_S, run_flow

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(PipelineError) as error:
        run_flow(lambda: pytest.fail("the flow ran"),
                 OrchestrationParams(task_runner="dask", dask_address=address))
    assert time.monotonic() - started < SCHEDULER_TIMEOUT_S + 5
    line = str(error.value)
    assert "\n" not in line and line.startswith("orchestration.dask_address: ") and repr(address) in line


def test_a_task_reaches_the_stages_relative_paths_from_any_working_directory(tmp_path, monkeypatch):
    """As the stage gave it where the task runs in the stage's directory (a message names it as the
    user wrote it); joined to the stage's directory on a cluster's worker, which runs elsewhere."""
    from pipeline.core.orchestration import on_worker

    stage, worker = tmp_path / "project", tmp_path / "worker"
    stage.mkdir(), worker.mkdir()
    monkeypatch.chdir(stage)
    assert on_worker("data/priors.zarr", str(stage)) == "data/priors.zarr"
    monkeypatch.chdir(worker)
    assert on_worker("data/priors.zarr", str(stage)) == str(stage / "data/priors.zarr")
    assert on_worker(stage / "x.png", str(tmp_path)) == str(stage / "x.png")
