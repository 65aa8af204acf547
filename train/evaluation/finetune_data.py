"""What fine-tuning reads: labelled scans by phase (logged), and the training crops.

``ScanAccess`` logs every read under the phase that made it (``init``, ``train``,
``validation``, ``test``), so a test can prove that test scans never reach training or
selection. ``CropSampler`` draws ``crop``^3 training crops that depend only on (seed,
split seed, fraction, step): half centred near a random labelled voxel (nnU-Net's
foreground oversampling), random flips, and classes of another dataset masked out of
the loss (their labels are unknown there, not absent).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from maskbank.train.seeding import numpy_rng

from .structures import LabelledScan, StructureClass, centred_crop

PHASES = ("init", "train", "validation", "test")
MAX_FG_VOXELS = 20_000  # foreground voxels kept per (scan, class) to draw crop centres from


class ScanAccess:
    """The labelled scans by id; every read is logged under the phase that made it.

    ``counts`` tells how often each phase read (a test scan read once per test scan
    means the test was scored once, not once per learning rate).
    """

    def __init__(self, scans: Sequence[LabelledScan]) -> None:
        self._scans = {s.scan_id: s for s in scans}
        self.reads: dict[str, set[str]] = defaultdict(set)
        self.counts: dict[str, int] = defaultdict(int)

    def get(self, phase: str, scan_id: str) -> LabelledScan:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.reads[phase].add(scan_id)
        self.counts[phase] += 1
        return self._scans[scan_id]

    def clear(self) -> None:
        self.reads.clear()
        self.counts.clear()

    def dataset(self, scan_id: str) -> str:
        return self._scans[scan_id].dataset  # an attribute, not the scan's voxels

    def snapshot(self) -> dict[str, list[str]]:
        return {p: sorted(self.reads.get(p, ())) for p in PHASES}


class CropSampler:
    """Training crops that depend only on (seed, fraction, step): the same for every network."""

    def __init__(
        self,
        classes: Sequence[StructureClass],
        train_ids: Sequence[str],
        access: ScanAccess,
        crop: int,
        fg_share: float,
        seed: int,
    ) -> None:
        self.classes = list(classes)
        self.train_ids = list(train_ids)
        self.access = access
        self.crop = crop
        self.fg_share = fg_share
        self.seed = seed
        self._fg: dict[tuple[str, int], np.ndarray] = {}

    def _foreground(self, scan: LabelledScan, value: int) -> np.ndarray:
        """Up to MAX_FG_VOXELS labelled voxels (a fixed subsample: memory stays bounded)."""
        key = (scan.scan_id, value)
        if key not in self._fg:
            idx = np.argwhere(scan.label == value)
            if len(idx) > MAX_FG_VOXELS:
                pick = numpy_rng(f"{key}").choice(len(idx), MAX_FG_VOXELS, replace=False)
                idx = idx[pick]
            self._fg[key] = idx
        return self._fg[key]

    def batch(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        """image (B,1,S,S,S), target (B,K,S,S,S) float, valid (B,K) bool."""
        rng = numpy_rng(self.seed, step)
        s, k = self.crop, len(self.classes)
        images = np.empty((batch_size, 1, s, s, s), np.float32)
        targets = np.zeros((batch_size, k, s, s, s), np.float32)
        valid = np.zeros((batch_size, k), bool)
        for b in range(batch_size):
            scan = self.access.get("train", self.train_ids[rng.integers(len(self.train_ids))])
            mine = [i for i, c in enumerate(self.classes) if c.dataset == scan.dataset]
            present = [i for i in mine if scan.counts.get(self.classes[i].value, 0)]
            shape = np.array(scan.image.shape)
            if present and rng.random() < self.fg_share:
                cls = self.classes[present[rng.integers(len(present))]]
                fg = self._foreground(scan, cls.value)
                jitter = rng.integers(-(s // 4), s // 4 + 1, size=3)
                centre = np.clip(fg[rng.integers(len(fg))] + jitter, 0, shape - 1)
            else:
                centre = rng.integers(0, shape)
            centre_t = tuple(int(c) for c in centre)
            image = centred_crop(scan.image, centre_t, s, float(scan.image.min()))
            label = centred_crop(scan.label, centre_t, s, 0)
            flips = tuple(a for a in range(3) if rng.random() < 0.5)
            if flips:
                image, label = np.flip(image, flips), np.flip(label, flips)
            images[b, 0] = image
            for i in mine:
                targets[b, i] = label == self.classes[i].value
                valid[b, i] = True
        return {
            "image": torch.from_numpy(images),
            "target": torch.from_numpy(targets),
            "valid": torch.from_numpy(valid),
        }
