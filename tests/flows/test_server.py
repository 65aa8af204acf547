"""A Prefect server started for a run dies with the run, also when the run is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maskbank.flows.server import LoopbackServer
from tests.flows.cli_run import REPO

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _stat(pid: int) -> tuple[int, str, bytes] | None:
    """(ppid, state, start time) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0].decode(), fields[19]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _descendants(root: int) -> dict[int, bytes]:
    """Every live descendant of ``root``: pid -> start time (so a reused pid is not it)."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            parent[int(name)] = st
    found: dict[int, bytes] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, (ppid, _, start) in parent.items():
            if ppid == pid and child not in found:
                found[child] = start
                frontier.append(child)
    return found


def _alive(procs: dict[int, bytes]) -> dict[int, bytes]:
    out = {}
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st[2] == start and st[1] != "Z":
            out[pid] = start
    return out


def _wait_for(pred, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.2)
    raise AssertionError(f"not seen within {timeout} s: {what}")


def _kill_run_and_check(code: str, module: bytes, tmp_path: Path, ready: bool = False) -> None:
    """Start ``code`` in a subprocess, wait until it has started a server process
    (``python -m <module> ...``; with ``ready``, once the run created the file
    ``<argv[1]>/ready``), SIGKILL it, and expect every process it started
    to be gone (bounded wait: a survivor is a failure, slowness is not)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)  # the session's server: the run must start its own
    run = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "server")], cwd=REPO, env=env
    )
    procs: dict[int, bytes] = {}
    try:

        def server_started() -> bool:
            procs.update(_descendants(run.pid))
            assert run.poll() is None, f"the run exited early with code {run.returncode}"
            if ready and not (tmp_path / "server" / "ready").exists():
                return False
            return any(_cmdline(pid).split(b"\0")[1:3] == [b"-m", module] for pid in _alive(procs))

        _wait_for(server_started, f"a process `python -m {module.decode()}` started by the run")
        procs.update(_descendants(run.pid))
        run.kill()
        run.wait()
        _wait_for(lambda: not _alive(procs), "the run's processes ending", 60)
    finally:
        survivors = _alive(procs)
        for pid in survivors:  # only what this test started; reported as the failure above
            os.kill(pid, signal.SIGKILL)
        if run.poll() is None:
            run.kill()


def test_loopback_server_dies_with_its_killed_parent(tmp_path: Path) -> None:
    """`LoopbackServer` (the CLI's `--processes` server and the test suite's server)."""
    code = (
        "import sys, time\n"
        "from maskbank.flows.server import LoopbackServer\n"
        "LoopbackServer(sys.argv[1], services=False).start().wait()\n"
        "open(sys.argv[1] + '/ready', 'w').close()\n"
        "time.sleep(600)\n"
    )
    _kill_run_and_check(code, b"prefect", tmp_path, ready=True)  # a server that answers


def test_prefect_temporary_server_dies_with_a_killed_cli_run(tmp_path: Path) -> None:
    """Without PREFECT_API_URL Prefect starts its own temporary server (uvicorn) for the run;
    a CLI run (`apply_cli_defaults`) that is SIGKILLed must not leave it behind."""
    code = (
        "from maskbank.flows.commands._prefect_env import apply_cli_defaults\n"
        "apply_cli_defaults()\n"
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as client:\n"
        "    client.hello()\n"
        "import time; time.sleep(600)\n"
    )
    _kill_run_and_check(code, b"uvicorn", tmp_path)


def test_stopped_loopback_server_leaves_no_process(tmp_path: Path) -> None:
    """The normal end (`stop()`, as the CLI and tests/conftest.py do) ends the whole group."""
    server = LoopbackServer(tmp_path, services=False).start()
    assert server.proc is not None
    try:
        procs = _wait_for(lambda: _descendants(server.proc.pid), "the server under its watchdog")
        procs[server.proc.pid] = _stat(server.proc.pid)[2]
    finally:
        server.stop()
    _wait_for(lambda: not _alive(procs), "the server's processes ending", 60)
