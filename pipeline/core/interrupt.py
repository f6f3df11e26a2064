"""Cooperative stopping: a signal handler (``stages/_common.stage_main``) requests a stop, and
every shard loop checks between batches, so SIGINT or SIGTERM stops a stage within one batch of
each running task -- not after the task's whole shard (256 images of ViT-B/16 priors take about
11 minutes on a CPU) while the task-runner's threads finish their shards."""

from __future__ import annotations

import threading

_STOP = threading.Event()


class Stopped(Exception):
    """A stop was requested: the shard gives up here; its work is redone by the next run."""


def request_stop() -> None:
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def check_stop() -> None:
    """Raise :class:`Stopped` once a stop has been requested (call it between batches)."""
    if _STOP.is_set():
        raise Stopped("stop requested")
