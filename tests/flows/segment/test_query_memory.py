"""What segmenting a scan is estimated to need, and the refusals that follow from it."""

from __future__ import annotations

import pytest

from maskbank.flows.segment.errors import SegmentError
from maskbank.flows.segment.query import estimate_segment_bytes, segment_bytes_on_grid
from maskbank.flows.segment.run import SegmentOptions, SegmentRun
from maskbank.pipeline.reader import ScanHeader

from .conftest import SPACING


def test_refinement_and_group_size_raise_the_estimate():
    """A zoomed class refined coarse to fine keeps its coarse map and gate during the finer
    pass: more bytes per voxel and task than a plain pass, and the outputs dominate a big
    group."""
    plain = segment_bytes_on_grid(1000, 4)
    refined = segment_bytes_on_grid(1000, 4, refine=True)
    assert refined > plain > segment_bytes_on_grid(1000, 1)
    header = ScanHeader("x.nii.gz", (200, 200, 200), (1.0, 1.0, 1.0), 2, 0, True)
    no = estimate_segment_bytes(header, (1.0,) * 3, 8, 8, False)
    yes = estimate_segment_bytes(header, (1.0,) * 3, 8, 8, False, refine=True)
    assert yes - no == 200**3 * 8 * (refined - plain) // (1000 * 4)


def test_calibration_over_the_budget_is_refused_up_front(tmp_path, tiny_run, phantoms):
    """Calibrating segments each reference like a query: a budget that prepares the
    references but cannot segment them is refused before any work, with what to do."""
    ref = tuple(str(p) for p in phantoms["ref0"])
    query = [str(phantoms["q0"][0])]
    budget = 6_000_000  # prepares the 48x44x36 phantom; its ~10 labels need ~10 MB
    with pytest.raises(SegmentError, match="--threshold fixed") as info:
        SegmentRun(str(tiny_run), query, references=[ref], out=tmp_path / "a",
                   options=SegmentOptions(spacing=SPACING, max_scan_memory=budget))  # fmt: skip
    assert "calibrating the thresholds on reference" in str(info.value)
    fixed = SegmentRun(str(tiny_run), query, references=[ref], out=tmp_path / "b",
                       options=SegmentOptions(spacing=SPACING, max_scan_memory=budget,
                                              threshold="fixed"))  # fmt: skip
    assert fixed.thresholds is None
    roomy = SegmentRun(str(tiny_run), query, references=[ref], out=tmp_path / "c",
                       options=SegmentOptions(spacing=SPACING, max_scan_memory=64_000_000))  # fmt: skip
    assert roomy.thresholds is not None
