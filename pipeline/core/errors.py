"""The one exception type for *expected* failures (bad input, bad params, missing data).

Stages print its message as a single line and exit non-zero, without a traceback; anything
else is a bug and keeps its traceback. A damaged store (a shard cut short or overwritten after
its stage ran) is such a failure too: :func:`damaged` words it, naming the store, the array and
:func:`repair_command`.
"""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """A user-facing error whose message names the file or parameter at fault."""


def repair_command(stage: str) -> str:
    """The command that rebuilds ``stage``'s outputs and replaces their damaged DVC cache objects
    (``stages/_repair.py``; docs/operations.md, "Damaged data")."""
    return f"make repair STAGE={stage}"


def damaged(store: Path | str, array: str | None, detail: str, stage: str) -> PipelineError:
    """The one line of an unreadable store: ``store``, its ``array`` (None: the store itself),
    what was found (``detail``) and the repair command of the ``stage`` that writes it."""
    where = f"{store}: array {array}" if array else f"{store}"
    return PipelineError(f"{where} is unreadable ({detail}): the store is damaged; "
                         f"repair it with: {repair_command(stage)}")


def one_line(exc: BaseException) -> str:
    """The message of a :class:`PipelineError` as one line, also where a DataLoader worker process
    raised it (torch re-raises it with the worker's traceback in the message: its last line then
    holds the original message)."""
    text = str(exc).strip()
    marker = f"{PipelineError.__name__}: "
    if "\n" in text and "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1]
    return " ".join(text.split("\n"))
