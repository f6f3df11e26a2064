"""``python -m stages._prefect_server COMMAND ...``: run COMMAND (``make repro``: ``dvc repro``)
with one local Prefect API server for all its stages.

Without ``PREFECT_API_URL`` every stage process would start Prefect's temporary server of its own
(seconds per stage, and the runs vanish with it). Here one server starts first, its address goes
to every stage through ``PREFECT_API_URL``, and its UI shows the flow runs while COMMAND runs;
they stay in Prefect's database (``$PREFECT_HOME``), so ``prefect server start`` shows them later.
The server stops with COMMAND, and with this process even when it is killed (the kernel's
parent-death signal): nothing is left running. With ``PREFECT_API_URL`` already set (a server of
your own), COMMAND simply uses it.
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
        return subprocess.call(command, env={**os.environ, "PREFECT_API_URL": url})
    except KeyboardInterrupt:
        return 130
    finally:
        stop(server)
        log.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
