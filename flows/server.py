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


@contextmanager
def loopback_server(
    home: str | os.PathLike,
    port: int | None = None,
    timeout: float = 180,
    ui: bool = False,
    services: bool = True,
) -> Iterator[str]:
    """Run `prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yield the API URL.

    `services=False` runs only the API (no scheduler, late-run marking, event
    persistence): enough for flows, tasks and served deployments, and lighter on a
    small machine. The server's output goes to `<home>/server.log`.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    cmd = [*prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    cmd += [] if ui else ["--no-ui"]
    cmd += [] if services else ["--no-services"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so we can stop its children too
        )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        try:
            wait_healthy(api_url, timeout, proc)
        except (RuntimeError, TimeoutError) as exc:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{exc}\n--- {log_path} ---\n{tail}") from exc
        yield api_url
    finally:
        stop_process_group(proc)


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
