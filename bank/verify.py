"""`Bank.verify()`: the full integrity check. Decodes every chunk, so it is slow on purpose."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np
import zarr

from .encoding import iter_slabs
from .index import ROW_KEYS, make_row, missing_attrs
from .layout import DEFAULT_SET, FORMAT_NAME, FORMAT_VERSION, part_path, set_of_part

if TYPE_CHECKING:
    from .bank import Bank

_INFO_KEYS = ("format_version", "written_at", "arrays")


def verify_bank(bank: Bank, scan_ids: list[str] | None = None, deep: bool = True) -> list[str]:
    """Every problem found, one line each, prefixed with the scan id where there is one."""
    bank.refresh(strict=False)  # a corrupt index is a finding
    problems: list[str] = []
    on_disk = set(bank.scan_ids_on_storage())
    indexed = set(bank.scan_ids)
    if bank.index_missing:
        problems.append(
            "index.json is missing (run bank.rebuild_index() or `maskbank verify --repair BANK`)"
        )
    if bank.index_error:
        problems.append(bank.index_error)
        indexed = set()  # rows listed from storage, not from the index: nothing to compare
    for sid in sorted(indexed - on_disk):
        problems.append(f"{sid}: listed in index.json but its group is missing")
    for sid in sorted(on_disk - indexed):
        problems.append(f"{sid}: group exists but index.json does not list it")
    problems += bank._backend.leftover_problems()
    wanted = on_disk if scan_ids is None else on_disk & set(scan_ids)
    for sid in sorted(set(scan_ids or ()) - on_disk - indexed):
        problems.append(f"{sid}: no such scan")
    for sid in sorted(wanted):
        problems.extend(f"{sid}: {p}" for p in verify_scan(bank, sid, sid in indexed, deep))
    return problems


def verify_scan(bank: Bank, scan_id: str, indexed: bool, deep: bool = True) -> list[str]:
    """Problems of one scan: attributes, arrays vs their records, decodability, index row."""
    path = bank.scan_path(scan_id) if indexed else part_path(scan_id, None)
    try:
        group = zarr.open_group(bank.store, path=path, mode="r")
    except (FileNotFoundError, KeyError, ValueError) as exc:
        return [f"cannot open group: {exc}"]
    attrs = dict(group.attrs)
    info = attrs.get(FORMAT_NAME)
    if not isinstance(info, dict) or any(k not in info for k in _INFO_KEYS):
        return [f"bank attributes ({FORMAT_NAME}: {_INFO_KEYS}) missing or incomplete"]
    problems = [f"missing attribute {k!r}" for k in missing_attrs(attrs)]
    if int(info["format_version"]) > FORMAT_VERSION:
        problems.append(f"format_version {info['format_version']} is newer than {FORMAT_VERSION}")
    records = info["arrays"]
    if "image" not in records:
        return [*problems, "no 'image' array recorded"]
    grid = tuple(records["image"]["shape"])
    children = {k for k, _ in group.members(max_depth=None)}
    set_parts = sorted(
        k for k, node in group.groups() if set_of_part(k) is not None and k in children
    )
    problems += _check_arrays(group, records, grid, set_parts, children, deep)
    sets: dict[str, tuple[dict, int]] = {}
    for part in set_parts:
        pgroup = group[part]
        part_attrs = dict(pgroup.attrs)
        pinfo = part_attrs.get(FORMAT_NAME)
        if not isinstance(pinfo, dict) or "arrays" not in pinfo:
            problems.append(f"{part}: bank attributes missing")
            continue
        sets[set_of_part(part)] = (part_attrs, bank.stored_nbytes(scan_id, part))  # type: ignore[index]
        pchildren = {k for k, _ in pgroup.members(max_depth=None)}
        problems += [
            f"{part}/{p}" for p in _check_arrays(pgroup, pinfo["arrays"], grid, [], pchildren, deep)
        ]
        tag = "" if set_of_part(part) == DEFAULT_SET else f"{part}: "
        problems += [tag + p for p in _check_proposal_count(pgroup, pinfo)]
        problems += [tag + p for p in _check_proposal_version(info, pinfo)]
    if indexed:
        problems += _check_row(bank, scan_id, attrs, sets)
    return problems


def _check_arrays(
    group: zarr.Group,
    records: dict,
    grid: tuple,
    skip: list[str],
    children: set[str],
    deep: bool,
) -> list[str]:
    problems = []
    arrays_on_disk = {
        k
        for k in children
        if isinstance(_node(group, k), zarr.Array)
        and not any(k == s or k.startswith(s + "/") for s in skip)
    }
    for name in sorted(arrays_on_disk - set(records)):
        problems.append(f"array {name!r} is on disk but not recorded in attributes")
    for name, rec in sorted(records.items()):
        if name not in arrays_on_disk:
            problems.append(f"array {name!r} is recorded but missing")
            continue
        problems += [f"{name}: {p}" for p in _check_array(group[name], rec, name, grid, deep)]
    return problems


def _node(group: zarr.Group, key: str):
    try:
        return group[key]
    except Exception:  # a broken zarr.json is reported by the array check
        return None


def _check_array(arr: zarr.Array, rec: dict, name: str, grid: tuple, deep: bool) -> list[str]:
    problems = []
    if list(arr.shape) != list(rec["shape"]) or np.dtype(arr.dtype).str != rec["dtype"]:
        problems.append(
            f"shape/dtype {arr.shape}/{np.dtype(arr.dtype).str} != recorded "
            f"{tuple(rec['shape'])}/{rec['dtype']}"
        )
        return problems
    if arr.ndim == 3 and tuple(arr.shape) != grid:
        problems.append(f"shape {arr.shape} differs from the scan grid {grid}")
    if not deep:
        return problems
    crc = zlib.crc32(b"")
    try:
        for start, slab in iter_slabs(arr):
            crc = zlib.crc32(memoryview(slab).cast("B"), crc)
            if name == "image" and slab.dtype.kind == "f" and not np.isfinite(slab).all():
                problems.append(f"NaN/inf in slab starting at x={start}")
    except Exception as exc:  # any codec/store failure means an undecodable chunk
        problems.append(f"cannot decode: {type(exc).__name__}: {exc}")
        return problems
    if rec.get("crc32") is not None and crc != rec["crc32"]:
        problems.append("checksum mismatch (data changed or a chunk/shard file is missing)")
    return problems


def _check_proposal_count(pgroup: zarr.Group, pinfo: dict) -> list[str]:
    n = pinfo.get("n_proposals")
    for name in ("members_indptr", "indptr"):
        if name in pinfo["arrays"]:
            length = pinfo["arrays"][name]["shape"][0]
            if n is not None and length - 1 != n:
                return [f"proposals: n_proposals={n} but {name} has {length} entries"]
    return []


def _check_proposal_version(info: dict, pinfo: dict) -> list[str]:
    """Proposals must derive from the scan version they sit in (recorded since tokens exist)."""
    made_from = pinfo.get("scan_token")
    if made_from is None:
        return []
    current = info.get("token") or info.get("written_at")
    if made_from != current:
        return [
            f"proposals were made from another version of the scan ({made_from}, scan is "
            f"{current}); make them again with `maskbank propose BANK`"
        ]
    return []


def _check_row(
    bank: Bank, scan_id: str, attrs: dict, sets: dict[str, tuple[dict, int]]
) -> list[str]:
    row = bank.index_rows[scan_id]
    default_attrs, default_bytes = sets.get(DEFAULT_SET, (None, 0))
    expected = make_row(
        scan_id, attrs, default_attrs, bank.stored_nbytes(scan_id), default_bytes, sets
    )
    keys = list(ROW_KEYS)
    if "proposal_sets" not in row and set(sets) <= {DEFAULT_SET}:
        keys.remove("proposal_sets")  # a row from before named sets: nothing it could miss
    stale = [k for k in keys if row.get(k) != expected[k]]
    if stale:
        return [f"index row differs from the scan in {stale} (run bank.rebuild_index())"]
    return []
