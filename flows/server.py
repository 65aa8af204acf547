"""Start a private Prefect server on loopback.

Without PREFECT_API_URL every Python *process* that runs a flow or task starts
its own temporary server (15-30 s on 2 cores). One loopback server shared by
the CLI, Dask process workers, `flows/serve.py` and the test suite pays that
once.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


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
    until the API answers, `stop()` ends the server's whole process group.
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

    def start(self) -> LoopbackServer:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(self.home)}
        env.pop("PREFECT_API_URL", None)
        cmd = [*prefect_executable(), "server", "start", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port)]
        cmd += [] if self.ui else ["--no-ui"]
        cmd += [] if self.services else ["--no-services"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so we can stop its children
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
