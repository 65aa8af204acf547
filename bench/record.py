"""Append a bench's figures to ``bench/RESULTS.md`` as a dated row (``--record``).

READMEs quote one current figure; the history of measurements lives in RESULTS.md,
one section per bench, written by the benches themselves so that a row always
carries the exact command, the machine it ran on and the figures it printed.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "| date | command | machine | figures |\n|---|---|---|---|\n"


def machine() -> str:
    """CPU count, memory and load: enough to compare rows, nothing that identifies a host."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        load = os.getloadavg()[0]
        extra = f", {mem:.0f} GiB, load {load:.1f}"
    except (ValueError, OSError, AttributeError):
        extra = ""
    return f"{platform.machine()}, {os.cpu_count()} CPUs{extra}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def record(section: str, figures: dict[str, object], path: Path = RESULTS) -> str:
    """Append one row (today, this command line, this machine, ``figures``) under ``section``.

    The section ``## <section> (recorded)`` is created at the end of the file when absent;
    rows are appended at its end. Returns the row written.
    """
    command = "python " + shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    shown = "; ".join(f"{k} {_fmt(v)}" for k, v in figures.items())
    row = (
        f"| {_dt.date.today().isoformat()} | `{_cell(command)}` | {machine()} | {_cell(shown)} |\n"
    )
    title = f"## {section} (recorded)\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Measurements\n"
    if title not in text:
        text = text.rstrip("\n") + f"\n\n{title}\nRows appended by `--record`.\n\n{HEADER}"
    start = text.index(title)
    nxt = text.find("\n## ", start + len(title))
    end = len(text) if nxt < 0 else nxt + 1
    body = text[start:end].rstrip("\n") + "\n" + row
    text = text[:start] + body + ("\n" + text[end:] if nxt >= 0 else "")
    path.write_text(text, encoding="utf-8")
    return row


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) + ")"
    return str(value)
