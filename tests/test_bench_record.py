"""bench/record.py: benches append dated rows to RESULTS.md under their own section."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _record_module():
    spec = importlib.util.spec_from_file_location("bench_record", BENCH / "record.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_go_under_their_section_and_keep_the_rest(tmp_path, monkeypatch):
    rec = _record_module()
    path = tmp_path / "RESULTS.md"
    path.write_text("# Measurements\n\n## Older\n\nkept | as is\n", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["bench/sampler.py", "--pairs", "8"])
    rec.record("Sampler", {"ratio": 16.538, "bank": "phantom"}, path=path)
    rec.record("Prepare", {"scan": "a|b"}, path=path)
    rec.record("Sampler", {"ratio": 20.0}, path=path)
    text = path.read_text(encoding="utf-8")
    assert "## Older\n\nkept | as is\n" in text
    sampler = text[text.index("## Sampler (recorded)") : text.index("## Prepare (recorded)")]
    rows = [line for line in sampler.splitlines() if line.startswith("| 20")]
    assert len(rows) == 2
    assert (
        "`python bench/sampler.py --pairs 8`" in rows[0] and "ratio 16.5; bank phantom" in rows[0]
    )
    assert "ratio 20" in rows[1]
    assert "a\\|b" in text.split("## Prepare (recorded)")[1]  # a pipe cannot break the table
