"""The bank's public read API: what the sampler and the checks use instead of its layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.bank.sampling import ChunkCache, ProposalReader, proposal_layer_array
from maskbank.bank.writing import write_proposals
from maskbank.pipeline.proposals import merge_sets
from maskbank.pipeline.proposals.external import from_label_map
from maskbank.pipeline.proposals.features import compute_features

from .conftest import make_arrays, make_attrs


@pytest.fixture
def with_proposals(filled: Bank) -> Bank:
    """``filled`` plus proposals in two layers (one of them binary) on ct-001."""
    label = filled.scan("ct-001").read("label")
    blob = np.zeros(label.shape, np.uint8)
    blob[30:60, 10:50, 20:40] = 1
    ps = merge_sets(
        [from_label_map(label, "expert"), from_label_map(blob, "blob", layer_name="blob")]
    )
    write_proposals(filled, "ct-001", compute_features(ps, None, None))
    return filled


def test_layer_array_names_read_like_the_reader(with_proposals: Bank) -> None:
    scan = with_proposals.scan("ct-001")
    reader = ProposalReader(scan)
    assert len(reader.layer_names) == 2
    roi = (slice(10, 55), slice(5, 60), slice(3, 45))
    cache = ChunkCache(1 << 24)
    for j, layer in enumerate(reader.layer_names):
        name = reader.layer_array_name(j)
        assert name == proposal_layer_array(layer) and scan.has(name)
        block = scan.read(name, roi)
        np.testing.assert_array_equal(block, np.asarray(reader.layer(j)[roi]))
        np.testing.assert_array_equal(cache.read(scan, name, roi), block)
        assert reader.layer_sizes[j] == int(scan.read(name).max()) + 1
    # the pieces tile the roi exactly: each voxel once, with the layer's values
    name = reader.layer_array_name(0)
    pieces = cache.pieces(scan, name, roi)
    assert cache.hits >= len(pieces) > 1
    out = np.full(tuple(s.stop - s.start for s in roi), -1, np.int64)
    for chunk, src, dst in pieces:
        assert (out[dst] == -1).all()
        out[dst] = chunk[src]
    np.testing.assert_array_equal(out, scan.read(name, roi))


def test_write_proposals_stores_the_features_it_is_given(tmp_path: Path) -> None:
    bank = Bank.create(tmp_path / "bank")
    arrays = make_arrays(4, shape=(40, 36, 30))
    bank.write_scan("s", arrays, make_attrs("s"))
    image = arrays["image"].astype(np.float32)
    ps = compute_features(from_label_map(arrays["label"], "expert"), image, arrays["body"])
    ps.table["compactness"] = np.full(ps.count, 0.25, np.float32)  # not what the bank would make
    write_proposals(bank, "s", ps)
    table = ProposalReader(bank.scan("s")).table
    np.testing.assert_array_equal(table["compactness"], np.full(ps.count, 0.25, np.float32))
    np.testing.assert_array_equal(table["contrast"], ps.table["contrast"])
    assert np.abs(table["contrast"]).max() > 0  # image-based: only the caller could compute it


def test_a_set_without_features_is_refused_and_nothing_written(tmp_path: Path) -> None:
    bank = Bank.create(tmp_path / "bank")
    arrays = make_arrays(5, shape=(40, 36, 30))
    bank.write_scan("s", arrays, make_attrs("s"))
    with pytest.raises(ValueError, match="compute_features"):
        write_proposals(bank, "s", from_label_map(arrays["label"], "expert"))
    assert bank.row("s")["n_proposals"] == 0
    assert not bank.scan("s").has("proposals")


def test_index_rows_is_a_read_only_view_of_the_index(filled: Bank) -> None:
    rows = filled.index_rows
    assert sorted(rows) == filled.scan_ids == ["ct-001", "ct-002", "mr-001"]
    assert [dict(rows[s]) for s in filled.scan_ids] == filled.index
    with pytest.raises(TypeError):
        rows["x"] = {}  # type: ignore[index]
    filled.delete_scan("ct-002")
    assert "ct-002" not in filled.index_rows


def test_storage_listing_sizes_and_leftovers(with_proposals: Bank) -> None:
    bank = Bank.open(with_proposals.location)
    assert bank.local_root == Path(with_proposals.location)
    assert bank.scan_ids_on_storage() == bank.scan_ids
    for sid in bank.scan_ids:
        row = bank.row(sid)
        assert bank.stored_nbytes(sid) == row["nbytes"] > 0
        assert bank.stored_nbytes(sid, "proposals") == row["proposals_nbytes"]
    assert bank.stored_nbytes("ct-001", "proposals") > 0
    assert bank.stored_nbytes("no-such-scan") == 0
    for bad in ("..", "a/b", ""):
        with pytest.raises(ValueError):
            bank.stored_nbytes(bad)
    with pytest.raises(ValueError, match="unknown part"):
        bank.stored_nbytes("ct-001", "layers")
    assert bank.leftovers() == []
    (bank.local_root / ".staging" / "ct-001@scan@abc").mkdir()
    assert bank.leftovers() == [".staging/ct-001@scan@abc"]
    # a scan folder the index does not list shows up in the storage listing only
    shutil.copytree(bank.local_root / "scans" / "mr-001", bank.local_root / "scans" / "mr-002")
    assert bank.scan_ids_on_storage() == [*bank.scan_ids, "mr-002"]
    import zarr

    group = zarr.open_group(bank.store, path="scans/mr-002", mode="r")
    assert group.attrs["modality"] == "mr"


def test_index_missing_and_index_error(filled: Bank) -> None:
    root = Path(filled.location)
    bank = Bank.open(root)
    assert not bank.index_missing and bank.index_error is None
    text = (root / "index.json").read_text(encoding="utf-8")
    (root / "index.json").unlink()
    bank.refresh()
    assert bank.index_missing and bank.scan_ids == filled.scan_ids
    (root / "index.json").write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(Exception, match="corrupt"):
        bank.refresh()
    bank.refresh(strict=False)
    assert bank.index_error and "corrupt" in bank.index_error and not bank.index_missing
    assert bank.scan_ids == filled.scan_ids  # listed from storage
    (root / "index.json").write_text(text, encoding="utf-8")
    bank.refresh()
    assert bank.index_error is None and json.loads(text)["scans"]
