"""Suite-wide setup: a private, quiet Prefect environment, and one shared loopback server.

The environment is set at import time, before any test module imports prefect, so no
test ever touches ~/.prefect or a user's server. Flow tests request `prefect_api`
(a session fixture): one `prefect server start` on 127.0.0.1 serves every in-process
flow, every `maskbank` subprocess and the deployment test, instead of each process
starting its own temporary server (15-30 s each).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="maskbank-test-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_API_KEY", None)

# Fixtures `s3_endpoint` and `s3`: a real S3 server on loopback (moto), for object-store banks.
pytest_plugins = ["tests.s3_server"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


_SERVER: dict[str, object] = {}


def _server():
    """The suite's loopback server, started on first call (non-blocking)."""
    from maskbank.flows.server import LoopbackServer

    if "server" not in _SERVER:
        home = Path(_PREFECT_HOME) / "server"
        _SERVER["server"] = LoopbackServer(home, services=False).start()
    return _SERVER["server"]


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(session, config, items) -> None:
    """Boot the server while earlier (non-flow) tests run, if any test will need it."""
    if any("prefect_api" in getattr(item, "fixturenames", ()) for item in items):
        _server()


def pytest_unconfigure(config) -> None:
    if "server" in _SERVER:
        _SERVER.pop("server").stop()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """URL of a Prefect server on loopback, exported to this process and its children."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = _server().wait(timeout=240)
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
            _drain_prefect_workers()  # send buffered logs/events while the server is up
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def _drain_prefect_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10, at_exit=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real sample scans); skips the test when this checkout has none."""
    if not (SHARED_DATA / "SOURCES.md").exists():
        pytest.skip(f"real sample scans not found at {SHARED_DATA} (see shared/data/SOURCES.md)")
    return SHARED_DATA
