"""What every evaluation's ``run`` returns: the numbers, and their tables and figures.

``Result.data`` is every number (what ``results.json`` holds); ``markdown()`` and
``text()`` are its tables for a file and for a terminal; ``figures(out)`` draws its PNGs
into ``out``; ``write(out)`` does all three into one folder. Each evaluation
(``incontext``, ``finetune``, ``probe``) subclasses it with its own tables.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .report import _clean, run_record, write_results


class Result(Mapping[str, Any]):
    """An evaluation's results; read like the results dict (``result["mean_dice"]``)."""

    kind = ""
    figure_dir = ""  # the figures' folder inside the output folder ("" = the folder itself)

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def json(self) -> str:
        """Every number as JSON (NaN and infinities as null)."""
        return json.dumps(_clean(self.data), indent=1, allow_nan=False)

    def markdown(self) -> str:
        """``results.md``: the tables for people, with provenance at the end."""
        raise NotImplementedError

    def text(self) -> str:
        """The short table a terminal shows."""
        raise NotImplementedError

    def figures(self, out: str | Path) -> list[Path]:
        """Draw the PNG figures into folder ``out`` (created); their paths."""
        raise NotImplementedError

    def write(self, out: str | Path) -> Path:
        """``out/results.json``, ``out/results.md`` and the figures; returns ``out``."""
        out = Path(out)
        self.figures(out / self.figure_dir if self.figure_dir else out)
        return write_results(out, self.data, self.markdown())


def record(data: dict[str, Any], command: Sequence[str] | None, bank, networks: Sequence) -> None:
    """Add the provenance block (``data["run"]``): command, bank fingerprint, networks."""
    data["run"] = run_record(command, bank, networks)
