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

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import stages  # noqa: F401  (Prefect's environment: no telemetry, quiet logs)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path, timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """A Prefect API server (with its UI) on a free local port; returns it and its API URL."""
    import prefect

    port = _free_port()
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
               "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: the Prefect server exited ({log}: {log.read_text()[-300:]!r})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.3)
    stop(server)
    raise SystemExit(f"error: the Prefect server did not answer within {timeout:.0f} s (log: {log})")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def main(argv: list[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv) or ["dvc", "repro"]
    if os.environ.get("PREFECT_API_URL"):
        return subprocess.call(command)
    log = Path(tempfile.gettempdir()) / f"prefect-server-{os.getpid()}.log"
    started = time.perf_counter()
    server, url = start_server(log)
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
