"""summary() figures from the index, and the Jupyter views."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from maskbank.bank import Bank  # noqa: E402
from maskbank.bank.browse import show_scan  # noqa: E402


def test_summary_numbers(filled: Bank) -> None:
    filled.write_scan("ct-002", {"members_indptr": np.arange(11)}, {}, part="proposals")
    s = filled.summary()
    assert s["scans"] == 3 and s["labelled_scans"] == 2
    assert s["encoding"]["chunk"] == 16 and s["created_at"].endswith("Z")
    assert s["voxels"] == 2 * 72 * 64 * 48 + 40 * 36 * 30
    assert s["bytes"] == sum(r["nbytes"] for r in filled.index) > 0
    assert s["by_modality"]["ct"]["scans"] == 2 and s["by_modality"]["mr"]["voxels"] == 40 * 36 * 30
    assert s["by_dataset"]["brains"]["scans"] == 1
    assert s["by_dataset"]["synthetic"]["bytes"] + s["by_dataset"]["brains"]["bytes"] == s["bytes"]
    p = s["proposals"]
    assert p["scans_with_proposals"] == 1 and p["total"] == 10 and p["per_scan"] == 10.0
    assert p["bytes_per_proposal"] == filled.row("ct-002")["proposals_nbytes"] / 10 > 0


def test_html_views(filled: Bank) -> None:
    page = filled._repr_html_()
    assert page.count("<tr>") == 4 and "mr-001" in page and "3 scans" in page
    scan_page = filled.scan("ct-001")._repr_html_()
    assert "72 × 64 × 48" in scan_page and "label" in scan_page and "source_path" in scan_page


def test_show_scan_draws_three_views_with_overlay(filled: Bank) -> None:
    fig = show_scan(filled, "ct-001", overlay="label")
    axes = fig.axes
    assert [a.get_title().split()[-1] for a in axes] == ["sagittal", "coronal", "axial"]
    assert all(len(a.images) == 2 for a in axes)  # image + overlay
    assert axes[2].images[0].get_array().shape == (64, 72)  # axial: y rows, x columns
    fig2 = show_scan(filled, "mr-001", overlay=None)
    assert all(len(a.images) == 1 for a in fig2.axes)


def test_show_scan_overlays_proposals(filled: Bank) -> None:
    from maskbank.bank.writing import write_proposals
    from maskbank.pipeline.proposals.external import from_label_map
    from maskbank.pipeline.proposals.features import compute_features

    label = filled.scan("ct-001").read("label").astype(np.int32)
    write_proposals(filled, "ct-001", compute_features(from_label_map(label, "expert"), None, None))
    fig = show_scan(filled, "ct-001", overlay=[0, 1])
    axial = fig.axes[2].images[1].get_array()  # overlay of slice z = 24: label 3 in x 20..40
    assert axial.count() > 0 and set(np.unique(axial.compressed())) <= {1, 2}
    assert "proposals:" in filled.scan("ct-001")._repr_html_()
