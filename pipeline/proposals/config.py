"""The proposal engine's options (``ProposalConfig``), apart from the engine.

What a planner needs -- the options' fingerprint, their dict form -- without importing
the engine and its dependencies (torch, torch_geometric: seconds of start-up), so a
command with nothing to do stays fast. ``pipeline.proposals.engine`` re-exports it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from maskbank.pipeline.config import known_keys

#: 2: sizes follow the body; compact + appearance trees.  3: partitions are segment
#: counts per body, cut from shifted seed grids; the coarse ones flooded at half resolution.
PROPOSALS_VERSION = "3"
GENERATORS = ("hierarchy", "supervoxels", "windows")


@dataclass(frozen=True)
class ProposalConfig:
    """Knobs of the proposal engine; saved with the proposals and hashed into a fingerprint.

    Sizes are voxels of the scan's grid or fractions of the body's volume (see
    pipeline.proposals.scaling), so a small body gets as rich a set as a large one.

    Attributes:
        generators: any of ``hierarchy`` (merge-tree nodes over supervoxels),
            ``supervoxels`` (the supervoxels themselves) and ``windows``
            (intensity-band connected components).
        trees: one merge hierarchy per ``(leaf_voxels, compactness,
            spatial_weight)``: supervoxels of that mean size in voxels (their count
            follows the body's volume, clamped to ``leaf_count_range``), flooding
            compactness, and the weight of centroid distance in the merge cost.
            A high spatial weight gives compact nodes (structures the image barely
            outlines: parcels, tracts, lesions within an organ); zero follows
            appearance only (organs, tissue classes).  Trees that share leaves
            reuse them.
        leaf_count_range: fewest and most supervoxels per tree.
        partitions: plain compact supervoxel partitions, ``copies`` of each
            ``(segments, compactness, copies)`` with their seed grids shifted
            against each other (a low-discrepancy sequence of offsets), every
            segment a proposal: blobs of each scale cut at several places, for
            structures no image border outlines (a second cut of one size finds
            more of them than a cut of another size).  ``segments`` is a count
            per body, so a small body (a macaque, a child) is cut as finely,
            relative to its anatomy, as an adult's.
        scales: explicit supervoxel counts per scan, one plain hierarchy each
            (no spatial term); when given they replace ``trees``.
        compactness: flooding compactness of the ``scales`` hierarchies.
        gradient_sigma_mm: Gaussian scale of the gradient that supervoxels follow.
        supervoxel_factor: flood supervoxels on a grid subsampled by this factor
            (2: 8x less flooding, blockier boundaries); 0 = auto: 2 when the body
            has >= 2 M voxels (a body CT at 1.5 mm), else 1.
        coarse_flood_voxels: partitions whose segments average at least this many
            voxels are flooded on a 2x subsampled grid (same proposals for all
            practical purposes, a third fewer stored bytes on noisy CT).
        max_bytes_per_proposal: the stored size a scan's set must fit, per proposal
            (layers + table, as the bank encodes them); a writer that can measure it
            drops the finest cuts of the costliest layers until it fits
            (``pipeline.proposals.budget``).  0 disables.
        boundary_weight: weight of the boundary-gradient term in the merge cost.
        size_exponent: merge cost x (harmonic size of the pair)^size_exponent; larger
            values merge small regions first (balanced trees, more distinct nodes).
        percentiles, coarse_percentiles: two band sets (percentiles inside the
            body) for MR/PET windows, one layer each; CT uses two fixed HU band sets.
        window_smooth_mm: Gaussian smoothing before thresholding.
        split_body_fraction: window components larger than this fraction of the
            body are also split by a distance-transform watershed (0 disables),
            with peaks at least ``split_distance_fraction`` x the body's
            characteristic length (cube root of its volume) apart.
        min_voxels, min_body_fraction: a proposal has at least
            max(min_voxels, min_body_fraction x body voxels) voxels.
        min_volume_mm3: explicit minimum volume per modality in mm^3 (replaces the
            two above when given).
        min_inside_body: minimum fraction of a proposal inside the body mask.
        max_body_fraction: proposals covering more of the body than this are dropped.
        dedup_iou: a proposal whose IoU with a kept one exceeds this is dropped.
        max_proposals: cap per scan after filtering: shares of 16 log-size bins,
            the most stable proposals (longest-lived tree nodes) of each bin first.
        cap_size_exponent: a bin's share is proportional to its size to this power;
            1 gives every scale about the same covered volume (the smallest, most
            numerous fragments go first), 0 the same count.
    """

    generators: tuple[str, ...] = ("hierarchy", "supervoxels", "windows")
    trees: tuple[tuple[float, float, float], ...] = (
        (50.0, 0.3, 10.0),
        (150.0, 0.3, 0.0),
        (150.0, 0.8, 3.0),
    )
    leaf_count_range: tuple[int, int] = (2000, 20000)
    partitions: tuple[tuple[int, float, int], ...] = (
        (2200, 0.8, 3),
        (1100, 0.8, 3),
        (550, 0.8, 3),
        (275, 0.8, 3),
        (110, 0.8, 2),
    )
    scales: tuple[int, ...] = ()
    compactness: float = 0.3
    supervoxel_factor: int = 0
    coarse_flood_voxels: float = 1000.0
    gradient_sigma_mm: float = 1.5
    boundary_weight: float = 1.0
    size_exponent: float = 1.0
    percentiles: tuple[float, ...] = (0, 10, 25, 40, 55, 70, 85, 95, 100)
    coarse_percentiles: tuple[float, ...] = (0, 35, 65, 100)
    window_smooth_mm: float = 1.0
    split_body_fraction: float = 0.005
    split_distance_fraction: float = 0.07
    min_voxels: int = 20
    min_body_fraction: float = 1e-5
    min_volume_mm3: tuple[tuple[str, float], ...] = ()
    min_inside_body: float = 0.9
    max_body_fraction: float = 0.9
    dedup_iou: float = 0.95
    max_proposals: int = 16000
    max_bytes_per_proposal: float = 200.0
    cap_size_exponent: float = 1.0
    version: str = field(default=PROPOSALS_VERSION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "generators", tuple(self.generators))
        object.__setattr__(self, "trees", tuple(tuple(float(v) for v in t) for t in self.trees))
        object.__setattr__(
            self,
            "partitions",
            tuple(
                (int(p[0]), float(p[1]), int(p[2]) if len(p) > 2 else 1) for p in self.partitions
            ),
        )
        object.__setattr__(self, "leaf_count_range", tuple(int(v) for v in self.leaf_count_range))
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        object.__setattr__(
            self, "coarse_percentiles", tuple(float(p) for p in self.coarse_percentiles)
        )
        mv = self.min_volume_mm3
        mv = mv.items() if isinstance(mv, dict) else mv
        object.__setattr__(self, "min_volume_mm3", tuple((str(k), float(v)) for k, v in mv))
        bad = set(self.generators) - set(GENERATORS)
        if bad or not self.generators:
            raise ValueError(f"unknown proposal generators {sorted(bad)}; use {GENERATORS}")
        if any(s < 2 for s in self.scales):
            raise ValueError(f"scales must be >= 2 supervoxels, got {self.scales}")
        if any(len(t) != 3 or t[0] < 1 for t in self.trees):
            raise ValueError(
                f"trees are (leaf_voxels >= 1, compactness, spatial_weight): {self.trees}"
            )
        lo, hi = self.leaf_count_range
        if len(self.leaf_count_range) != 2 or not 2 <= lo <= hi:
            raise ValueError(
                f"leaf_count_range must be (lo, hi) with 2 <= lo <= hi, got {(lo, hi)}"
            )
        if not 0 < self.dedup_iou <= 1 or self.max_proposals < 1 or self.min_voxels < 1:
            raise ValueError("need 0 < dedup_iou <= 1, max_proposals >= 1 and min_voxels >= 1")

    def min_volume(self, modality: str) -> float:
        """The explicit minimum volume (mm^3) for a modality; 0 when none is set."""
        table = dict(self.min_volume_mm3)
        return table.get(modality, table.get("mr", 0.0))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["min_volume_mm3"] = dict(self.min_volume_mm3)
        return d

    # Options older versions recorded with their proposals and this one no longer has:
    # tolerated (and dropped) by ``from_dict``; any other unknown key is refused.
    LEGACY_KEYS = ("split_distance_mm", "split_min_mm3")

    @classmethod
    def from_dict(cls, data: Mapping) -> ProposalConfig:
        """From ``to_dict()``'s form; an unknown key is a ValueError naming the closest one."""
        names = [f.name for f in fields(cls)]
        return cls(**known_keys(data, names, "proposal config", cls.LEGACY_KEYS))

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
