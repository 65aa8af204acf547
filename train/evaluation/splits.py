"""The fine-tuning split: train / validation / test by subject, per dataset, fixed by a seed.

The unit of the split is the subject: scans that share a ``subject`` (the scan
metadata of that name, e.g. follow-ups or several sequences of one patient) always
land in the same part, so no test subject is seen in training or model selection.
Scans without a subject are their own subject, so a bank without the column is split
by scan. Splitting by scan (never by crop) keeps every voxel of a test scan out of
training; it does not protect against two scans of one person unless the manifest
says so with a ``subject`` column.

Each dataset is split on its own (label values mean the same only within a dataset),
with a permutation of its subjects seeded by the seed and the dataset's name, so
adding a dataset never reshuffles another. Label fractions take a prefix of the
permuted training subjects: the 10 % scans are a subset of the 20 % ones, so a curve
over fractions adds labels instead of drawing a new sample at each point.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from maskbank.train.seeding import numpy_rng

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
    subjects: dict[str, str] = field(default_factory=dict)  # scan -> subject (when given)

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
        """``fraction`` of each dataset's training subjects (at least one), their scans sorted."""
        fraction = check_fraction(fraction)
        out = []
        for ids in self.train.values():
            order = list(dict.fromkeys(self.subjects.get(s, s) for s in ids))
            keep = set(order[: _take(len(order), fraction)])
            out += [s for s in ids if self.subjects.get(s, s) in keep]
        return sorted(out)

    def to_dict(self, fractions: Iterable[float] = ()) -> dict:
        """What results.json records: every part's scan ids and each fraction's."""
        return {
            "seed": self.seed,
            "by": "subject, per dataset" if self.subjects else "scan, per dataset",
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


def make_split(
    datasets: dict[str, str] | Sequence[tuple[str, str]],
    seed: int,
    subjects: dict[str, str] | None = None,
) -> Split:
    """Split scans (``scan id -> dataset``) about 60/20/20 by subject, >= 1 per part per dataset.

    ``subjects`` (``scan id -> subject``, e.g. from ``LabelledScan.subject``) keeps each
    subject's scans in one part; without it (or for scans it omits) each scan is its own
    subject. Shares and the minimum of 3 count subjects.
    """
    subjects = {k: str(v) for k, v in (subjects or {}).items()}
    groups: dict[str, list[str]] = defaultdict(list)
    items = datasets.items() if isinstance(datasets, dict) else datasets
    for scan_id, dataset in items:
        groups[dataset].append(scan_id)

    def subject_of(scan: str) -> str:
        return subjects.get(scan, scan)

    units = {d: sorted({subject_of(s) for s in ids}) for d, ids in groups.items()}
    small = {d: len(ids) for d, ids in groups.items() if len(units[d]) < MIN_SCANS}
    if len(small) == len(groups):
        raise EvaluationError(
            f"fine-tuning splits each dataset by subject into train, validation and test, so "
            f"a dataset needs >= {MIN_SCANS} labelled scans of distinct subjects; got "
            f"{small or 'none'}; add labelled scans of one dataset"
        )
    for d in small:  # left out (and listed in results.json), the others are split
        del groups[d]
    train, validation, test = {}, {}, {}
    for dataset in sorted(groups):
        subs = units[dataset]
        rng = numpy_rng(seed, dataset)
        order = [subs[i] for i in rng.permutation(len(subs))]
        n_test = _take(len(subs), TEST_SHARE)
        n_val = _take(len(subs), VALIDATION_SHARE)
        rank = {sub: i for i, sub in enumerate(order)}
        scans = sorted(groups[dataset], key=lambda s: (rank[subject_of(s)], s))

        def part(lo: int, hi: int, scans: list[str] = scans, rank: dict = rank) -> tuple:
            return tuple(s for s in scans if lo <= rank[subject_of(s)] < hi)

        test[dataset] = part(0, n_test)
        validation[dataset] = part(n_test, n_test + n_val)
        train[dataset] = part(n_test + n_val, len(subs))
    used = {s for ids in groups.values() for s in ids}
    return Split(
        seed, train, validation, test, small, {s: v for s, v in subjects.items() if s in used}
    )
