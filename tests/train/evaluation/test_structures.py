"""Label names: classes are values; names that disagree are found at prepare and evaluate."""

from __future__ import annotations

from maskbank.flows.prepare import label_name_conflicts
from maskbank.pipeline.label_names import name_conflicts
from tests.train.evaluation.conftest import write_labelled_phantoms


def test_name_conflicts_in_either_direction():
    scans = [
        ("a", "ds", {1: "liver", 2: "spleen"}),
        ("b", "ds", {1: "hepar", 2: "spleen"}),
        ("c", "ds", {3: "spleen"}),
        ("d", "other", {1: "spleen"}),  # another dataset may use the name for its own value
    ]
    found = name_conflicts(scans)
    assert found == [
        "dataset 'ds': value 1 is named 'hepar' in b; 'liver' in a",
        "dataset 'ds': name 'spleen' is given to values 2 in a, b; 3 in c",
    ]
    assert name_conflicts(scans[:1] + scans[3:]) == []


def test_prepare_finds_the_conflicts_of_a_bank(tmp_path):
    def rename(seed: int, arrays: dict, attrs: dict) -> None:
        if seed == 1:
            attrs["label_names"]["3"] = "hepar"

    clean = write_labelled_phantoms(tmp_path / "clean", n=2)
    assert label_name_conflicts(clean, {"phantom-ct"}) == []
    bank = write_labelled_phantoms(tmp_path / "b", n=3, edit=rename)
    found = label_name_conflicts(bank, {"phantom-ct"})
    assert found == [
        "dataset 'phantom-ct': value 3 is named 'hepar' in ct-01; 'liver' in ct-00, ct-02"
    ]
    assert label_name_conflicts(bank, {"another"}) == []  # only the datasets written to
