"""A local Prefect API server that never outlives the process that started it.

Without ``PREFECT_API_URL`` Prefect starts a temporary server of its own for a flow, and a stage
killed with SIGKILL leaves it running (a ~220 MB uvicorn, orphaned). :func:`start_server` starts the
same server (with its UI) in a child that the kernel stops when its parent dies (Linux's
parent-death signal), so nothing is left running after any kind of exit. ``make repro`` starts one
for all its stages (:mod:`stages._prefect_server`); a stage run by hand starts one for itself
(:func:`ensure_api`).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.interrupt import die_with_parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path, timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """A Prefect API server (with its UI) on a free local port, stopped by the kernel when this
    process (the calling thread: call it from the main one) dies; returns it and its API URL.

    It runs in a session of its own, so Ctrl-C in a terminal does not stop it under the stages that
    are still reporting to it (they would print Prefect's tracebacks and retry for a minute): its
    owner stops it (:func:`stop`) once they are done, and the kernel when its owner dies."""
    import prefect

    port = _free_port()
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
               "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    with log.open("w") as out:  # a session of its own: a terminal's Ctrl-C (SIGINT to the whole
        # foreground group) reaches the stages, which stop and report to this server, not the server
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise PipelineError(f"the Prefect server exited ({log}: {log.read_text()[-300:]!r})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.3)
    stop(server)
    raise PipelineError(f"the Prefect server did not answer within {timeout:.0f} s (log: {log})")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def ensure_api() -> None:
    """Make sure this process's flows have a Prefect API: the configured one (``PREFECT_API_URL``:
    ``make repro``'s, a server of your own, a test harness), else a local server started once for
    this process (:func:`start_server`) and stopped when it exits."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    log = Path(tempfile.gettempdir()) / f"prefect-server-{os.getpid()}.log"
    server, url = start_server(log)

    def shutdown() -> None:
        stop(server)
        log.unlink(missing_ok=True)

    atexit.register(shutdown)
    os.environ["PREFECT_API_URL"] = url  # task-runner processes inherit it
    refresh_global_settings_context()
