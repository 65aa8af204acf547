"""A real S3 server on loopback for the object-store tests (moto in server mode).

One server per test session, started on first use and stopped at the end; every test
gets its own bucket. Clients reach it the standard way: AWS_* credentials in the
environment and the endpoint in storage options (or ``MASKBANK_STORAGE_OPTIONS``).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# Fake credentials moto accepts; never real ones.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3:
    """The loopback server's endpoint and one fresh bucket."""

    endpoint: str
    bucket: str

    @property
    def options(self) -> dict:
        """fsspec storage options that reach the server (no credentials: they are in env)."""
        return {"client_kwargs": {"endpoint_url": self.endpoint}}

    @property
    def options_json(self) -> str:
        return json.dumps(self.options)

    def url(self, name: str = "bank") -> str:
        return f"s3://{self.bucket}/{name}"

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (a free port) for the session; stop it after."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3(s3_endpoint: str) -> S3:
    """A new, empty bucket on the loopback server."""
    found = S3(s3_endpoint, f"bank-{uuid.uuid4().hex[:12]}")
    found.filesystem().mkdir(found.bucket)
    return found
