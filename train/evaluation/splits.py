"""The fine-tuning split: train / validation / test by scan, per dataset, fixed by a seed.

Splitting by scan (never by crop) keeps every voxel of a test scan out of training
and out of model selection, so the test score is not inflated by neighbouring crops
of the same subject. Each dataset is split on its own (label values mean the same
only within a dataset), with a permutation seeded by the seed and the dataset's
name, so adding a dataset never reshuffles another. Label fractions take a prefix
of the permuted training scans: the 10 % scans are a subset of the 20 % ones, so a
curve over fractions adds labels instead of drawing a new sample at each point.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import EvaluationError

VALIDATION_SHARE = 0.2
TEST_SHARE = 0.2
MIN_SCANS = 3  # one each for train, validation and test


def check_fraction(fraction: float) -> float:
    """A label fraction must lie in (0, 1]."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise EvaluationError(
            f"label fraction {fraction!r} is outside (0, 1]; give shares of the training "
            "scans such as --fractions 0.1,0.2,0.4,1.0"
        )
    return float(fraction)


def _take(n: int, share: float) -> int:
    return max(1, round(share * n))


@dataclass(frozen=True)
class Split:
    """Scan ids of each part, per dataset, in the seeded order (a fraction is a prefix)."""

    seed: int
    train: dict[str, tuple[str, ...]]
    validation: dict[str, tuple[str, ...]]
    test: dict[str, tuple[str, ...]]
    skipped: dict[str, int] = field(default_factory=dict)  # dataset -> its (too few) scans

    @staticmethod
    def _flat(part: dict[str, tuple[str, ...]]) -> list[str]:
        return sorted(s for ids in part.values() for s in ids)

    @property
    def train_ids(self) -> list[str]:
        return self._flat(self.train)

    @property
    def validation_ids(self) -> list[str]:
        return self._flat(self.validation)

    @property
    def test_ids(self) -> list[str]:
        return self._flat(self.test)

    def fraction(self, fraction: float) -> list[str]:
        """``fraction`` of each dataset's training scans (at least one), sorted."""
        fraction = check_fraction(fraction)
        return sorted(s for ids in self.train.values() for s in ids[: _take(len(ids), fraction)])

    def to_dict(self, fractions: Iterable[float] = ()) -> dict:
        """What results.json records: every part's scan ids and each fraction's."""
        return {
            "seed": self.seed,
            "by": "scan, per dataset",
            "shares": {
                "train": round(1 - VALIDATION_SHARE - TEST_SHARE, 6),
                "validation": VALIDATION_SHARE,
                "test": TEST_SHARE,
            },
            "train": self.train_ids,
            "validation": self.validation_ids,
            "test": self.test_ids,
            "skipped_datasets": {
                d: f"{n} labelled scan(s); a split needs >= {MIN_SCANS}"
                for d, n in self.skipped.items()
            },
            "fractions": {f"{f:g}": self.fraction(f) for f in fractions},
        }


def make_split(datasets: dict[str, str] | Sequence[tuple[str, str]], seed: int) -> Split:
    """Split scans (``scan id -> dataset``) about 60/20/20, >= 1 scan per part per dataset."""
    groups: dict[str, list[str]] = defaultdict(list)
    items = datasets.items() if isinstance(datasets, dict) else datasets
    for scan_id, dataset in items:
        groups[dataset].append(scan_id)
    small = {d: len(ids) for d, ids in groups.items() if len(ids) < MIN_SCANS}
    if len(small) == len(groups):
        raise EvaluationError(
            f"fine-tuning splits each dataset by scan into train, validation and test, so "
            f"a dataset needs >= {MIN_SCANS} labelled scans; got {small or 'none'}; add "
            "labelled scans of one dataset"
        )
    for d in small:  # left out (and listed in results.json), the others are split
        del groups[d]
    train, validation, test = {}, {}, {}
    for dataset in sorted(groups):
        ids = sorted(groups[dataset])
        rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(dataset.encode())])
        order = [ids[i] for i in rng.permutation(len(ids))]
        n_test = _take(len(ids), TEST_SHARE)
        n_val = _take(len(ids), VALIDATION_SHARE)
        test[dataset] = tuple(order[:n_test])
        validation[dataset] = tuple(order[n_test : n_test + n_val])
        train[dataset] = tuple(order[n_test + n_val :])
    return Split(seed, train, validation, test, small)
