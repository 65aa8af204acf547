"""Region-of-interest reads decode only the chunks they touch.

Proof by sabotage: every chunk the crop does not touch is overwritten with
garbage inside its shard file; the crop still reads exactly, the full array fails.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from maskbank.bank import Bank
from tests.bank.conftest import make_arrays, make_attrs

EMPTY = 2**64 - 1


def shard_index(path: Path, n_chunks: int) -> np.ndarray:
    """(offset, nbytes) per inner chunk, C order, from the index at the shard's end."""
    raw = path.read_bytes()
    index = np.frombuffer(raw[-(16 * n_chunks + 4) : -4], dtype="<u8")
    return index.reshape(n_chunks, 2)


def corrupt_chunks_outside(
    array_dir: Path, keep: set[tuple[int, int, int]], chunk: int, shard: int
) -> int:
    """Overwrite every stored inner chunk whose grid position is not in keep; return how many."""
    per = shard // chunk
    corrupted = 0
    for path in sorted((array_dir / "c").rglob("*")):
        if not path.is_file():
            continue
        shard_pos = tuple(int(p) for p in path.relative_to(array_dir / "c").parts)
        index = shard_index(path, per**3)
        data = bytearray(path.read_bytes())
        for k, local in enumerate(itertools.product(range(per), repeat=3)):
            offset, nbytes = (int(v) for v in index[k])
            pos = tuple(s * per + c for s, c in zip(shard_pos, local, strict=True))
            if offset == EMPTY or pos in keep:
                continue
            data[offset : offset + nbytes] = b"\xa5" * nbytes
            corrupted += 1
        path.write_bytes(bytes(data))
    return corrupted


def test_crop_reads_only_touched_chunks(bank: Bank) -> None:
    arrays = make_arrays(4)
    bank.write_scan("s", arrays, make_attrs("s"))
    roi = (slice(20, 44), slice(30, 40), slice(0, 14))  # chunks x 1..2, y 1..2, z 0 (16^3 chunks)
    touched = {(x, y, 0) for x in (1, 2) for y in (1, 2)}
    n = corrupt_chunks_outside(Path(bank.location) / "scans" / "s" / "image", touched, 16, 32)
    assert n == 5 * 4 * 3 - len(touched)
    scan = Bank.open(bank.location).scan("s")
    np.testing.assert_array_equal(scan.read("image", roi), arrays["image"][roi])
    with pytest.raises(Exception):  # noqa: B017 - any codec error proves the garbage is decoded
        scan.read("image")
    problems = Bank.open(bank.location).verify()
    assert any("s: image: cannot decode" in p for p in problems), problems


def test_roi_semantics_match_numpy(filled: Bank) -> None:
    scan = filled.scan("ct-002")
    label = make_arrays(2)["label"]
    for roi in [
        (slice(0, 1), slice(0, 64), slice(47, 48)),
        (slice(60, 200), slice(None), slice(10, 12)),  # clipped like numpy
        (slice(5, 5), slice(0, 3), slice(0, 3)),  # empty
    ]:
        np.testing.assert_array_equal(scan.read("label", roi), label[roi])
    np.testing.assert_array_equal(scan.read("label", (slice(3, 9),)), label[3:9])
