"""One Prefect server for a whole `make repro` (stages/_prefect_server.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PROBE = ("import os, sys, time, urllib.request; url = os.environ['PREFECT_API_URL']; "
         "print(url, urllib.request.urlopen(url + '/health').status, flush=True); "
         "time.sleep(int(sys.argv[1]))")


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}").exists() else "X"
    return state not in ("Z", "X")


def _wrapped(seconds: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return subprocess.Popen([sys.executable, "-m", "stages._prefect_server", sys.executable, "-c", PROBE,
                             str(seconds)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_the_command_sees_one_live_server_that_stops_with_it():
    run = _wrapped(0)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    url, status = out.split()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api") and status == "200"
    assert "UI at http://127.0.0.1:" in err
    port = int(url.split(":")[2].split("/")[0])
    gone = subprocess.run(["pgrep", "-f", "--", f"--port {port}"], capture_output=True).returncode == 1
    assert gone


def test_no_server_outlives_a_killed_run():
    """SIGKILL of the wrapper (a killed `make repro`): its server goes too (parent-death signal)."""
    run = _wrapped(120)
    run.stdout.readline()  # the command runs: the server is up
    children = {p: Path(f"/proc/{p}/cmdline").read_text() for p in _children(run.pid)}
    servers = [p for p, cmd in children.items() if "uvicorn" in cmd]
    assert len(servers) == 1
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 15
    while _alive(servers[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(servers[0])
    for probe in set(children) - set(servers):  # the command itself is not ours to stop: end it here
        os.kill(probe, signal.SIGKILL)


STOPPING = ("import os, signal, sys, time, urllib.request; url = os.environ['PREFECT_API_URL']; "
            "signal.signal(signal.SIGINT, lambda *a: (time.sleep(1), print('after', urllib.request.urlopen("
            "url + '/health').status, flush=True), sys.exit(130))); print('up', flush=True); time.sleep(60)")


def test_ctrl_c_lets_the_stages_stop_before_their_server_does():
    """Ctrl-C reaches the wrapper, the command and (before) the server alike: the command, a stage
    that takes a second to stop and reports to the server meanwhile, finds it up, and the wrapper
    waits for it (it used to kill it after 0.25 s) and then stops the server; status 130."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    run = subprocess.Popen([sys.executable, "-m", "stages._prefect_server", sys.executable, "-c", STOPPING],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    assert run.stdout.readline() == "up\n"
    servers = [p for p in _children(run.pid) if "uvicorn" in Path(f"/proc/{p}/cmdline").read_text()]
    os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, err = run.communicate(timeout=60)
    assert out == "after 200\n" and run.returncode == 130, (out, err)
    assert len(servers) == 1 and not _alive(servers[0])
