"""Run `maskbank` as a real subprocess (the same code path as the console script)."""

from __future__ import annotations

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
