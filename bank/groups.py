"""Filling a new scan (part) group: its arrays, then the attributes that mark it complete.

Shared by `Bank.write_scan` (which writes it to storage through its backend) and
``bank.proposal_store.proposal_nbytes`` (which writes the same group in memory to
measure what a proposal set will take), so that the two can never disagree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from .encoding import Encoding, write_array
from .index import utc_now
from .layout import FORMAT_NAME, FORMAT_VERSION, set_of_part


def new_scan_token() -> str:
    """A whole scan's version token (random; a part records the token of its scan)."""
    return os.urandom(12).hex()


def fill_group(
    group: zarr.Group,
    arrays: Mapping[str, np.ndarray],
    user_attrs: dict,
    part: str | None,
    scan_token: str | None,
    grid: tuple[int, ...],
    encoding: Encoding,
) -> None:
    """Write a new scan (part) group's arrays, then its attributes (which mark it complete).

    ``encoding`` is the bank's (the part's own, e.g. ``proposals_clevel``, is taken here).
    """
    encoding = encoding.for_part(part)
    records = {
        name: write_array(group, name, data, encoding, grid)
        for name, data in sorted(arrays.items())
    }
    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "written_at": utc_now(),
        "part": part or "scan",
        "arrays": records,
    }
    if part is None:
        info["token"] = new_scan_token()
    else:
        info["scan_token"] = scan_token
    if set_of_part(part) is not None:
        info["n_proposals"] = count_proposals(arrays, user_attrs)
    # One metadata write (attrs.update writes zarr.json once per key).
    group.update_attributes({**user_attrs, FORMAT_NAME: info})


def count_proposals(arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> int:
    """n_proposals from the caller's attrs, else from a CSR indptr array, else 0."""
    if "n_proposals" in attrs:
        return int(attrs["n_proposals"])
    for name, data in arrays.items():
        if name.split("/")[-1] in ("members_indptr", "indptr") and data.ndim == 1:
            return max(0, len(data) - 1)
    return 0
