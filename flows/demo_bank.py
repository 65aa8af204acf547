"""Build a small phantom bank with proposals, for tests, benchmarks and demos.

Uses the real writers (``Bank.write_scan``, ``write_proposals``) on synthetic
phantoms so the sampler is exercised end to end without the real pipeline's
runtime. Besides one proposal per phantom structure, connected components of
intensity thresholds are added (like the generated proposals of a real bank),
so that K = 13 proposals are visible in a crop. Imports ``pipeline`` lazily:
the training path itself never needs it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _normalise(image: np.ndarray, body: np.ndarray) -> np.ndarray:
    inside = image[body] if body.any() else image.ravel()
    lo, hi = np.percentile(inside, [0.5, 99.5])
    return ((np.clip(image, lo, hi) - inside.mean()) / max(inside.std(), 1e-6)).astype(np.float32)


def threshold_components(
    image: np.ndarray, quantiles: tuple[float, ...], min_voxels: int = 32, max_labels: int = 400
) -> list[np.ndarray]:
    """Label maps of connected components above/below intensity quantiles (a layer each)."""
    from scipy import ndimage

    layers = []
    for q in quantiles:
        t = np.quantile(image, q)
        for region in (image > t, image <= t):
            cc, n = ndimage.label(region)
            if n == 0:
                continue
            sizes = np.bincount(cc.ravel(), minlength=n + 1)
            keep = np.flatnonzero(sizes >= min_voxels)
            keep = keep[keep > 0][:max_labels]
            lut = np.zeros(n + 1, np.int32)
            lut[keep] = np.arange(1, len(keep) + 1)
            if len(keep):
                layers.append(lut[cc])
    return layers


def add_phantom_scan(
    bank,
    scan_id: str,
    modality: str = "ct",
    shape: tuple[int, int, int] = (80, 80, 64),
    seed: int = 0,
    dataset: str = "phantom",
    extra_proposals: bool = True,
    n_lesions: int = 2,
    metadata: dict[str, str] | None = None,
) -> dict:
    """Write one phantom scan plus proposals; return its index row.

    The scan carries ``label_names`` (the phantom's organs present in it) and
    ``metadata`` like a prepared labelled scan, so evaluation code runs on it as is.
    """
    from maskbank.bank.writing import write_proposals
    from maskbank.pipeline.label_names import names_present
    from maskbank.pipeline.phantom import make_phantom
    from maskbank.pipeline.proposals.external import from_label_map
    from maskbank.pipeline.proposals.features import compute_features
    from maskbank.pipeline.proposals.proposal_set import merge_sets

    ph = make_phantom(
        modality, shape=shape, spacing=(1.5, 1.5, 1.5), seed=seed, n_lesions=n_lesions
    )
    image = _normalise(ph.image, ph.body)
    attrs = {
        "dataset": dataset,
        "modality": modality,
        "spacing": list(ph.spacing),
        "affine": ph.affine.tolist(),
        "source_path": f"phantom://{modality}/{seed}",
        "source_sha256": f"phantom-{modality}-{seed}-{'x'.join(map(str, shape))}"
        + ("" if n_lesions == 2 else f"-lesions{n_lesions}"),
        "fingerprint": "phantom",
        "label_names": names_present(ph.names, ph.labels),
        "metadata": {str(k): str(v) for k, v in (metadata or {}).items()},
    }
    bank.write_scan(scan_id, {"image": image, "body": ph.body, "label": ph.labels}, attrs)
    sets = [from_label_map(ph.labels, source="phantom", layer_name="structures")]
    if extra_proposals:
        rng = np.random.default_rng(seed)
        qs = tuple(sorted(rng.uniform(0.2, 0.9, 3).round(3)))
        for j, lay in enumerate(threshold_components(image, qs)):
            sets.append(from_label_map(lay, source="threshold", layer_name=f"threshold{j}"))
    return write_proposals(bank, scan_id, compute_features(merge_sets(sets), None, None))


def build_phantom_bank(
    path: str | Path,
    n_scans: int = 3,
    shape: tuple[int, int, int] = (80, 80, 64),
    modalities: tuple[str, ...] = ("ct", "mr", "pet"),
    extra_proposals: bool = True,
    dataset: str = "phantom",
):
    """Create (or extend) a bank at ``path`` with ``n_scans`` phantoms; returns the Bank."""
    from maskbank.bank import Bank

    bank = Bank.create(path)
    for i in range(n_scans):
        mod = modalities[i % len(modalities)]
        add_phantom_scan(
            bank,
            f"phantom-{mod}-{i:03d}",
            mod,
            shape,
            seed=i,
            dataset=dataset,
            extra_proposals=extra_proposals,
        )
    return Bank.open(path)
