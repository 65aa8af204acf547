"""Turn command-line inputs (files, folders, manifests) into a list of scans to prepare.

Discovery happens once, in the flow's process, so every scan gets a stable,
readable id before any work is distributed: the same inputs always map to the
same bank entries, which is what makes re-runs skip finished work.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.reader import is_dicom_dir, sha256_of

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
# A file whose stem ends like this is a label map, not a scan (folder discovery only).
LABEL_MARKERS = ("_label", "_labels", "_seg", "_segmentation", "_mask")
MODALITIES = ("auto", "ct", "mr", "pet")
# Manifest columns with a meaning of their own; any other column is scan metadata.
RESERVED_COLUMNS = ("image", "label", "modality", "dataset", "scan_id", "id", "label_names")
# --id-from hash: ids are this many hex digits of the source's SHA-256 (48 bits), more
# where two different sources share a prefix.
HASH_ID_LENGTH = 12


class InputError(ValueError):
    """The inputs themselves are unusable (bad manifest, nothing found): a usage error."""


class ManifestError(InputError, ScanError):
    """A manifest that cannot be read as written: names the manifest file and the problem."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        ScanError.__init__(self, path, reason)


@dataclass(frozen=True)
class ScanInput:
    """One scan to prepare; JSON-able so it can travel to Dask workers and deployments."""

    scan_id: str
    image: str
    label: str | None = None
    modality: str | None = None  # None: use the run's configured modality
    dataset: str | None = None
    label_names: str | None = None  # names file of the label's values (pipeline.label_names)
    metadata: dict[str, str] | None = None  # the manifest's other columns, e.g. a diagnosis

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScanInput:
        keys = ("scan_id", "image", "label", "modality", "dataset", "label_names", "metadata")
        return cls(**{k: d.get(k) for k in keys})


