"""Single-scale SLIC as a baseline proposal set (every segment is one proposal).

Used by ``maskbank proposals-quality --baseline slic`` and the benchmarks, so
the engine is always compared with the plain method on the same grid and body.
"""

from __future__ import annotations

import numpy as np

from maskbank.pipeline.proposals.external import from_label_map
from maskbank.pipeline.proposals.proposal_set import ProposalSet

#: SLIC's distance weight for images z-scored inside the body (tissue contrast ~1).
SLIC_COMPACTNESS = 0.1


def parse_baseline(text: str | None) -> tuple[str, int] | None:
    """``slic`` -> ("slic", 2000); ``slic:5000`` -> ("slic", 5000); None/"" -> None."""
    if not text:
        return None
    name, _, n = text.partition(":")
    if name != "slic":
        raise ValueError(f"unknown baseline {text!r}; use slic or slic:N")
    try:
        segments = int(n) if n else 2000
    except ValueError:
        raise ValueError(f"baseline {text!r}: N must be an integer") from None
    if segments < 2:
        raise ValueError(f"baseline {text!r}: N must be >= 2")
    return name, segments


def slic_proposals(
    image: np.ndarray,
    body: np.ndarray,
    spacing,
    n_segments: int = 2000,
    compactness: float = SLIC_COMPACTNESS,
) -> ProposalSet:
    """skimage SLIC with ``n_segments`` inside ``body``; each segment is a proposal."""
    from skimage.segmentation import slic

    body = np.asarray(body, bool)
    if not body.any():
        return ProposalSet.empty(body.shape)
    img = np.asarray(image, np.float32)
    seg = slic(
        img,
        n_segments=n_segments,
        compactness=compactness,
        channel_axis=None,
        spacing=tuple(float(s) for s in spacing),
        mask=body,
        start_label=1,
    )
    return from_label_map(seg.astype(np.int32), source="slic")
