"""Demo and test inputs: a small phantom bank with proposals, and the demo's scans.

``build_phantom_bank`` / ``add_phantom_scan`` write phantoms straight into a bank, for
tests, benchmarks and demos. ``write_inputs`` writes what ``maskbank demo`` prepares: the
real sample scans in ../shared/data when present (with labels and deformed copies as more
subjects) or synthetic phantoms, as NIfTI files and a manifest.

``build_phantom_bank`` uses the real writers (``Bank.write_scan``, ``write_proposals``) on synthetic
phantoms so the sampler is exercised end to end without the real pipeline's
runtime. Besides one proposal per phantom structure, connected components of
intensity thresholds are added (like the generated proposals of a real bank),
so that K = 13 proposals are visible in a crop. Imports ``pipeline`` lazily:
the training path itself never needs it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

# (file, label file or None, modality, dataset) of the real sample scans we use. The
# MNI152 T1's label (grey/white matter) is made by `write_inputs` from the template's
# probability maps; it and the chest CT also get deformed copies (more subjects).
REAL_SAMPLES = (
    ("ct_chest_lung1.nii.gz", "ct_chest_lung1_nodule_label.nii.gz", "ct", "chest-ct"),
    ("ct_head_template_1mm.nii.gz", None, "ct", "sample-real"),
    ("mr_brain_mni152_t1_1mm.nii.gz", None, "mr", "mr-template"),
    ("mr_brain_aniso_4x4x5mm.nii.gz", None, "mr", "sample-real"),
)


def shared_data_dir() -> Path:
    """../shared/data next to the repository (where the real sample scans live)."""
    from maskbank import flows

    return Path(flows.__file__).resolve().parents[1].parent / "shared" / "data"


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


def write_inputs(out: Path, synthetic: bool) -> Path:
    """Write OUT/inputs/manifest.csv plus the files it names; return the manifest path.

    Labelled datasets hold each class in at least two scans (what a few-shot or
    probe evaluation needs): three CT phantoms, and with the real scans the MNI152
    T1 with a grey/white-matter label plus two deformed copies, and the chest CT
    with its nodule plus one. Label names travel as JSON sidecars in the manifest's
    label_names column. Generated volumes are deterministic and kept, so a re-run
    skips them here and skips their scans in prepare.
    """
    import json

    import nibabel as nib
    import numpy as np

    from maskbank.pipeline.phantom import NAMES, make_phantom
    from maskbank.pipeline.synthetic_subjects import save_nifti_atomic, write_deformed_subject

    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []

    def sidecar(name: str, names: dict[int, str]) -> str:
        path = inputs / name
        text = json.dumps({str(v): n for v, n in names.items()}, indent=1) + "\n"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return path.name

    def rel(path: Path | None) -> str:  # generated files are manifest-relative
        if path is None:
            return ""
        return path.name if path.parent == inputs else str(path)

    def row(image: Path, label: Path | None, modality: str, dataset: str, names: str = "") -> None:
        rows.append(
            {
                "image": rel(image),
                "label": rel(label),
                "modality": modality,
                "dataset": dataset,
                "label_names": names,
            }
        )

    def subjects(image: Path, label: Path, seeds: tuple[int, ...], row_of_source: dict) -> None:
        """Deformed copies of a labelled real scan, as more subjects of its dataset."""
        modality, dataset, names = (
            row_of_source[k] for k in ("modality", "dataset", "label_names")
        )
        stem = image.name[: -len(".nii.gz")]
        for seed in seeds:
            name = f"{stem}_subject{seed}"
            img, lab = inputs / f"{name}.nii.gz", inputs / f"{name}_label.nii.gz"
            if not (img.exists() and lab.exists()):
                img, lab = write_deformed_subject(image, label, inputs, name, seed)
            row(img, lab, modality, dataset, names)

    data = shared_data_dir()
    tissue_maps = ("mr_brain_mni152_gm_prob_1mm.nii.gz", "mr_brain_mni152_wm_prob_1mm.nii.gz")
    real = [f for f, *_ in REAL_SAMPLES] + list(tissue_maps)
    if not synthetic and all((data / f).exists() for f in real):
        nodule = sidecar("nodule_names.json", {1: "nodule"})
        tissue = sidecar("tissue_names.json", {1: "grey matter", 2: "white matter"})
        for image, label, modality, dataset in REAL_SAMPLES:
            src = data / image
            if image.startswith("mr_brain_mni152_t1"):
                lab = inputs / f"{image[: -len('.nii.gz')]}_tissue_label.nii.gz"
                if not lab.exists():  # grey/white matter where more likely than not
                    t1 = nib.load(src)
                    gm, wm = (np.asarray(nib.load(data / f).dataobj) for f in tissue_maps)
                    tissue_label = np.zeros(gm.shape, np.uint16)
                    tissue_label[(gm >= 128) & (gm >= wm)] = 1
                    tissue_label[(wm >= 128) & (wm > gm)] = 2
                    save_nifti_atomic(nib.Nifti1Image(tissue_label, t1.affine), lab)
                row(src, lab, modality, dataset, tissue)
                subjects(src, lab, (1, 2), rows[-1])
            elif label:
                row(src, data / label, modality, dataset, nodule)
                subjects(src, data / label, (1,), rows[-1])
            else:
                row(src, None, modality, dataset)
        phantoms = [("ct", 1), ("ct", 2), ("ct", 3), ("pet", 3)]
    else:
        phantoms = [("ct", 1), ("ct", 2), ("ct", 3), ("mr", 2), ("pet", 3)]
    organs = sidecar("phantom_names.json", NAMES)
    for modality, seed in phantoms:
        name = f"phantom_{modality}_{seed}" if modality == "ct" else f"phantom_{modality}"
        img, lab = inputs / f"{name}.nii.gz", inputs / f"{name}_label.nii.gz"
        if not (img.exists() and lab.exists()):  # deterministic: keep them for skip-on-rerun
            ph = make_phantom(modality, shape=(96, 96, 80), spacing=(2.0, 2.0, 2.5), seed=seed)
            img, lab = ph.save_nifti(inputs, name)
        row(img, lab, modality, f"phantom-{modality}", organs)
    manifest = inputs / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        fields = ["image", "label", "modality", "dataset", "label_names"]
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return manifest