def image_stem(path: str | os.PathLike) -> str:
    """File name without its (possibly double) image suffix; folder name for a DICOM dir."""
    name = Path(path).name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES + MANIFEST_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def sanitise_id(text: str) -> str:
    """Keep ids readable but safe as Zarr group names and file names."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    cleaned = re.sub(r"^[^A-Za-z0-9]+", "", cleaned)[:180].rstrip("-._")
    return cleaned or "scan"


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def _is_label_name(path: Path) -> bool:
    stem = image_stem(path).lower()
    return any(stem.endswith(m) or f"{m}_" in stem or f"{m}-" in stem for m in LABEL_MARKERS)


def discover_folder(folder: Path, dataset: str | None) -> list[dict]:
    """Image files and DICOM series below `folder`; label files are paired with their scan.

    A file named like `<scan-stem>_label.nii.gz` (or `_seg`, `_mask`, ...) next to a
    scan becomes that scan's label (the longest matching stem wins); an orphan label
    file is ignored rather than prepared as if it were a scan.
    """
    images: list[Path] = []
    labels: list[Path] = []
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs.sort()
        dicom_children = [d for d in dirs if is_dicom_dir(root_path / d)]
        images.extend(root_path / d for d in dicom_children)
        dirs[:] = [d for d in dirs if d not in dicom_children and not d.startswith(".")]
        for name in sorted(files):
            path = root_path / name
            if not is_image_file(path):
                continue
            (labels if _is_label_name(path) else images).append(path)
    rows = []
    by_stem: dict[tuple[Path, str], dict] = {}  # (folder, stem) -> row: no scan of all rows
    for img in images:
        row = {"image": str(img), "label": None, "modality": None, "dataset": dataset}
        rows.append(row)
        by_stem.setdefault((img.parent, image_stem(img)), row)
    for lab in labels:
        lab_stem = image_stem(lab)
        # the scans whose stem + "_" starts the label's stem, longest first
        cuts = [i for i, ch in enumerate(lab_stem) if ch == "_"]
        for cut in reversed(cuts):
            best = by_stem.get((lab.parent, lab_stem[:cut]))
            if best is not None:
                if best["label"] is None:
                    best["label"] = str(lab)
                break
    return rows


def read_manifest(path: Path, dataset: str | None) -> list[dict]:
    """Rows of a .csv (with header) or .jsonl manifest; relative paths are manifest-relative.

    Columns other than `RESERVED_COLUMNS` become the scan's metadata (values as
    strings, empty cells left out).
    """
    base = path.parent
    raw: list[tuple[str, dict]] = []
    try:
        if path.suffix.lower() == ".csv":
            # utf-8-sig: spreadsheet exports start with a byte-order mark, which would
            # otherwise become part of the first column's name ("\ufeffimage").
            with open(path, newline="", encoding="utf-8-sig") as fh:
                raw = [(f"row {n}", dict(r)) for n, r in enumerate(csv.DictReader(fh), start=1)]
        else:
            with open(path, encoding="utf-8-sig") as fh:
                for n, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ManifestError(path, f"line {n}: not a JSON object ({exc})") from exc
                    if not isinstance(row, dict):
                        raise ManifestError(path, f"line {n}: expected a JSON object per line")
                    raw.append((f"line {n}", row))
    except UnicodeDecodeError as exc:
        raise ManifestError(path, f"not UTF-8 text ({exc}); save the manifest as UTF-8") from exc
    rows = []
    for where, row in raw:
        for key in RESERVED_COLUMNS:
            value = row.get(key)
            if value is not None and not isinstance(value, str):
                raise ManifestError(
                    path,
                    f"{where}: field {key!r} must be a string, got {type(value).__name__} "
                    f"{json.dumps(value)[:60]}",
                )
        image = (row.get("image") or "").strip()
        if not image:
            raise ManifestError(path, f"{where} has no 'image' column/value")

        def resolve(p: str | None) -> str | None:
            if p is None or not str(p).strip():
                return None
            q = Path(str(p).strip()).expanduser()
            return str(q if q.is_absolute() else (base / q))

        modality = (row.get("modality") or "").strip().lower() or None
        if modality is not None and modality not in MODALITIES:
            raise ManifestError(path, f"{where}: modality {modality!r} not one of {MODALITIES}")
        rows.append(
            {
                "image": resolve(image),
                "label": resolve(row.get("label")),
                "modality": None if modality == "auto" else modality,
                "dataset": (row.get("dataset") or "").strip() or dataset,
                "scan_id": (row.get("scan_id") or row.get("id") or "").strip() or None,
                "label_names": resolve(row.get("label_names")),
                "metadata": _metadata(row),
            }
        )
    return rows


def _metadata(row: dict) -> dict[str, str]:
    out = {}
    for key, value in row.items():
        if key is None or key in RESERVED_COLUMNS or value is None:
            continue  # key None: a CSV row with more cells than the header
        text = value if isinstance(value, str) else json.dumps(value)
        if text.strip():
            out[str(key).strip()] = text.strip()
    return out


def _default_dataset(path: Path) -> str:
    return sanitise_id(path.name if path.is_dir() else path.parent.name or "default")


def collect_inputs(
    inputs: list[str],
    dataset: str | None = None,
    label_names: str | None = None,
    id_from: str = "name",
) -> list[ScanInput]:
    """Expand files, folders and manifests into uniquely named scans, in a stable order.

    ``id_from="hash"``: ids are hashes of the sources' content (`assign_hash_ids`) and
    the default dataset is ``default`` instead of a folder's or manifest's name, so no
    file or folder name (where patient identifiers hide) reaches the bank's ids.

    Missing files named in a manifest are kept (they fail in the report, with their
    row, instead of aborting the batch); a missing command-line path is a usage error.
    `label_names` (a names file) applies to every labelled scan whose manifest row
    names none.
    """
    if id_from not in ("name", "hash"):
        raise InputError(f"id_from must be 'name' or 'hash', got {id_from!r}")
    hashed = id_from == "hash"
    rows: list[dict] = []
    for item in inputs:
        path = Path(item).expanduser()
        lower = path.name.lower()
        if lower.endswith(MANIFEST_SUFFIXES) and path.is_file():
            default = "default" if hashed else sanitise_id(image_stem(path))
            rows.extend(read_manifest(path, dataset or default))
        elif path.is_dir() and not is_dicom_dir(path):
            found = discover_folder(
                path, dataset or ("default" if hashed else _default_dataset(path))
            )
            if not found:
                raise InputError(f"{path}: no scans found (looked for {', '.join(IMAGE_SUFFIXES)})")
            rows.extend(found)
        elif path.exists():
            rows.append(
                {
                    "image": str(path),
                    "label": None,
                    "modality": None,
                    "dataset": dataset or ("default" if hashed else _default_dataset(path)),
                }
            )
        else:
            raise InputError(f"{path}: no such file or folder")
    for r in rows:
        r["image"] = os.path.abspath(r["image"])
        if r.get("label"):
            r["label"] = os.path.abspath(r["label"])
            r["label_names"] = r.get("label_names") or label_names
        if r.get("label_names"):
            r["label_names"] = os.path.abspath(os.path.expanduser(r["label_names"]))
    # The same file named twice (e.g. a folder and a file inside it) is one scan.
    unique: dict[str, dict] = {}
    for r in rows:
        first = unique.setdefault(r["image"], r)
        if first is not r and any(
            r.get(k) and r.get(k) != first.get(k)
            for k in ("label", "modality", "scan_id", "label_names", "metadata")
        ):
            raise InputError(
                f"{r['image']} is listed twice with different label/modality/scan_id/"
                "label_names/metadata; "
                "list each scan once"
            )
    rows = sorted(unique.values(), key=lambda r: r["image"])
    if not rows:
        raise InputError(f"nothing to prepare in {', '.join(inputs) or 'no inputs'}")
    return assign_hash_ids(rows) if hashed else assign_ids(rows)


def assign_hash_ids(rows: list[dict]) -> list[ScanInput]:
    """Ids from content: the first `HASH_ID_LENGTH` hex digits of the source's SHA-256.

    The hash is `pipeline.reader.sha256_of` (a DICOM folder's files, an .mhd/.nhdr with
    its data file), the one the bank stores, so an id never depends on a name. Two
    different sources sharing a prefix both get longer ids (until they differ); two
    inputs with identical content are one scan listed twice, a usage error. A manifest's
    scan_id is ignored: it may be a name.
    """
    digests: dict[str, str] = {}  # digest -> image
    by_image: dict[str, str] = {}
    for r in rows:
        if not os.path.exists(r["image"]):  # fails in the report, like any missing file
            by_image[r["image"]] = "missing-" + hashlib.sha256(r["image"].encode()).hexdigest()
            continue
        try:
            digest = sha256_of(r["image"])
        except ScanError as exc:
            raise InputError(str(exc)) from exc
        if digest in digests:
            raise InputError(
                f"{r['image']} and {digests[digest]} have identical content; list the scan once"
            )
        digests[digest] = by_image[r["image"]] = digest

    def short(digest: str) -> str:
        if digest.startswith("missing-"):
            return digest[: len("missing-") + HASH_ID_LENGTH]
        length = HASH_ID_LENGTH
        while any(o != digest and o[:length] == digest[:length] for o in digests):
            length += 4
        return digest[:length]

    out = []
    for r in rows:
        out.append(_scan_input(r, short(by_image[r["image"]])))
    return out


def _scan_input(row: dict, scan_id: str) -> ScanInput:
    """One collected input row under its final scan id."""
    return ScanInput(
        scan_id=scan_id,
        image=row["image"],
        label=row.get("label"),
        modality=row.get("modality"),
        dataset=row.get("dataset"),
        label_names=row.get("label_names"),
        metadata=row.get("metadata") or None,
    )


def assign_ids(rows: list[dict]) -> list[ScanInput]:
    """Readable ids from file stems; colliding stems get a suffix hashed from the path.

    The suffix depends only on each file's path relative to the colliding group's
    common folder, so ids do not change when unrelated inputs are added or removed.
    """
    wanted = [sanitise_id(r.get("scan_id") or image_stem(r["image"])) for r in rows]
    groups: dict[str, list[int]] = {}
    for i, sid in enumerate(wanted):
        groups.setdefault(sid, []).append(i)
    ids = list(wanted)
    for sid, members in groups.items():
        if len(members) < 2:
            continue
        common = os.path.commonpath([rows[i]["image"] for i in members])
        for i in members:
            rel = os.path.relpath(rows[i]["image"], common)
            ids[i] = f"{sid}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
    taken = set()
    out = []
    for r, sid in zip(rows, ids, strict=True):
        if sid in taken:  # identical relative paths (e.g. a manifest listing a file twice)
            raise InputError(f"two inputs resolve to the same scan id {sid!r}: {r['image']}")
        taken.add(sid)
        out.append(_scan_input(r, sid))
    return out


def parse_spacing(text: str) -> tuple[float, float, float]:
    """`1.5` -> (1.5, 1.5, 1.5); `1.5,1.5,3` -> (1.5, 1.5, 3.0)."""
    parts = [p for p in re.split(r"[,x\s]+", text.strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError as exc:
        raise ValueError(f"spacing {text!r}: expected numbers like 1.5 or 1.5,1.5,3") from exc
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"spacing {text!r}: give one number or three")
    if not all(v > 0 and v < 100 for v in values):
        raise ValueError(f"spacing {text!r}: each value must be in (0, 100) mm")
    return (values[0], values[1], values[2])
