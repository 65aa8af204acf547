"""Run `maskbank` as a real subprocess (the same code path as the console script)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MASKBANK = [sys.executable, "-m", "flows.cli"]


def maskbank(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MASKBANK, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def popen_maskbank(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*MASKBANK, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
