"""Names of every file and folder in a bank: the single place that spells the layout.

See docs/bank-format.md for the format these names describe.
"""

from __future__ import annotations

import re

FORMAT_VERSION = 1
FORMAT_NAME = "maskbank"

INDEX_FILE = "index.json"
SCANS_DIR = "scans"
REPORTS_DIR = "reports"
STAGING_DIR = ".staging"
TRASH_DIR = ".trash"
LOCKS_DIR = ".locks"
PROPOSALS_PART = "proposals"
PROPOSAL_LAYERS_DIR = "layers"  # label-map layers, inside the proposals part

# "@" separates scan id, part and a random token in staging/trash names, so it is
# not allowed in scan ids; "/" would create nested groups. Always fullmatch: "$" also
# matches before a trailing newline.
_SCAN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
PARTS = (None, PROPOSALS_PART)


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


def scan_path(scan_id: str) -> str:
    """Path of a scan group relative to the bank root."""
    return f"{SCANS_DIR}/{scan_id}"


def part_path(scan_id: str, part: str | None) -> str:
    """Path of a scan part (the whole scan when part is None) relative to the bank root."""
    return scan_path(scan_id) if part is None else f"{scan_path(scan_id)}/{part}"


def proposal_layer_array(layer_name: str) -> str:
    """Name, relative to its scan, of a proposals layer's array (as ScanView.read takes it)."""
    return f"{PROPOSALS_PART}/{PROPOSAL_LAYERS_DIR}/{layer_name}"


def temp_name(scan_id: str, part: str | None, token: str) -> str:
    """Folder name under .staging/ or .trash/ for one write of one scan part."""
    return f"{scan_id}@{part or 'scan'}@{token}"


def parse_temp_name(name: str) -> tuple[str, str | None, str] | None:
    """Inverse of temp_name; None for names the bank did not make."""
    bits = name.split("@")
    if len(bits) != 3 or not _SCAN_ID.fullmatch(bits[0]):
        return None
    part = None if bits[1] == "scan" else bits[1]
    if part not in PARTS:
        return None
    return bits[0], part, bits[2]
