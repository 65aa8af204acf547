"""The bank index: one JSON file listing every scan, so listing never opens 10,000 groups.

Rows are derived only from a scan's own attributes plus its size on disk, so the
index can always be rebuilt from the scan groups (`Bank.rebuild_index`). On a local
bank the rows published since the last compaction are files of their own beside it
(`bank.index_rows`), folded in by `fold_rows`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import CorruptIndexError
from .layout import FORMAT_VERSION, INDEX_FILE
from .locks import file_mode

# Caller attribute keys the index (and verify) relies on, with accepted aliases.
ATTR_KEYS: dict[str, tuple[str, ...]] = {
    "dataset": ("dataset",),
    "modality": ("modality",),
    "spacing": ("spacing",),
    "source_path": ("source_path", "source.path"),
    "source_sha256": ("source_sha256", "source.sha256", "sha256"),
    "fingerprint": ("fingerprint", "config_fingerprint", "config.fingerprint"),
}
ROW_KEYS = (
    "scan_id",
    "dataset",
    "modality",
    "shape",
    "spacing",
    "source_path",
    "source_sha256",
    "source_stat",
    "fingerprint",
    "has_label",
    "n_proposals",
    "nbytes",
    "proposals_nbytes",
    "proposal_sets",
    "normalization",
    "written_at",
)
NORMALIZATION_KEYS = ("clip", "mean", "std")  # what the scan table shows; the rest stays in attrs


def lookup(attrs: dict, key: str) -> Any:
    """Value of a required attribute, trying its aliases (dotted = nested); None if absent."""
    for alias in ATTR_KEYS[key]:
        node: Any = attrs
        for bit in alias.split("."):
            node = node.get(bit) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def missing_attrs(attrs: dict) -> list[str]:
    """Required caller attributes that are absent."""
    return [key for key in ATTR_KEYS if lookup(attrs, key) is None]


def make_row(
    scan_id: str,
    attrs: dict,
    proposals_attrs: dict | None,
    nbytes: int,
    proposals_nbytes: int,
    sets: dict[str, tuple[dict, int]] | None = None,
) -> dict:
    """Index row for one scan from its group attributes (and its proposals group's, if any).

    ``sets`` (name -> (part attributes, bytes)) lists every proposal set; without it the
    default set alone is described from ``proposals_attrs``.
    """
    if sets is None:
        sets = {"default": (proposals_attrs, proposals_nbytes)} if proposals_attrs else {}
    info = attrs.get("maskbank", {})
    arrays = info.get("arrays", {})
    row = {key: lookup(attrs, key) for key in ATTR_KEYS}
    row.update(
        scan_id=scan_id,
        shape=arrays.get("image", {}).get("shape"),
        has_label="label" in arrays,
        n_proposals=_n_proposals(proposals_attrs),
        nbytes=int(nbytes),
        proposals_nbytes=int(proposals_nbytes),
        proposal_sets={
            name: {"n": _n_proposals(a), "bytes": int(b)} for name, (a, b) in sorted(sets.items())
        },
        normalization=_normalization(attrs.get("normalization")),
        written_at=info.get("written_at"),
        # size and mtime of the inputs a scan was prepared from (a writer's own record), so a
        # re-run can tell unchanged inputs from the index alone, as git and make do
        source_stat=attrs.get("source_stat"),
    )
    return {key: row.get(key) for key in ROW_KEYS}


def _n_proposals(part_attrs: dict | None) -> int:
    return int((part_attrs or {}).get("maskbank", {}).get("n_proposals", 0))


def set_counts(row: dict) -> dict[str, dict]:
    """Proposal sets of an index row (name -> {"n", "bytes"}); rows written before named
    sets existed describe only the default set, by ``n_proposals``/``proposals_nbytes``."""
    sets = row.get("proposal_sets")
    if isinstance(sets, dict):
        return sets
    if row.get("n_proposals"):
        return {
            "default": {
                "n": int(row["n_proposals"]),
                "bytes": int(row.get("proposals_nbytes") or 0),
            }
        }
    return {}


def _normalization(norm: Any) -> dict | None:
    """The intensity normalisation's numbers, so the scan table needs no scan opened."""
    if not isinstance(norm, dict):
        return None
    return {key: norm[key] for key in NORMALIZATION_KEYS if key in norm} or None


def dir_nbytes(path: Path) -> int:
    """Bytes on disk of every file under path (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # removed by a concurrent replace
                total += os.stat(os.path.join(root, name)).st_size
    return total


def index_document(rows: dict[str, dict]) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "updated_at": utc_now(),
        "scans": [rows[k] for k in sorted(rows)],
    }


def render_index(rows: dict[str, dict]) -> str:
    """index.json text: one row per line (readable, greppable) via the C JSON encoder.

    json.dumps(indent=...) falls back to the pure-Python encoder, 10x slower at 10,000 rows.
    """
    doc = index_document(rows)
    lines = ",\n".join(row_line(row) for row in doc["scans"])
    head = json.dumps({k: v for k, v in doc.items() if k != "scans"})[:-1]
    return f'{head}, "scans": [\n{lines}\n]}}\n'


def parse_index(text: str, where: str = INDEX_FILE) -> dict[str, dict]:
    """Rows by scan id; CorruptIndexError (saying how to rebuild it) if the text is not an index.

    The cyclic garbage collector is paused meanwhile: 100,000 rows are millions of new
    containers, and the collections their allocation triggers took 60 % of the parse.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        doc = json.loads(text)
        return {row["scan_id"]: row for row in doc.get("scans", [])}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CorruptIndexError(
            f"{where} is corrupt ({type(exc).__name__}: {exc}); rebuild it from the scans with "
            "`maskbank verify --repair BANK` (or bank.rebuild_index() on a writable bank)"
        ) from None
    finally:
        if enabled:
            gc.enable()


_ROW_PREFIX = '{"scan_id": "'


def row_line(row: dict) -> str:
    """One row as index.json holds it: a line of JSON that starts with its scan id."""
    return json.dumps({"scan_id": row["scan_id"], **row})


def update_index_text(text: str, scan_id: str, row: dict | None) -> str:
    """index.json text with one row replaced, inserted (sorted) or removed (row=None)."""
    return fold_rows(text, {scan_id: row})


def fold_rows(text: str, changes: Mapping[str, dict | None]) -> str:
    """index.json text with rows replaced, inserted (sorted) or removed (None), in one pass.

    Works on the one-row-per-line text that render_index writes, so folding a thousand
    rows into a 100,000-scan index does not parse and re-encode the others; anything
    else (e.g. a hand-edited index) takes the slow path through the JSON parser.
    """
    lines = text.rstrip("\n").split("\n")
    body = [line.rstrip(",") for line in lines[1:-1] if line]
    if (
        len(lines) < 2
        or not lines[0].endswith('"scans": [')
        or lines[-1] != "]}"
        or not all(line.startswith(_ROW_PREFIX) for line in body)
    ):
        rows = parse_index(text)
        for scan_id, row in changes.items():
            if row is None:
                rows.pop(scan_id, None)
            else:
                rows[scan_id] = row
        return render_index(rows)
    start = len(_ROW_PREFIX)
    by_id = {line[start : line.index('"', start)]: line for line in body}
    for scan_id, row in changes.items():
        if row is None:
            by_id.pop(scan_id, None)
        else:
            by_id[scan_id] = row_line(row)
    head = json.dumps({"format_version": FORMAT_VERSION, "updated_at": utc_now()})[:-1]
    rows_text = ",\n".join(by_id[k] for k in sorted(by_id))
    return f'{head}, "scans": [\n{rows_text}\n]}}\n'


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + os.replace: readers see old or new, never half.

    The file gets the mode open() would give (honouring the umask), not mkstemp's 0600,
    so teammates sharing the bank can read it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
