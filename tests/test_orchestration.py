import logging

import pytest
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from pipeline.core.errors import PipelineError
from pipeline.core.orchestration import _HideExpectedErrors, task_runner
from pipeline.core.params import OrchestrationParams


@pytest.mark.parametrize(("kind", "cls"), [("threads", ThreadPoolTaskRunner),
                                           ("processes", ProcessPoolTaskRunner),
                                           ("dask", DaskTaskRunner)])
def test_task_runner_follows_params(kind, cls):
    runner = task_runner(OrchestrationParams(task_runner=kind, max_workers=2))
    assert isinstance(runner, cls)


def test_dask_address_connects_to_an_existing_cluster():
    runner = task_runner(OrchestrationParams(task_runner="dask", dask_address="tcp://10.0.0.1:8786"))
    assert runner.address == "tcp://10.0.0.1:8786"


def test_prefect_does_not_repeat_expected_errors():
    keep = _HideExpectedErrors()
    try:
        raise PipelineError("x.png: unreadable mask")
    except PipelineError as exc:
        expected = logging.LogRecord("prefect", 40, "", 0, "failed", None, (type(exc), exc, None))
    bug = logging.LogRecord("prefect", 40, "", 0, "failed: KeyError('x')", None, None)
    assert not keep.filter(expected) and keep.filter(bug)
