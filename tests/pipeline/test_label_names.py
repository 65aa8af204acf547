"""Label names from the sidecar formats people have: JSON, ITK-SNAP, FreeSurfer LUT, Slicer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.label_names import names_present, read_label_names

ITKSNAP = """\
################################################
# ITK-SnAP Label Description File
# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
#    LABEL: Label description "in quotes"
################################################
    0     0    0    0        0  0  0    "Clear Label"
    1   255    0    0        1  1  1    "Liver"
    2     0  255    0        1  1  1    "Left kidney # 2"
   12     0    0  255      0.5  1  0    "Tumour"
"""

FREESURFER = """\
#$Id: FreeSurferColorLUT.txt,v 1.105 2015/07/29 18:18:06 greve Exp $

#No. Label Name:                            R   G   B   A

0   Unknown                                 0   0   0   0
17  Left-Hippocampus                        220 216 20  0
53  Right-Hippocampus                       220 216 20  0   # trailing comment
1000    ctx-lh-unknown                      25  5   25  0
"""

SLICER = """\
# Color table file /tmp/GenericAnatomyColors.ctbl
# 4 values
0 background 0 0 0 0
1 tissue 128 174 128 255
2 white matter 250 250 225 255
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_json(tmp_path: Path) -> None:
    path = _write(tmp_path, "names.json", '{"1": "liver", "2": " spleen ", "17": "aorta"}')
    assert read_label_names(path) == {1: "liver", 2: "spleen", 17: "aorta"}


@pytest.mark.realdata
def test_json_shipped_with_the_real_atlas(shared_data: Path) -> None:
    names = read_label_names(shared_data / "mr_brain_mni152_jhu_wm_labels_1mm.json")
    assert len(names) == 48 and all(isinstance(v, str) and v for v in names.values())


def test_itksnap(tmp_path: Path) -> None:
    names = read_label_names(_write(tmp_path, "labels.txt", ITKSNAP))
    assert names == {0: "Clear Label", 1: "Liver", 2: "Left kidney # 2", 12: "Tumour"}


def test_freesurfer_lut(tmp_path: Path) -> None:
    names = read_label_names(_write(tmp_path, "FreeSurferColorLUT.txt", FREESURFER))
    assert names == {
        0: "Unknown",
        17: "Left-Hippocampus",
        53: "Right-Hippocampus",
        1000: "ctx-lh-unknown",
    }


def test_slicer_colour_table_keeps_spaces_in_names(tmp_path: Path) -> None:
    names = read_label_names(_write(tmp_path, "anatomy.ctbl", SLICER))
    assert names == {0: "background", 1: "tissue", 2: "white matter"}


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("bad.txt", FREESURFER.replace("17  Left", "17x  Left"), "line 6"),
        ("bad.ctbl", SLICER + "3 muscle 12 40\n", "line 6"),
        ("bad.txt", ITKSNAP + '   13  1 2 3 1 1 ""\n', "line 10"),
        ("bad.txt", ITKSNAP + '   13  1 2 "Bone"\n', "line 10"),
        ("bad.txt", SLICER + "1 fat 0 0 0 255\n", "line 6"),  # value 1 named twice
        ("bad.json", '{"1": "liver",\n "2": }', "line 2"),
        ("bad.json", '{"liver": 1}', "'liver'"),
        ("empty.txt", "# nothing but a comment\n", "no label names"),
    ],
)
def test_malformed_file_names_file_and_line(
    tmp_path: Path, name: str, text: str, where: str
) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(ScanError) as err:
        read_label_names(path)
    assert err.value.path == str(path) and where in err.value.reason


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ScanError, match="not found"):
        read_label_names(tmp_path / "nope.json")


def test_names_present_keeps_only_the_scans_own_classes() -> None:
    label = np.zeros((4, 4, 4), np.uint16)
    label[0, 0, :2] = 17
    label[1, 1, 1] = 99  # unnamed value: simply has no name
    lut = {0: "Unknown", 17: "Left-Hippocampus", 53: "Right-Hippocampus", 2000: "ctx"}
    assert names_present(lut, label) == {"17": "Left-Hippocampus"}
