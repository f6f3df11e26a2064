"""Prefect task-runner factory: threads (default), processes, or a Dask cluster.

DVC decides *whether* a stage runs; Prefect runs its tasks (shards, folds, seeds) with the
runner chosen by the ``orchestration`` params. ``dask`` connects to ``dask_address`` (the path
to many machines) or starts a LocalCluster. How many tasks run at once is :func:`concurrency`: a
stage that computes on a CUDA device runs one at a time there unless told otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from tqdm import tqdm

from pipeline.core.artifacts import Staging
from pipeline.core.cores import usable_cores
from pipeline.core.errors import PipelineError
from pipeline.core.interrupt import STOP_MESSAGE, Stopped, die_with_parent, stop_requested
from pipeline.core.params import OrchestrationParams
from pipeline.core.prefect_server import ensure_api


def concurrency(cfg: OrchestrationParams, *, on_device: bool, at_most: int | None = None) -> int:
    """Tasks a stage runs at once: ``max_workers`` when set; otherwise one for a stage that
    computes on a CUDA device (each task holds its own model and batches on the one device: N at
    once only contend for its memory), else the CPU count; never more than ``at_most`` (what the
    stage's memory budget holds)."""
    n = cfg.max_workers or usable_cores()
    if on_device and not cfg.max_workers:
        import torch

        if torch.cuda.is_available():
            n = 1
    return min(n, at_most) if at_most else n


def task_runner(cfg: OrchestrationParams, workers: int) -> TaskRunner:
    if cfg.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if cfg.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=workers, initializer=process_worker,
                                     initargs=(cfg.log_level,))
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)

    class LocalDaskRunner(DaskTaskRunner):
        """A LocalCluster whose workers (processes writing to the stage's stderr) log as the stage
        does: a task's :class:`PipelineError` is the stage's one line, not a worker's traceback too."""

        @property
        def client(self) -> Any:
            client = super().client
            if not getattr(self, "_quiet", False):
                self._quiet = True
                client.run(_configure_logging, logging.getLevelName(logging.getLogger("prefect").level))
            return client

    return LocalDaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True},
    )


class _HideExpectedErrors(logging.Filter):
    """Drops Prefect's own report of a :class:`PipelineError` or of an interrupt (its "Crash
    detected! Execution was aborted by an interrupt/a termination signal", and each task's
    traceback and "Finished in state Failed" for the :class:`Stopped` a stop raises in it): the
    stage says either in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        cancelled = stop_requested() and "CancelledError" in message  # a task the stop cut short
        return (not isinstance(exc, PipelineError | KeyboardInterrupt | Stopped) and not cancelled
                and "PipelineError" not in message and "Execution was aborted by a" not in message
                and f"Stopped: {STOP_MESSAGE}" not in message and f"Stopped({STOP_MESSAGE!r})" not in message)


def configure_logging(cfg: OrchestrationParams) -> None:
    """Set Prefect's log level; keep its handlers from printing expected errors twice."""
    _configure_logging(cfg.log_level)


def process_worker(log_level: str) -> None:
    """The initializer of a process pool's workers: they die with the stage, and their Prefect
    logging hides expected errors as the stage's does (a task's :class:`PipelineError` is the
    stage's one line, not a worker's traceback too)."""
    die_with_parent()
    _configure_logging(log_level)


def _configure_logging(log_level: str) -> None:
    import prefect.main  # noqa: F401  (sets up Prefect's logging handlers, once)

    logging.getLogger("prefect").setLevel(log_level)
    for service in ("EventsWorker", "APILogWorker"):  # flush chatter at interpreter exit
        logging.getLogger(service).setLevel(max(logging.ERROR, logging.getLevelName(log_level)))
    names = [n for n in logging.root.manager.loggerDict if n.startswith("prefect")]
    for logger in [logging.root] + [logging.getLogger(n) for n in names]:
        for handler in logger.handlers:
            if not any(isinstance(f, _HideExpectedErrors) for f in handler.filters):
                handler.addFilter(_HideExpectedErrors())


def on_worker(path: str | Path, stage_dir: str) -> str:
    """``path``, given to a stage that runs in ``stage_dir``, as this process (a task's) reaches it:
    unchanged where this process runs in that directory too (a thread, a pool process, a
    LocalCluster worker: a message names it as the user gave it), else joined to ``stage_dir`` (a
    cluster's worker, in a working directory of its own on a file system shared with the stage)."""
    path = str(path)
    if os.path.isabs(path) or os.getcwd() == stage_dir:
        return path
    return os.path.join(stage_dir, path)


SCHEDULER_TIMEOUT_S = 5


def check_scheduler(address: str, timeout_s: float = SCHEDULER_TIMEOUT_S) -> None:
    """Connect to the Dask scheduler at ``address`` (``orchestration.dask_address``) once, within
    ``timeout_s`` seconds: one line naming the address and the param when none answers there
    (not the minute of retries and the tracebacks a flow's runner would print)."""
    from distributed import Client

    try:
        Client(address, timeout=f"{timeout_s}s", set_as_default=False).close()
    except Exception as exc:  # noqa: BLE001 - refused, timed out, a bad address, not a Dask scheduler
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise PipelineError(f"orchestration.dask_address: no Dask scheduler answers at {address!r} "
                            f"({type(exc).__name__}: {reason}); start one (`dask scheduler`) or unset "
                            "the param for a LocalCluster") from None


def run_flow(flow: Any, orchestration: OrchestrationParams, /, on_device: bool = False,
             at_most: int | None = None, **kwargs: Any) -> Any:
    """Run a Prefect flow with the configured task runner and :func:`concurrency` tasks at once
    (``on_device``: the flow's tasks compute on the accelerator when there is one). A configured
    ``dask_address`` is checked first (:func:`check_scheduler`)."""
    configure_logging(orchestration)
    if orchestration.task_runner == "dask" and orchestration.dask_address:
        check_scheduler(orchestration.dask_address)
    ensure_api()
    runner = task_runner(orchestration, concurrency(orchestration, on_device=on_device, at_most=at_most))
    return flow.with_options(task_runner=runner)(**kwargs)


def gather(futures: Iterable[Any], on_done: Callable[[Any], None] | None = None) -> list[Any]:
    """Results of Prefect futures in submission order; ``on_done(result)`` as each finishes.

    A failure does not stop the others: every task that succeeds is still reported to
    ``on_done`` (so its shard counts as finished for a resume), then the first error is raised.
    """
    from prefect.futures import as_completed

    futures = list(futures)
    first_error: BaseException | None = None
    for future in as_completed(futures):
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others finish
            first_error = first_error or exc
            continue
        if on_done:
            on_done(result)
    if first_error is not None:
        raise first_error
    return [f.result() for f in futures]


def run_shards(staging: Staging, submit: Callable[[str], Any], shards: Iterable[str], desc: str,
               files: Callable[[str], Iterable[Path]] | None = None) -> None:
    """Submit every unfinished shard, mark each done as it finishes, and show progress.

    ``submit(name)`` submits one shard's Prefect task; the task must return ``name``.
    ``files(name)``: the files the shard writes, checked on resume (:meth:`Staging.is_done`) and
    removed before an unfinished shard is redone.
    """
    shards = list(shards)
    pending = staging.pending(shards, files)
    with tqdm(total=len(shards), initial=len(shards) - len(pending), desc=desc, file=sys.stderr) as bar:
        def done(name: str) -> None:
            staging.mark_done(name, files(name) if files else ())
            bar.update()

        gather([submit(name) for name in pending], done)
