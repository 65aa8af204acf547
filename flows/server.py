"""Start a private Prefect server on loopback.

Without PREFECT_API_URL every Python *process* that runs a flow or task starts
its own temporary server (15-30 s of start-up). One loopback server shared by
the CLI, Dask process workers, `flows/serve.py` and the test suite pays that
once.

A server must not outlive the run that started it, also when that run is killed
(SIGKILL, the OOM killer), which skips every `finally` and `atexit`. So each server
started here runs under a small watchdog process that holds the group: it ends the
whole group when its parent dies (seen as EOF on a pipe only the parent holds, or as a
new parent pid). `guard_prefect_servers` does the same for the temporary server Prefect
itself starts when PREFECT_API_URL is unset.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


# Runs in its own interpreter (stdlib only): `python -c _WATCHDOG MODE PARENT_PID FD ...`.
#   group CMD...: run CMD in this (new) process group; when the parent dies or we get SIGTERM,
#                 SIGTERM the group, SIGKILL it after a grace period; exit with CMD's code.
#   guard TOKEN:  when the parent dies, end every Prefect server whose environment holds
#                 MASKBANK_RUN_TOKEN=TOKEN (the temporary servers the parent's Prefect started).
_WATCHDOG = r"""
import os, select, signal, subprocess, sys, time

mode, parent, fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def parent_gone(wait):
    if os.getppid() != parent:
        return True
    ready, _, _ = select.select([fd], [], [], wait)
    return bool(ready) and os.read(fd, 1) == b""


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


if mode == "group":
    child = subprocess.Popen(sys.argv[4:])

    def end(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(0, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGINT, end)
    while child.poll() is None:
        if parent_gone(0.5):
            end()
    sys.exit(child.returncode)

token = ("MASKBANK_RUN_TOKEN=" + sys.argv[4]).encode() + b"\0"
signal.signal(signal.SIGINT, signal.SIG_IGN)
while not parent_gone(2.0):
    pass
victims = []
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) == os.getpid():
        continue
    try:
        with open(f"/proc/{name}/environ", "rb") as fh:
            env = b"\0" + fh.read()
        with open(f"/proc/{name}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        continue
    server = b"prefect.server.api.server:create_app" in argv or (
        b"prefect" in argv and b"server" in argv and b"start" in argv
    )
    if server and b"\0" + token in env:
        victims.append(int(name))
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in victims:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in victims):
        time.sleep(0.2)
"""
_GUARDED = False


def watched(cmd: list[str], **popen: object) -> tuple[subprocess.Popen, int]:
    """Start `cmd` under the watchdog in a new session; return (watchdog, lifeline fd).

    The caller keeps the lifeline open for as long as the command may live: closing it,
    or the caller's death in any way, ends the command's whole process group."""
    read_end, lifeline = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, "group", str(os.getpid()), str(read_end), *cmd],
            pass_fds=(read_end,),
            start_new_session=True,  # its own process group, so we can stop its children
            **popen,  # type: ignore[arg-type]
        )
    except BaseException:
        os.close(lifeline)
        raise
    finally:
        os.close(read_end)
    return proc, lifeline


def guard_prefect_servers() -> None:
    """Make the temporary Prefect servers this process starts die with it (Linux; once).

    Prefect starts one (`uvicorn ... prefect.server.api.server:create_app`) for a process
    without PREFECT_API_URL and stops it only at a normal exit. A fresh token in this
    process's environment marks the servers it starts; a watchdog that outlives this process
    ends every server carrying the token once this process is gone, however it ended."""
    global _GUARDED
    if _GUARDED or not sys.platform.startswith("linux"):
        return
    token = uuid.uuid4().hex
    os.environ["MASKBANK_RUN_TOKEN"] = token  # fresh: a nested run must not end ours
    read_end, lifeline = os.pipe()
    try:
        subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, "guard", str(os.getpid()), str(read_end), token],
            pass_fds=(read_end,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # never hold a caller's pipes open
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the run's group leaves it to clean up
        )
    except OSError:
        os.close(lifeline)
        return
    finally:
        os.close(read_end)
    _GUARDED = True  # the lifeline stays open (unreferenced) until this process ends


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_executable() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def wait_healthy(api_url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll `<api>/health` until it answers 200; fail early if the server process died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.3)
    raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout:.0f} s ({last})")


class LoopbackServer:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME.

    `start()` returns at once (so start-up can overlap other work), `wait()` blocks
    until the API answers, `stop()` ends the server's whole process group; so does the
    death of the process that started it (the server runs under `watched`).
    `services=False` runs only the API (no scheduler, late-run marking, event
    persistence): enough for flows, tasks and served deployments, and lighter on a
    small machine. The server's output goes to `<home>/server.log`.
    """

    def __init__(
        self,
        home: str | os.PathLike,
        port: int | None = None,
        ui: bool = False,
        services: bool = True,
    ) -> None:
        self.home = Path(home)
        self.port = port or free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log_path = self.home / "server.log"
        self.ui, self.services = ui, services
        self.proc: subprocess.Popen | None = None
        self._lifeline: int | None = None

    def start(self) -> LoopbackServer:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(self.home)}
        env.pop("PREFECT_API_URL", None)
        cmd = [*prefect_executable(), "server", "start", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port)]
        cmd += [] if self.ui else ["--no-ui"]
        cmd += [] if self.services else ["--no-services"]
        with open(self.log_path, "ab") as log:
            self.proc, self._lifeline = watched(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self

    def wait(self, timeout: float = 180) -> str:
        """Block until healthy; return the API URL (raise with the log's tail otherwise)."""
        try:
            wait_healthy(self.api_url, timeout, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{exc}\n--- {self.log_path} ---\n{tail}") from exc
        return self.api_url

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None


@contextmanager
def loopback_server(
    home: str | os.PathLike,
    port: int | None = None,
    timeout: float = 180,
    ui: bool = False,
    services: bool = True,
) -> Iterator[str]:
    """Run a `LoopbackServer` for the duration of the block; yield its API URL."""
    server = LoopbackServer(home, port, ui=ui, services=services).start()
    try:
        yield server.wait(timeout)
    finally:
        server.stop()


def stop_process_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the group this helper started (start_new_session), then SIGKILL stragglers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
