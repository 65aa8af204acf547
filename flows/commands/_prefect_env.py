"""Prefect settings the CLI applies before prefect is first imported.

Without PREFECT_API_URL, a run starts a temporary local server; give it time on
busy machines and keep it quiet, and make sure it dies with the run even when the
run is killed (Prefect itself stops it only at a normal exit). Users' own settings
always win (setdefault).
"""

from __future__ import annotations

import os

from maskbank.flows.server import guard_prefect_servers


def apply_cli_defaults(verbose: bool = False) -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if verbose:
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
    else:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    if not os.environ.get("PREFECT_API_URL"):
        guard_prefect_servers()
