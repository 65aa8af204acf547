"""Decompress a file's bytes in a background thread, so work on its start overlaps the rest.

Why: decompressing a ``.nii.gz`` is the floor of a scan's prepare time, and
resampling only needs the first planes of a volume to begin. ISA-L (and zlib)
release the GIL while they inflate, so a second thread decodes while the
caller resamples the planes already there: the two costs overlap instead of
adding up. A third thread hashes the compressed bytes meanwhile (hashlib
releases the GIL too), so the file is read from disk exactly once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import threading
import zlib

import numpy as np

from maskbank.pipeline.errors import ScanError

_STEP = 4 << 20  # bytes decoded between progress reports
# Decompressed bytes tolerated after the declared data (the gzip trailer is checked after
# them). A gzip bomb hides gigabytes of zeros there; the drain stops at this cap.
MAX_TRAILING = 1 << 20
_DRAIN = 1 << 16  # scratch block of the drain: memory stays flat whatever follows the data


def _gzip_open(blob: bytes):
    try:
        from isal import igzip  # ISA-L: ~1.7x faster inflate than zlib

        return igzip.open(io.BytesIO(blob), "rb")
    except ImportError:  # pragma: no cover - isal is a declared dependency
        return gzip.open(io.BytesIO(blob), "rb")


class GzipStream:
    """``buffer`` (``size`` bytes) fills from the start while ``wait(n)`` blocks for the first n."""

    def __init__(
        self, path: str, blob: bytes | np.ndarray, size: int, max_trailing: int = MAX_TRAILING
    ) -> None:
        self.path = path
        self.size = size
        self.max_trailing = max_trailing
        gz = bytes(blob[:2]) == b"\x1f\x8b"
        if not gz and isinstance(blob, np.ndarray) and blob.flags.writeable:
            # Uncompressed file already read into a writable array: use it, no copy.
            self.buffer = blob[:size]
        else:
            self.buffer = np.empty(size, dtype=np.uint8)
        self._gz = gz
        self.sha256: str | None = None
        self._blob = blob
        self._done = 0
        self._complete = False  # all bytes decoded, gzip CRC checked, hash ready
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="gzip-stream", daemon=True)
        self._thread.start()

    def _advance(self, n: int) -> None:
        with self._cond:
            self._done += n
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            hasher = threading.Thread(target=self._hash, daemon=True)
            hasher.start()
            if self._gz:
                view = memoryview(self.buffer)
                with _gzip_open(self._blob) as fh:
                    while self._done < self.size:
                        n = fh.readinto(view[self._done : self._done + _STEP])
                        if not n:
                            raise EOFError(
                                f"decompressed data ends at {self._done:,} of {self.size:,} bytes"
                            )
                        self._advance(n)
                    self._drain(fh)
            else:
                n = min(len(self._blob), self.size)
                if self.buffer.base is None or not np.shares_memory(self.buffer, self._blob):
                    self.buffer[:n] = np.frombuffer(self._blob, dtype=np.uint8, count=n)
                if n < self.size:
                    raise EOFError(f"file ends at {n:,} of {self.size:,} bytes")
                self._advance(n)
            hasher.join()
            with self._cond:
                self._complete = True
                self._cond.notify_all()
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as exc:
            self._fail(
                ScanError(
                    self.path, f"truncated or corrupt voxel data ({type(exc).__name__}: {exc})"
                )
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._fail(exc)
        finally:
            self._blob = b""

    def _drain(self, fh) -> None:
        """Read to the end in small blocks, so the gzip trailer's CRC/length are checked,
        but refuse more than ``max_trailing`` bytes past the declared data."""
        scratch = memoryview(bytearray(_DRAIN))
        extra = 0
        while n := fh.readinto(scratch):
            extra += n
            if extra > self.max_trailing:
                raise ScanError(
                    self.path,
                    f"decompresses to more than {self.max_trailing:,} bytes past the "
                    f"{self.size:,} bytes its header declares (a corrupt file or a gzip bomb); "
                    "re-export the image",
                )

    def _hash(self) -> None:
        self.sha256 = hashlib.sha256(memoryview(self._blob)).hexdigest()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    def wait(self, nbytes: int | None = None) -> None:
        """Block until the first ``nbytes`` are decoded, or (default) everything is decoded and
        checked; re-raise a decode error."""
        with self._cond:
            if nbytes is None:
                while not self._complete and self._error is None:
                    self._cond.wait()
            else:
                while self._done < min(int(nbytes), self.size) and self._error is None:
                    self._cond.wait()
            if self._error is not None:
                raise self._error
