"""``python -m stages._prefect_server COMMAND ...``: run COMMAND (``make repro``: ``dvc repro``)
with one local Prefect API server for all its stages.

Without ``PREFECT_API_URL`` every stage process would start Prefect's temporary server of its own
(seconds per stage, and the runs vanish with it). Here one server starts first, its address goes
to every stage through ``PREFECT_API_URL``, and its UI shows the flow runs while COMMAND runs;
they stay in Prefect's database (``$PREFECT_HOME``), so ``prefect server start`` shows them later.
The server stops with COMMAND, and with this process even when it is killed (the kernel's
parent-death signal): nothing is left running. At Ctrl-C it waits for COMMAND, which got the same
SIGINT, to stop its stages (their one line each), and only then stops the server they report to.
With ``PREFECT_API_URL`` already set (a server of your own), COMMAND simply uses it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import stages  # noqa: F401  (Prefect's environment: no telemetry, quiet logs)
from pipeline.core.errors import PipelineError
from pipeline.core.prefect_server import start_server, stop

STOP_GRACE = 60.0  # seconds COMMAND gets to stop after Ctrl-C before it is killed


def main(argv: list[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv) or ["dvc", "repro"]
    if os.environ.get("PREFECT_API_URL"):
        return subprocess.call(command)
    log = Path(tempfile.gettempdir()) / f"prefect-server-{os.getpid()}.log"
    started = time.perf_counter()
    try:
        server, url = start_server(log)
    except PipelineError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"Prefect: one server for every stage, up in {time.perf_counter() - started:.1f} s; "
          f"UI at {url.removesuffix('/api')} while this runs", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        proc = subprocess.Popen(command, env={**os.environ, "PREFECT_API_URL": url})
    except BaseException:
        stop(server)
        raise
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C: COMMAND got the same SIGINT; the server outlasts its stages
        return _after_interrupt(proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        stop(server)
        log.unlink(missing_ok=True)


def _after_interrupt(proc: subprocess.Popen, grace: float = STOP_GRACE) -> int:
    """Wait for COMMAND to stop by itself (a stage says one line and exits 130 within seconds);
    kill it after ``grace`` seconds or at a second Ctrl-C. Returns 130."""
    try:
        proc.wait(timeout=grace)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
    return 130


if __name__ == "__main__":
    raise SystemExit(main())
