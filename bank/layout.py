"""Names of every file and folder in a bank: the single place that spells the layout.

See docs/bank-format.md for the format these names describe.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime

FORMAT_VERSION = 1
FORMAT_NAME = "maskbank"

INDEX_FILE = "index.json"
# Local banks: rows published since index.json was last compacted, index-rows/<scan>.json
# (temps .<scan>.json.<random>.tmp); bank/index_rows.py.
INDEX_ROWS_DIR = "index-rows"
SCANS_DIR = "scans"
REPORTS_DIR = "reports"
STAGING_DIR = ".staging"
TRASH_DIR = ".trash"
LOCKS_DIR = ".locks"
PROPOSALS_PART = "proposals"
PROPOSAL_LAYERS_DIR = "layers"  # label-map layers, inside the proposals part
# Object stores only (docs/bank-format.md, "Object storage"): one small row object per live
# scan version, rows/<scan>@<version>.json; the scan's group is scans/<scan>@<version>/.
ROWS_DIR = "rows"
_VERSION = re.compile(r"[0-9]{8}T[0-9]{12}Z-[0-9a-f]{8}")

# "@" separates scan id, part and a random token in staging/trash names, so it is
# not allowed in scan ids; "/" would create nested groups. Always fullmatch: "$" also
# matches before a trailing newline.
_SCAN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
PARTS = (None, PROPOSALS_PART)  # the scan and its default proposal set
DEFAULT_SET = "default"
# Named proposal sets live in parts "proposals-<name>"; "-" never occurs in a set name,
# so the part name alone says which set it holds.
_SET_NAME = re.compile(r"[a-z0-9][a-z0-9_]{0,31}")
_SET_PART_PREFIX = f"{PROPOSALS_PART}-"


def check_set_name(name: str) -> str:
    """Reject proposal set names that are not short lowercase identifiers."""
    if not isinstance(name, str) or not _SET_NAME.fullmatch(name):
        raise ValueError(
            f"invalid proposal set name {name!r}: use 1-32 characters from [a-z0-9_], "
            "starting with a letter or digit"
        )
    return name


def proposals_part(name: str = DEFAULT_SET) -> str:
    """Part holding proposal set ``name``: the default set stays where it always was."""
    check_set_name(name)
    return PROPOSALS_PART if name == DEFAULT_SET else f"{_SET_PART_PREFIX}{name}"


def set_of_part(part: str | None) -> str | None:
    """Proposal set name a part holds, None for the scan itself or any other name."""
    if part == PROPOSALS_PART:
        return DEFAULT_SET
    if isinstance(part, str) and part.startswith(_SET_PART_PREFIX):
        name = part[len(_SET_PART_PREFIX) :]
        if _SET_NAME.fullmatch(name) and name != DEFAULT_SET:
            return name
    return None


def is_part(part: str | None) -> bool:
    """True for the parts a scan may have: None (the scan) or one proposal set."""
    return part is None or set_of_part(part) is not None


def check_scan_id(scan_id: str) -> str:
    """Reject ids that would escape the scan folder or break staging names."""
    if not isinstance(scan_id, str) or not _SCAN_ID.fullmatch(scan_id) or scan_id.endswith("."):
        raise ValueError(
            f"invalid scan id {scan_id!r}: use 1-200 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return scan_id


def check_array_name(name: str) -> str:
    """Array names may nest with '/', but never climb out of their group."""
    if not isinstance(name, str) or not _ARRAY_NAME.fullmatch(name) or ".." in name.split("/"):
        raise ValueError(f"invalid array name {name!r}: use [A-Za-z0-9._-] segments joined by '/'")
    return name


def scan_path(scan_id: str, version: str | None = None) -> str:
    """Path of a scan group relative to the bank root (of one version, on object stores)."""
    return f"{SCANS_DIR}/{scan_id}" if version is None else f"{SCANS_DIR}/{scan_id}@{version}"


def part_path(scan_id: str, part: str | None, version: str | None = None) -> str:
    """Path of a scan part (the whole scan when part is None) relative to the bank root."""
    base = scan_path(scan_id, version)
    return base if part is None else f"{base}/{part}"


def new_version() -> str:
    """A fresh scan version name: its UTC start time (sorts by time) and 32 random bits."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}Z-{os.urandom(4).hex()}"


def version_time(version: str) -> float:
    """POSIX time a version was started (its name says), for the leftovers' grace period."""
    return datetime.strptime(version[:21], "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC).timestamp()


def row_key(scan_id: str, version: str) -> str:
    """Key, relative to the bank root, of the row object that makes a scan version live."""
    return f"{ROWS_DIR}/{scan_id}@{version}.json"


def parse_versioned(name: str) -> tuple[str, str] | None:
    """(scan id, version) of a name ``<scan>@<version>`` (a ``.json`` suffix allowed), else None."""
    bits = name.removesuffix(".json").split("@")
    if len(bits) != 2 or not _SCAN_ID.fullmatch(bits[0]) or not _VERSION.fullmatch(bits[1]):
        return None
    return bits[0], bits[1]


def proposal_layer_array(layer_name: str, name: str = DEFAULT_SET) -> str:
    """Name, relative to its scan, of a proposals layer's array (as ScanView.read takes it)."""
    return f"{proposals_part(name)}/{PROPOSAL_LAYERS_DIR}/{layer_name}"


def temp_name(scan_id: str, part: str | None, token: str) -> str:
    """Folder name under .staging/ or .trash/ for one write of one scan part."""
    return f"{scan_id}@{part or 'scan'}@{token}"


def parse_temp_name(name: str) -> tuple[str, str | None, str] | None:
    """Inverse of temp_name; None for names the bank did not make."""
    bits = name.split("@")
    if len(bits) != 3 or not _SCAN_ID.fullmatch(bits[0]):
        return None
    part = None if bits[1] == "scan" else bits[1]
    if not is_part(part):
        return None
    return bits[0], part, bits[2]
