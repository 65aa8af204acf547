"""The fast line-based index update agrees with a full parse and re-render."""

from __future__ import annotations

import json

from maskbank.bank.index import parse_index, render_index, update_index_text


def row(scan_id: str, n: int = 0) -> dict:
    return {"scan_id": scan_id, "dataset": "d", "shape": [1, 2, 3], "n_proposals": n}


def test_insert_replace_remove_keep_sorted_valid_json() -> None:
    text = render_index({})
    assert parse_index(text) == {}
    for sid in ["m", "c", "x", "a"]:
        text = update_index_text(text, sid, row(sid))
    text = update_index_text(text, "c", row("c", 5))
    text = update_index_text(text, "x", None)
    text = update_index_text(text, "absent", None)
    doc = json.loads(text)
    assert [r["scan_id"] for r in doc["scans"]] == ["a", "c", "m"]
    assert parse_index(text)["c"]["n_proposals"] == 5
    rerendered = render_index(parse_index(text))
    assert rerendered.splitlines()[1:] == text.splitlines()[1:]  # same text apart from the time


def test_hand_edited_index_takes_the_slow_path() -> None:
    pretty = json.dumps({"format_version": 1, "scans": [row("b"), row("a")]}, indent=2)
    text = update_index_text(pretty, "c", row("c"))
    assert list(parse_index(text)) == ["a", "b", "c"]
    assert text.splitlines()[1].startswith('{"scan_id": "a"')
