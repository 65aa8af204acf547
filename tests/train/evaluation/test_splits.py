"""The fine-tuning split: by scan, per dataset, seeded, nested fractions, no leaks."""

from __future__ import annotations

import pytest

from maskbank.train.evaluation.errors import EvaluationError
from maskbank.train.evaluation.splits import check_fraction, make_split

FRACTIONS = (0.05, 0.1, 0.2, 0.4, 0.5, 0.7, 1.0)


def _scans(sizes: dict[str, int]) -> dict[str, str]:
    return {f"{d}-{i:03d}": d for d, n in sizes.items() for i in range(n)}


@pytest.mark.parametrize("sizes", [{"a": 3}, {"a": 4}, {"a": 7, "b": 3}, {"a": 50, "b": 11}])
def test_no_test_or_validation_scan_ever_trains(sizes: dict[str, int]) -> None:
    scans = _scans(sizes)
    for seed in range(40):
        split = make_split(scans, seed)
        train, val, test = set(split.train_ids), set(split.validation_ids), set(split.test_ids)
        assert not train & val and not train & test and not val & test
        assert train | val | test == set(scans)
        for dataset, n in sizes.items():
            assert len(split.validation[dataset]) >= 1 and len(split.test[dataset]) >= 1
            assert len(split.train[dataset]) >= 1
            assert abs(len(split.test[dataset]) - 0.2 * n) <= 1
        previous: set[str] = set()
        for f in FRACTIONS:
            ids = set(split.fraction(f))
            assert ids <= train, "a fraction reached outside the training scans"
            assert previous <= ids, "fractions are not nested"
            for dataset in sizes:  # every dataset keeps at least one training scan
                assert any(scans[s] == dataset for s in ids)
            previous = ids
        assert set(split.fraction(1.0)) == train
        recorded = split.to_dict(FRACTIONS)
        assert set(recorded["test"]) == test and set(recorded["validation"]) == val
        assert all(set(v) <= train for v in recorded["fractions"].values())


def test_split_is_seeded_and_per_dataset() -> None:
    scans = _scans({"a": 20, "b": 10})
    assert make_split(scans, 3) == make_split(dict(reversed(list(scans.items()))), 3)
    assert {make_split(scans, s).test["a"] for s in range(10)} != {make_split(scans, 0).test["a"]}
    # Adding a dataset never reshuffles another.
    alone = make_split(_scans({"a": 20}), 3)
    assert alone.test["a"] == make_split(scans, 3).test["a"]


def test_too_few_scans_and_bad_fractions_are_clear_errors() -> None:
    with pytest.raises(EvaluationError, match=r">= 3 labelled scans.*'b': 2"):
        make_split(_scans({"b": 2}), 0)
    # A dataset too small to split is left out and listed; the others are split.
    split = make_split(_scans({"a": 5, "b": 2}), 0)
    assert split.skipped == {"b": 2} and set(split.train) == {"a"}
    assert "b" not in "".join(split.train_ids + split.validation_ids + split.test_ids)
    assert "b" in split.to_dict()["skipped_datasets"]
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(EvaluationError, match=r"outside \(0, 1\]"):
            check_fraction(bad)


def test_a_subject_is_never_split_between_parts() -> None:
    scans = _scans({"a": 30})
    subjects = {s: f"p{i // 3}" for i, s in enumerate(sorted(scans))}  # 10 subjects of 3
    for seed in range(20):
        split = make_split(scans, seed, subjects)
        parts = [split.train_ids, split.validation_ids, split.test_ids]
        owners = [{subjects[s] for s in ids} for ids in parts]
        assert not owners[0] & owners[1] and not owners[0] & owners[2]
        assert not owners[1] & owners[2]
        assert len(owners[2]) == 2 and len(split.test_ids) == 6  # 20 % of 10 subjects
        for f in (0.1, 0.5):
            ids = split.fraction(f)
            assert len(ids) % 3 == 0 and {subjects[s] for s in ids} <= owners[0]
        assert split.to_dict()["by"] == "subject, per dataset"
    # Without subjects (or one subject per scan) the split is the per-scan one.
    own = {s: s for s in scans}
    assert make_split(scans, 4, own).test == make_split(scans, 4).test
    with pytest.raises(EvaluationError, match="distinct subjects"):
        make_split(scans, 0, {s: "one" for s in scans})
