"""Prefect settings the CLI applies before prefect is first imported.

Without PREFECT_API_URL, a run starts a temporary local server; give it time on
busy machines and keep it quiet. Users' own settings always win (setdefault).
"""

from __future__ import annotations

import os


def apply_cli_defaults(verbose: bool = False) -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if verbose:
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
    else:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
