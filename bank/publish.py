"""Atomic publication of one scan (or one part of it) by directory renames.

A writer fills `.staging/<scan>@<part>@<token>/` (a complete Zarr group), then:
  1. renames the current version, if any, to `.trash/<scan>@<part>@<token>/`;
  2. renames the staging folder into place;
  3. deletes the trash.
Readers therefore see the old version or the new one, never a half-written one.
A crash between 1 and 2 leaves the scan missing with its old version in .trash;
`recover()` renames it back. Each write holds a per-scan flock for its whole
duration, so `recover()` only touches folders whose writer is gone.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .layout import (
    LOCKS_DIR,
    STAGING_DIR,
    TRASH_DIR,
    parse_temp_name,
    part_path,
    temp_name,
)
from .locks import file_lock, try_lock_readonly


def scan_lock_path(root: Path, scan_id: str) -> Path:
    return root / LOCKS_DIR / "scans" / f"{scan_id}.lock"


def index_lock_path(root: Path) -> Path:
    return root / LOCKS_DIR / "index.lock"


@contextmanager
def staging_folder(root: Path, scan_id: str, part: str | None) -> Iterator[Path]:
    """A fresh staging folder, removed again if the block raises (a crash leaves it for recover)."""
    path = root / STAGING_DIR / temp_name(scan_id, part, uuid.uuid4().hex)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def publish(root: Path, staged: Path, scan_id: str, part: str | None) -> None:
    """Move `staged` into place for (scan_id, part), replacing any previous version atomically."""
    target = root / part_path(scan_id, part)
    target.parent.mkdir(parents=True, exist_ok=True)
    _fsync_tree(staged)  # data must be durable before the rename makes it visible
    trash = None
    if target.exists():
        trash = root / TRASH_DIR / temp_name(scan_id, part, uuid.uuid4().hex)
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(target, trash)
    os.rename(staged, target)
    fsync_dir(target.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """fsync every file and folder under path, so a power cut cannot publish empty files."""
    for folder, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    """Make the rename durable where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Leftovers:
    """Folders a crashed writer left behind."""

    staging: list[Path] = field(default_factory=list)
    trash: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.staging or self.trash)


def find_leftovers(root: Path) -> Leftovers:
    """Everything under .staging/ and .trash/ (live writers' folders included)."""
    found = Leftovers()
    for sub, bucket in ((STAGING_DIR, found.staging), (TRASH_DIR, found.trash)):
        folder = root / sub
        if folder.is_dir():
            bucket.extend(sorted(p for p in folder.iterdir()))
    return found


def writer_alive(root: Path, leftover_name: str) -> bool:
    """True if the writer that owns a .staging/.trash folder still holds its scan lock."""
    parsed = parse_temp_name(leftover_name)
    if parsed is None:
        return False
    # Never creates the lock file: verify must work on a bank it may not write.
    return try_lock_readonly(scan_lock_path(root, parsed[0])) is False


def recover(root: Path) -> list[str]:
    """Undo interrupted writes whose writer is gone; return what was done, one line per action."""
    actions: list[str] = []
    leftovers = find_leftovers(root)
    by_scan: dict[str, list[Path]] = {}
    for path in leftovers.staging + leftovers.trash:
        parsed = parse_temp_name(path.name)
        if parsed is None:
            _remove(path)
            actions.append(f"removed unrecognised leftover {path.relative_to(root)}")
            continue
        by_scan.setdefault(parsed[0], []).append(path)
    for scan_id, paths in sorted(by_scan.items()):
        with file_lock(scan_lock_path(root, scan_id), blocking=False) as free:
            if not free:
                continue  # a live writer owns these folders
            actions.extend(_recover_scan(root, scan_id, paths))
    return actions


def _recover_scan(root: Path, scan_id: str, paths: list[Path]) -> list[str]:
    actions = []
    trash = [p for p in paths if p.parent.name == TRASH_DIR]
    staging = [p for p in paths if p.parent.name == STAGING_DIR]
    for path in staging:
        _remove(path)
        actions.append(f"{scan_id}: removed unfinished write {path.relative_to(root)}")
    # Restore the newest trashed version of a part that is now missing; delete the rest.
    trash.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for path in trash:
        _, part, _ = parse_temp_name(path.name)  # type: ignore[misc]
        target = root / part_path(scan_id, part)
        parent_ok = part is None or (root / part_path(scan_id, None)).is_dir()
        if not target.exists() and parent_ok:
            os.rename(path, target)
            actions.append(f"{scan_id}: restored {part or 'scan'} from interrupted replace")
        else:
            _remove(path)
            actions.append(f"{scan_id}: removed superseded {path.relative_to(root)}")
    return actions


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
