"""What every stage shares: argument parsing, params loading and one-line errors."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence

from pipeline.core.cores import usable_cores
from pipeline.core.errors import PipelineError, one_line
from pipeline.core.interrupt import Stopped, clear_stop, request_stop, stop_workers
from pipeline.core.params import Params, load_params

#: The inputs of a fold's training and evaluation (``--name`` options and their defaults).
FOLD_INPUTS = {
    "index": "data/index",
    "episodes": "data/episodes",
    "features": "data/features.zarr",
    "priors": "data/priors.zarr",
    "pseudo_masks": "data/pseudo_masks.zarr",
    "models": "data/models",
}


def _threads_within_cores() -> None:
    """torch's intra-op threads never above the cores this process may use (its OpenMP default
    counts the affinity mask, not a container's CPU quota: threads beyond it queue)."""
    import torch

    cores = usable_cores()
    if torch.get_num_threads() > cores:
        torch.set_num_threads(cores)


def stage_main(
    name: str, run: Callable[[Params, argparse.Namespace], None],
    paths: dict[str, str], argv: Sequence[str] | None = None, flags: dict[str, str] | None = None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse ``--params``, the stage's path options, its on/off ``flags`` and any further
    ``options`` (a function adding arguments), validate params, run.

    Expected errors (:class:`PipelineError`, also one raised in a task's thread or process or in a
    DataLoader worker) print one line and return 1; the stage's
    outputs are written atomically, so nothing half-written is left behind. SIGINT (Ctrl-C) and
    SIGTERM stop the stage with one line and status 130, keeping its finished shards and
    checkpoints for the next run to resume from -- SIGINT also when the launcher ignored it (a
    background job of a script), since a stage is always meant to be interruptible.
    """
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    for option, default in paths.items():
        parser.add_argument(f"--{option}", default=default, help="(default: %(default)s)")
    for flag, text in (flags or {}).items():
        parser.add_argument(f"--{flag.replace('_', '-')}", action="store_true", help=text)
    if options:
        options(parser)
    args = parser.parse_args(argv)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        params = load_params(args.params)
        _threads_within_cores()
        run(params, args)
    except PipelineError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stopped) as exc:
        by = exc.args[0] if isinstance(exc, KeyboardInterrupt) and exc.args else "SIGINT"
        print(f"{name}: stopped by {by}; finished shards and checkpoints "
              "are kept: run it again to resume", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        clear_stop()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    request_stop()  # tasks running in other threads stop at their next batch
    stop_workers()  # and those in worker processes now
    raise KeyboardInterrupt(signal.Signals(signum).name)
