"""Names of label values from the sidecar files people already have.

Evaluation needs to say "liver", not "label 3", and label maps come with their
names in one of a few common files. The format is detected from the content so a
user never has to say which one it is:

* JSON ``{"1": "liver", ...}`` (``.json``, or any file starting with ``{``);
* ITK-SNAP label descriptions: ``IDX R G B A VIS MSH "LABEL"`` (the quoted name);
* FreeSurfer colour LUTs and 3D Slicer colour tables (``.ctbl``/``.txt``):
  ``value name r g b a``, the same columns in both.

``#`` starts a comment in the text formats. A malformed file raises `ScanError`
naming the file and line, so a prepare run reports it with the scan it belongs to.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from os import PathLike
from pathlib import Path

import numpy as np

from maskbank.pipeline.errors import ScanError

_ITKSNAP = re.compile(
    r"^(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.eE+-]+)\s+(\d+)\s+(\d+)\s+\"(.*)\"\s*$"
)
_INT = re.compile(r"^[+-]?\d+$")


def read_label_names(path: str | PathLike[str]) -> dict[int, str]:
    """``{value: name}`` from a JSON, ITK-SNAP, FreeSurfer LUT or Slicer colour table file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ScanError(path, "label names file not found") from None
    except UnicodeDecodeError as exc:
        raise ScanError(path, f"label names file is not UTF-8 text ({exc.reason})") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        names = _parse_json(path, text)
    else:
        lines = [
            (n, line.split("#", 1)[0].strip() if '"' not in line else line.strip())
            for n, line in enumerate(text.splitlines(), start=1)
        ]
        lines = [(n, s) for n, s in lines if s and not s.startswith("#")]
        itksnap = any('"' in s for _, s in lines)
        names = {}
        where: dict[int, int] = {}
        for n, s in lines:
            value, name = _parse_itksnap(path, n, s) if itksnap else _parse_colour_table(path, n, s)
            if value in where and names[value] != name:
                raise ScanError(
                    path,
                    f"line {n}: value {value} already named {names[value]!r} on line "
                    f"{where[value]}; give each value one name",
                )
            names[value], where[value] = name, n
    if not names:
        raise ScanError(path, "no label names found (expected JSON, ITK-SNAP or a colour table)")
    return names


def names_present(names: dict[int, str], label: np.ndarray) -> dict[str, str]:
    """The names of the non-zero values that occur in ``label``, keyed by the value as text.

    A FreeSurfer LUT names thousands of values; a scan stores only its own classes.
    Background (0) is not a class, so it is never stored.
    """
    counts = np.bincount(label.ravel()) if label.size else np.zeros(1, np.int64)
    return {str(v): names[v] for v in sorted(names) if 0 < v < len(counts) and counts[v]}


def _parse_json(path: Path, text: str) -> dict[int, str]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScanError(path, f"line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise ScanError(path, 'expected a JSON object {"<value>": "<name>", ...}')
    names = {}
    for key, name in raw.items():
        if not _INT.match(str(key).strip()) or int(key) < 0:
            raise ScanError(path, f"key {key!r} is not a non-negative integer label value")
        if not isinstance(name, str) or not name.strip():
            raise ScanError(path, f"value {key}: the name must be a non-empty string")
        names[int(key)] = name.strip()
    return names


def _parse_itksnap(path: Path, n: int, line: str) -> tuple[int, str]:
    m = _ITKSNAP.match(line)
    if m is None or not m.group(8).strip():
        raise ScanError(
            path, f'line {n}: expected ITK-SNAP columns IDX R G B A VIS MSH "LABEL", got {line!r}'
        )
    return int(m.group(1)), m.group(8).strip()


def _parse_colour_table(path: Path, n: int, line: str) -> tuple[int, str]:
    """``value name r g b a`` (FreeSurfer, Slicer); a name with spaces keeps them."""
    fields = line.split()
    colours = 4 if len(fields) >= 6 else 3
    if (
        len(fields) < 5
        or not _INT.match(fields[0])
        or int(fields[0]) < 0
        or not all(_INT.match(f) for f in fields[-colours:])
    ):
        raise ScanError(
            path, f"line {n}: expected colour table columns 'value name r g b a', got {line!r}"
        )
    return int(fields[0]), " ".join(fields[1:-colours])


def name_conflicts(scans: Iterable[tuple[str, str, dict[int, str]]]) -> list[str]:
    """Where stored names would merge or split structures, one message each.

    ``scans`` holds ``(scan id, dataset, {value: name})``. Label values mean the same only
    within a dataset, so a value named differently in two of its scans, or one name given
    to two values, makes "liver" ambiguous. The evaluation keys classes by value and
    refuses such a bank unless a names file settles it; prepare warns early.
    """
    by_value: dict[tuple[str, int], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    by_name: dict[tuple[str, str], dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for scan_id, dataset, names in scans:
        for value, name in (names or {}).items():
            by_value[(dataset, int(value))][str(name)].append(scan_id)
            by_name[(dataset, str(name))][int(value)].append(scan_id)

    def few(ids: list[str]) -> str:
        ids = sorted(set(ids))
        return ", ".join(ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")

    out = []
    for (dataset, value), names in sorted(by_value.items()):
        if len(names) > 1:
            listed = "; ".join(f"{n!r} in {few(ids)}" for n, ids in sorted(names.items()))
            out.append(f"dataset {dataset!r}: value {value} is named {listed}")
    for (dataset, name), values in sorted(by_name.items()):
        if len(values) > 1:
            listed = "; ".join(f"{v} in {few(ids)}" for v, ids in sorted(values.items()))
            out.append(f"dataset {dataset!r}: name {name!r} is given to values {listed}")
    return out
