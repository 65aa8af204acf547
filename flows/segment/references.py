"""Reference (image, mask) pairs -> the task set a network segments with.

Each pair is prepared exactly as a labelled scan of a bank (same reader, grid and
normalisation; the mask resampled by nearest neighbour), then embedded by
`train.segment.references.encode_references`. ``labels`` chooses the classes: values
(``1,3``) or names from ``label_names``; by default every value the masks hold.
"""

from __future__ import annotations

import numpy as np

from maskbank.flows.inputs import image_stem, sanitise_id
from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.label_names import read_label_names
from maskbank.pipeline.prepare import prepare_scan
from maskbank.train.segment.references import Reference, encode_references
from maskbank.train.segment.tasks import TaskSet

from .errors import SegmentError
from .network import Network


def read_references(
    pairs: list[tuple[str, str]],
    spacing: tuple[float, float, float],
    modality: str = "auto",
    budget: int | None = None,
) -> tuple[list[Reference], str]:
    """Prepared references and their modality (they must agree on one)."""
    refs, modalities = [], set()
    config = PrepareConfig(
        spacing=spacing, modality=modality, max_scan_memory=budget, image_dtype="float32"
    )
    for image, mask in pairs:
        try:
            prepared = prepare_scan(image, mask, config=config)
        except ScanError as exc:
            raise SegmentError(f"reference {exc}") from exc
        if prepared.label is None or not prepared.label.any():
            raise SegmentError(f"reference mask {mask} is empty on the network's {spacing} mm grid")
        modalities.add(prepared.attrs["modality"])
        refs.append(
            Reference(
                sanitise_id(image_stem(image)),
                prepared.image,
                prepared.label,
                prepared.attrs.get("source_sha256"),
            )
        )
    if len(modalities) > 1:
        raise SegmentError(
            f"the references are of different modalities ({sorted(modalities)}); give "
            "references of one modality (or --modality to declare it)"
        )
    return refs, modalities.pop()


def choose_labels(
    spec: str | None, refs: list[Reference], names_file: str | None = None
) -> tuple[list[int], list[str]]:
    """``(values, names)``: ``spec`` is ``1,3`` or ``liver,spleen`` (names need a names file)."""
    known = read_label_names(names_file) if names_file else {}
    present = sorted({int(v) for r in refs for v in np.unique(r.label) if v})
    if not spec:
        values = present
    else:
        by_name = {name.lower(): value for value, name in known.items()}
        values = []
        for item in (s.strip() for s in spec.split(",") if s.strip()):
            if item.lstrip("-").isdigit():
                values.append(int(item))
            elif item.lower() in by_name:
                values.append(by_name[item.lower()])
            else:
                hint = (
                    f"; {names_file} names {sorted(known.values())}"
                    if known
                    else ("; name values with --label-names FILE")
                )
                raise SegmentError(f"--labels {item!r} is neither a label value nor a name{hint}")
    missing = [v for v in values if v not in present]
    if missing:
        raise SegmentError(
            f"label value(s) {missing} are in none of the reference masks (on the network's "
            f"grid); they hold {present}"
        )
    if len(set(values)) != len(values):
        raise SegmentError(f"--labels names a value twice: {values}")
    return values, [known.get(v, f"label {v}") for v in values]


def tasks_from_references(
    net: Network,
    pairs: list[tuple[str, str]],
    spacing: tuple[float, float, float],
    *,
    labels: str | None = None,
    label_names: str | None = None,
    modality: str = "auto",
    budget: int | None = None,
    device: str = "cpu",
    reference_zoom: str = "fit",
    max_zoom: float = 4.0,
) -> tuple[TaskSet, list[Reference]]:
    """Embed the references once: the task set every query of the run uses (at the
    scales ``reference_zoom`` chooses, `encode_references`), and the prepared references
    (what the thresholds are calibrated on)."""
    refs, ref_modality = read_references(pairs, spacing, modality, budget)
    values, names = choose_labels(labels, refs, label_names)
    try:
        tasks = encode_references(
            net.model,
            net.crop,
            refs,
            values,
            names,
            device,
            network_sha256=net.sha256,
            reference_zoom=reference_zoom,
            max_zoom=max_zoom,
            spacing=spacing,
            modality=ref_modality,
        )
    except ValueError as exc:
        raise SegmentError(str(exc)) from exc
    return tasks, refs
