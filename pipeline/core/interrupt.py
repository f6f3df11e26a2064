"""Cooperative stopping: a signal handler (``stages/_common.stage_main``) requests a stop, and
every shard loop checks between batches, so SIGINT or SIGTERM stops a stage within one batch of
each running task -- not after the task's whole shard (256 images of ViT-B/16 priors take about
11 minutes on a CPU) while the task-runner's threads finish their shards. Tasks in worker
processes (``orchestration.task_runner: processes | dask``) are stopped with their processes
(:func:`stop_workers`), and workers die with the stage even when it is killed
(:func:`die_with_parent`)."""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import threading

_STOP = threading.Event()
STOP_MESSAGE = "stop requested"  # what a Stopped says (the orchestration's log filter knows it by this)


class Stopped(Exception):
    """A stop was requested: the shard gives up here; its work is redone by the next run."""


def request_stop() -> None:
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def stop_requested() -> bool:
    return _STOP.is_set()


def check_stop() -> None:
    """Raise :class:`Stopped` once a stop has been requested (call it between batches)."""
    if _STOP.is_set():
        raise Stopped(STOP_MESSAGE)


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process (a ``preexec_fn`` or a worker's initializer): SIGTERM when the process
    that started it dies, however it dies (Linux's parent-death signal; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def stop_workers() -> None:
    """SIGTERM to this process's process-pool workers (``task_runner: processes``; a pool would
    otherwise wait for their tasks to finish): the shards they hold are redone by the next run.
    Daemonic children -- DataLoader and local Dask workers -- are left to their owners, which
    stop them as the stage unwinds."""
    for child in multiprocessing.active_children():
        if not child.daemon:
            child.terminate()
