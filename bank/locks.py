"""Advisory file locks so concurrent writers never interleave on one scan or the index.

POSIX flock: released automatically when the process dies, which is what lets
`recover()` tell a crashed writer's staging folder from a live one. A lock is
waited for with a deadline (a stale lock on a network file system would
otherwise hang a task forever), is re-entrant within one thread (a flow may hold
a scan's lock around its own check-then-write), and its file is group-writable
so that teammates sharing a bank can take it too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LockTimeoutError, UnsafeFilesystemError

log = logging.getLogger(__name__)

# Seconds to wait for a lock before giving up; MASKBANK_LOCK_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 900.0
_POLL_S = (0.01, 0.5)  # first and longest pause between non-blocking attempts

_held: dict[str, tuple[int, int, int]] = {}  # abspath -> (fd, depth, thread id)
_held_guard = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it (os.umask is a set-and-return race)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode for new plain files: what open() would give (mkstemp alone gives 0600)."""
    return 0o666 & ~current_umask()


def lock_timeout(timeout: float | None = None) -> float:
    if timeout is not None:
        return float(timeout)
    return float(os.environ.get("MASKBANK_LOCK_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def _open_lock_file(path: Path) -> int:
    """An fd on the lock file, creating it group-writable; read-only if we may not write it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        try:
            return os.open(path, os.O_RDWR)
        except PermissionError:
            return os.open(path, os.O_RDONLY)  # flock works on read-only fds on local disks
    with contextlib.suppress(OSError):  # lock files hold no data: let the group take them
        os.fchmod(fd, file_mode() | 0o660)
    return fd


@contextmanager
def file_lock(path: Path, blocking: bool = True, timeout: float | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on `path`; yields False (holding nothing) if non-blocking and busy.

    Blocking waits at most `timeout` seconds (default `MASKBANK_LOCK_TIMEOUT_S`, 900)
    and then raises LockTimeoutError naming the lock file. Blocking acquisitions are
    re-entrant in one thread; a non-blocking one yields False while this process holds it.
    """
    key = os.path.abspath(path)
    me = threading.get_ident()
    with _held_guard:
        held = _held.get(key)
        busy = held is not None and not blocking  # a probe: held here counts as held
        if held is not None and held[2] == me and blocking:
            _held[key] = (held[0], held[1] + 1, me)
            nested = True
        else:
            nested = False
    if busy:
        yield False
        return
    if nested:
        try:
            yield True
        finally:
            with _held_guard:
                fd, depth, _ = _held[key]
                _held[key] = (fd, depth - 1, me)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock_file(path)
    try:
        if not _acquire(fd, path, blocking, lock_timeout(timeout)):
            yield False
            return
        with _held_guard:
            _held[key] = (fd, 1, me)
        try:
            yield True
        finally:
            with _held_guard:
                _held.pop(key, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, blocking: bool, timeout: float) -> bool:
    """Poll LOCK_NB until the lock is ours or the deadline passes (flock itself never times out)."""
    deadline = time.monotonic() + timeout
    pause = _POLL_S[0]
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not blocking:
                return False
        if not waited:
            log.debug("waiting for lock %s (held by another writer)", path)
            waited = True
        now = time.monotonic()
        if now >= deadline:
            raise LockTimeoutError(
                f"gave up after {timeout:g} s waiting for lock {path}: another writer holds it. "
                "If no maskbank writer is running (check with `fuser` on that file), the lock is "
                "stale (e.g. left on an NFS server by a lost client): delete the file and retry; "
                "or wait longer with MASKBANK_LOCK_TIMEOUT_S"
            )
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, _POLL_S[1])


def try_lock_readonly(path: Path) -> bool | None:
    """True if the lock at `path` is free, False if held, None if it cannot be tested.

    For read-only checks (verify on a bank we may not write): never creates the file.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # nobody ever took it
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


_probed: set[str] = set()

_UNSAFE_ADVICE = (
    "Writers of a bank rely on both (see docs/bank-format.md, 'Shared banks'). Write the "
    "bank on a file system where they work (local disk; NFS with lock support; Lustre "
    "mounted with -o flock) and copy the finished bank to its shared place."
)


def probe_filesystem(folder: Path) -> None:
    """Refuse a folder whose file system lacks working locks or atomic rename-over.

    Two fds of one file must conflict under flock (not so with Lustre's -o localflock
    across nodes, which no single-host probe can see; documented), and os.replace
    onto an existing file must replace it. Probed once per folder per process.
    """
    key = os.path.abspath(folder)
    if key in _probed:
        return
    folder.mkdir(parents=True, exist_ok=True)
    token = os.urandom(6).hex()
    a, b = folder / f".probe-{token}-a", folder / f".probe-{token}-b"
    try:
        a.write_bytes(b"a")
        fd1 = os.open(a, os.O_RDWR)
        fd2 = os.open(a, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd1, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise UnsafeFilesystemError(
                    f"file locks do not work in {folder} ({errno.errorcode.get(exc.errno, exc)}). "
                    + _UNSAFE_ADVICE
                ) from None
            try:
                fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                raise UnsafeFilesystemError(
                    f"file locks in {folder} do not exclude each other (one file locked twice "
                    "from two descriptors). " + _UNSAFE_ADVICE
                )
        finally:
            os.close(fd2)
            os.close(fd1)
        b.write_bytes(b"b")
        os.replace(a, b)
        if a.exists() or b.read_bytes() != b"a":
            raise UnsafeFilesystemError(
                f"renaming a file over an existing one in {folder} does not replace it "
                "atomically. " + _UNSAFE_ADVICE
            )
    finally:
        for p in (a, b):
            with contextlib.suppress(OSError):
                p.unlink()
    _probed.add(key)
