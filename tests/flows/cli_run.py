"""Run `maskbank` as a real subprocess (the same code path as the console script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MASKBANK = [sys.executable, "-m", "maskbank.flows.cli"]
# The child writes UTF-8 (progress bars, tables) whatever the machine's locale; read it the same way.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
DECODE = {"text": True, "encoding": "utf-8", "errors": "replace"}


def maskbank(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MASKBANK, *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        **DECODE,
        timeout=timeout,
        **kwargs,
    )


def popen_maskbank(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*MASKBANK, *args],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **DECODE,
    )


#: What differs between two reports of the same plan: when and where they ran.
RUN_KEYS = ("started_at", "seconds", "report_path")


def comparable_report(report: dict) -> dict:
    """A run report as printed and stored, without what says when and where it ran."""
    report = json.loads(json.dumps(report))
    rows = [{k: v for k, v in r.items() if k not in ("seconds", "worker")} for r in report["scans"]]
    return {**{k: v for k, v in report.items() if k not in RUN_KEYS}, "scans": rows}


def run_and_list_modules(args: list[str], modules: tuple[str, ...]) -> tuple[str, str]:
    """``maskbank ARGS`` in a fresh interpreter (what a command imports shows only in a
    process of its own): its stdout and stderr, which ends with "RC [the ``modules`` it
    loaded]"."""
    code = (
        "import sys; from maskbank.flows.cli import main; "
        f"rc = main({args!r}); "
        f"print(rc, [m for m in {modules!r} if m in sys.modules], file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120
    )
    return out.stdout, out.stderr
