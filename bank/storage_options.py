"""fsspec storage options of a bank: from the caller or the environment, never persisted with secrets.

Why the environment: a trainer's DataLoader workers and a flow's Dask workers open the
bank from its location alone, so options such as an S3 endpoint travel as
``MASKBANK_STORAGE_OPTIONS`` (JSON), which every process inherits, and credentials the
standard way (AWS_* variables, ``~/.aws`` profiles), which fsspec's backends read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .errors import BankError

ENV_VAR = "MASKBANK_STORAGE_OPTIONS"
# Option keys that hold credentials: never pickled, logged or written to a report.
SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")
REDACTED = "<redacted>"


def from_environment() -> dict[str, Any]:
    """The options in ``MASKBANK_STORAGE_OPTIONS`` ({} when unset or empty)."""
    text = os.environ.get(ENV_VAR, "").strip()
    return parse(text, ENV_VAR) if text else {}


def parse(text: str, where: str = "--storage-options") -> dict[str, Any]:
    """A JSON object of storage options; the error never echoes the text (it may hold keys)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BankError(f"{where} is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(value, dict):
        raise BankError(f"{where} must be a JSON object, e.g. '{{\"anon\": true}}'")
    return value


def resolve(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], bool]:
    """(options to use, whether they came from the environment): None means the environment."""
    if options is None:
        return from_environment(), True
    return dict(options), False


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def is_secret(key: object) -> bool:
    return any(word in str(key).lower() for word in SECRET_WORDS)


def without_secrets(options: Any) -> Any:
    """storage_options minus credentials, at any depth (e.g. client_kwargs)."""
    if isinstance(options, Mapping):
        return {k: without_secrets(v) for k, v in options.items() if not is_secret(k)}
    return options


def redacted_json(text: str) -> str:
    """A ``--storage-options`` value fit for a log: secrets replaced, or all of it if unparsable."""
    try:
        value = json.loads(text)
    except ValueError:
        return REDACTED
    if not isinstance(value, dict):
        return REDACTED
    return json.dumps(_redact(value), sort_keys=True)


def _redact(options: Any) -> Any:
    if isinstance(options, Mapping):
        return {k: REDACTED if is_secret(k) else _redact(v) for k, v in options.items()}
    return options
