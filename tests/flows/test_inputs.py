"""Input discovery: folders, manifests, ids. Pure file-system work, no Prefect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskbank.flows.inputs import InputError, collect_inputs, parse_spacing, sanitise_id
from maskbank.pipeline.errors import ScanError
from tests.flows.scans import write_dicom_series, write_phantom


def test_folder_pairs_labels_and_recurses(tmp_path: Path) -> None:
    write_phantom(tmp_path / "site-a", "patient 1", seed=1)
    write_phantom(tmp_path / "site-a" / "deeper", "p2", seed=2)
    (tmp_path / "site-a" / "readme.txt").write_text("not a scan")
    scans = collect_inputs([str(tmp_path / "site-a")])
    assert [s.scan_id for s in scans] == ["p2", "patient-1"]
    by_id = {s.scan_id: s for s in scans}
    assert by_id["patient-1"].label.endswith("patient 1_label.nii.gz")
    assert by_id["p2"].label.endswith("p2_label.nii.gz")
    assert {s.dataset for s in scans} == {"site-a"}


def test_duplicate_stems_get_stable_distinct_ids(tmp_path: Path) -> None:
    for site in ("a", "b"):
        write_phantom(tmp_path / site, "ct", seed=0)
    both = collect_inputs([str(tmp_path / "a"), str(tmp_path / "b")], dataset="x")
    ids = [s.scan_id for s in both]
    assert len(set(ids)) == 2 and all(i.startswith("ct-") for i in ids)
    again = collect_inputs([str(tmp_path / "b"), str(tmp_path / "a")], dataset="x")
    assert sorted(ids) == sorted(s.scan_id for s in again)  # order of inputs does not matter


def test_manifests_resolve_relative_paths(tmp_path: Path) -> None:
    img, lab = write_phantom(tmp_path / "data", "liver", seed=3)
    (tmp_path / "m.csv").write_text(
        "image,label,modality,dataset\n"
        f"data/{img.name},data/{lab.name},CT,trial\n"
        "data/missing.nii.gz,,,\n"
    )
    scans = collect_inputs([str(tmp_path / "m.csv")])
    assert scans[0].scan_id == "liver" and scans[0].label == str(lab.resolve())
    assert scans[0].modality == "ct" and scans[0].dataset == "trial"
    # a missing file is kept so that the report can name it, with the manifest's name as dataset
    assert scans[1].scan_id == "missing" and scans[1].dataset == "m"

    (tmp_path / "m.jsonl").write_text(json.dumps({"image": f"data/{img.name}", "id": "A 1"}) + "\n")
    (row,) = collect_inputs([str(tmp_path / "m.jsonl")])
    assert row.scan_id == "A-1" and row.label is None


@pytest.mark.parametrize(
    "content, message",
    [("label\nx.nii\n", "no 'image'"), ("image,modality\nx.nii,xray\n", "modality")],
)
def test_bad_manifest_is_a_usage_error(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(InputError, match=message):
        collect_inputs([str(tmp_path / "m.csv")])


def test_missing_command_line_path_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        collect_inputs([str(tmp_path / "nope")])
    (tmp_path / "empty.csv").write_text("image,label\n")
    with pytest.raises(InputError, match="nothing to prepare"):
        collect_inputs([str(tmp_path / "empty.csv")])


def test_parse_spacing() -> None:
    assert parse_spacing("1.5") == (1.5, 1.5, 1.5)
    assert parse_spacing("1.5,1.5,3") == (1.5, 1.5, 3.0)
    for bad in ("0", "1,2", "a", "-1"):
        with pytest.raises(ValueError):
            parse_spacing(bad)


def test_sanitise_id_is_bank_safe() -> None:
    assert sanitise_id("__sub 01@ses/ct") == "sub-01-ses-ct"
    assert sanitise_id("...") == "scan"


def test_dicom_series_folder_is_one_scan(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "study" / "CT 1.2.3")
    write_phantom(tmp_path / "study", "other")
    scans = collect_inputs([str(tmp_path / "study")])
    assert [s.scan_id for s in scans] == ["CT-1.2.3", "other"]
    assert Path(scans[0].image).is_dir()
    # a series folder given directly is a scan, not a folder to search
    (direct,) = collect_inputs([str(tmp_path / "study" / "CT 1.2.3")])
    assert direct.scan_id == "CT-1.2.3"


def test_same_image_twice(tmp_path: Path) -> None:
    img, lab = write_phantom(tmp_path, "ct")
    # named by a folder and by its own path: one scan
    assert len(collect_inputs([str(tmp_path), str(img)])) == 1
    (tmp_path / "m.csv").write_text(f"image,label\n{img.name},{lab.name}\n{img.name},\n")
    assert len(collect_inputs([str(tmp_path / "m.csv")])) == 1
    (tmp_path / "m.csv").write_text(f"image,label\n{img.name},{lab.name}\n{img.name},{img.name}\n")
    with pytest.raises(InputError, match="listed twice"):
        collect_inputs([str(tmp_path / "m.csv")])


@pytest.mark.parametrize(
    "row, message",
    [
        ({"image": 5}, "line 1: field 'image' must be a string, got int 5"),
        ({"image": "a.nii.gz", "modality": ["ct"]}, "field 'modality' must be a string, got list"),
        ({"image": "a.nii.gz", "scan_id": 7}, "field 'scan_id' must be a string, got int"),
        ({"image": "a.nii.gz", "label": {"p": 1}}, "field 'label' must be a string, got dict"),
    ],
)
def test_jsonl_field_of_the_wrong_type_names_the_manifest(tmp_path: Path, row, message) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(row) + "\n")
    with pytest.raises(ScanError, match=message) as err:
        collect_inputs([str(manifest)])
    assert err.value.path == str(manifest) and isinstance(err.value, InputError)


def test_csv_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    img, _ = write_phantom(tmp_path, "bom")
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbfimage,diagnosis\n" + img.name.encode() + b",x\n")
    (scan,) = collect_inputs([str(tmp_path / "m.csv")])
    assert scan.image == str(img) and scan.metadata == {"diagnosis": "x"}


def test_hashed_ids_carry_no_names(tmp_path: Path) -> None:
    import hashlib

    img, lab = write_phantom(tmp_path / "Smith John", "Smith_John_CT", seed=1)
    write_phantom(tmp_path / "Smith John", "Doe_Jane_CT", seed=2)
    scans = collect_inputs([str(tmp_path / "Smith John")], id_from="hash")
    by_image = {s.image: s for s in scans}
    expected = hashlib.sha256(img.read_bytes()).hexdigest()[:12]
    assert by_image[str(img)].scan_id == expected and by_image[str(img)].label == str(lab)
    assert all("Smith" not in s.scan_id and s.dataset == "default" for s in scans)
    # the same content under another name gets the same id; listed twice it is refused
    copy = tmp_path / "elsewhere" / "renamed.nii.gz"
    copy.parent.mkdir()
    copy.write_bytes(img.read_bytes())
    assert collect_inputs([str(copy)], id_from="hash")[0].scan_id == expected
    with pytest.raises(InputError, match="identical content"):
        collect_inputs([str(copy), str(img)], id_from="hash")
