"""Proposal quality on labelled real scans and phantoms: ours vs single-scale SLIC, same grid.

Run:  .venv/bin/python bench/proposals_quality.py [--cases mni,small,chest,phantom]
          [--out results.json] [--slic-cache slic.json] [--no-slic]

Every scan is prepared at 1.5 mm (as `maskbank prepare` does) and scored on each
labelled structure of >= 27 voxels: ABO (mean best Dice over structures), recall at
Dice 0.5 / 0.7 / 0.9, number of proposals, bytes per proposal as stored in a real bank
on disk (the whole proposals part, beside the byte budget's estimate of it), and
seconds (one thread).  The baseline is every segment of one skimage SLIC
run (2,000 segments, compactness 0.1 on the normalised image) on the same grid and
body mask.  Cases:

- ``mni``: MNI152 T1 with the AICHA atlas (192 parcels), the JHU white-matter atlas
  (48 tracts) and grey/white matter (probability >= 50 %).  AICHA's values here name a
  left/right pair of parcels (two mirror-image pieces; no connected proposal can reach
  Dice 0.67 on them), so it is also scored with each value split at the midline
  (``aicha_lr``, 384 parcels, one per hemisphere as in AAL-type atlases);
- ``small``: the same head with voxels declared 0.5 mm (a body 1/8 the volume, e.g. a
  macaque or child), AICHA parcels: checks that the set scales with the body;
- ``chest``: the real chest CT with its expert nodule (a large body: the speed case);
- ``phantom``: the CT phantom's organs (pipeline/phantom.py).

SLIC results do not depend on our engine: ``--slic-cache`` keeps them between runs.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
DATA = REPO.parent / "shared" / "data"

from proposals import _mni_label  # noqa: E402  (bench/proposals.py: grey/white matter labels)

from maskbank.bank import Bank  # noqa: E402
from maskbank.bank.sampling import ProposalReader  # noqa: E402
from maskbank.bank.writing import proposal_nbytes, write_proposals  # noqa: E402
from maskbank.pipeline.config import PrepareConfig  # noqa: E402
from maskbank.pipeline.normalize import invert_normalization  # noqa: E402
from maskbank.pipeline.phantom import make_phantom  # noqa: E402
from maskbank.pipeline.prepare import prepare_scan  # noqa: E402
from maskbank.pipeline.proposals.baseline import SLIC_COMPACTNESS, slic_proposals  # noqa: E402
from maskbank.pipeline.proposals.budget import fit_byte_budget  # noqa: E402
from maskbank.pipeline.proposals.engine import ProposalConfig, generate_proposals  # noqa: E402
from maskbank.pipeline.proposals.features import compute_features  # noqa: E402
from maskbank.pipeline.proposals.quality import RECALL_LEVELS, recall_key, score, summarise  # noqa: E402

MIN_VOXELS = 27
CASES = ("mni", "small", "chest", "phantom")


@dataclass
class Case:
    name: str
    modality: str
    raw: np.ndarray  # raw units (HU for CT): what the engine sees
    image: np.ndarray  # normalised, as stored in the bank: what SLIC sees
    body: np.ndarray
    spacing: tuple[float, float, float]
    labels: list[tuple[str, np.ndarray, dict[int, str]]]  # (label set, label map, names)


def _names(path: Path) -> dict[int, str]:
    return {int(k): v for k, v in json.loads(path.read_text(encoding="utf-8")).items()}


def _scaled(path: Path, tmp: Path, scale: float) -> Path:
    """The same volume with voxels ``scale`` times smaller (a smaller body)."""
    import nibabel as nib

    img = nib.load(path)
    aff = img.affine.copy()
    aff[:3] *= scale  # the origin too: the midline stays at world x = 0
    out = tmp / f"scaled_{path.name}"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), out)
    return out


def split_hemispheres(label: np.ndarray, affine: np.ndarray, names: dict[int, str]):
    """Each value split at world x = 0 into _L and _R parts (label map, names)."""
    x = affine[0, 0] * np.arange(label.shape[0]) + affine[0, 3]
    right = (x > 0)[:, None, None] & (label > 0)
    out = label.astype(np.int32) * 2 + right
    out[label == 0] = 0
    new = {}
    for v, n in names.items():
        new[2 * v], new[2 * v + 1] = f"{n}_L", f"{n}_R"
    return out, new


def _prepared(image: Path, label: Path, modality: str, spacing: float):
    p = prepare_scan(image, label, config=PrepareConfig(spacing=spacing, modality=modality))
    raw = invert_normalization(p.image.astype(np.float32), p.attrs["normalization"])
    return p, raw


def load_case(name: str, tmp: Path, spacing: float = 1.5) -> Case | None:
    if name == "phantom":
        ph = make_phantom("ct", shape=(160, 160, 128), spacing=(1.5, 1.5, 1.5), seed=0)
        img, lab = ph.save_nifti(tmp / "phantom", name="ct_phantom")
        p, raw = _prepared(img, lab, "ct", spacing)
        return Case(name, "ct", raw, p.image, p.body, p.spacing, [("organs", p.label, ph.names)])
    if not DATA.is_dir():
        print(f"no real scans at {DATA}; skipping {name}", file=sys.stderr)
        return None
    if name == "chest":
        p, raw = _prepared(
            DATA / "ct_chest_lung1.nii.gz",
            DATA / "ct_chest_lung1_nodule_label.nii.gz",
            "ct",
            spacing,
        )
        return Case(
            name, "ct", raw, p.image, p.body, p.spacing, [("nodule", p.label, {1: "nodule"})]
        )
    t1 = DATA / "mr_brain_mni152_t1_1mm.nii.gz"
    aicha = DATA / "mr_brain_mni152_aicha_labels_1mm.nii.gz"
    jhu = DATA / "mr_brain_mni152_jhu_wm_labels_1mm.nii.gz"
    aicha_names = _names(DATA / "mr_brain_mni152_aicha_labels_1mm.json")
    if name == "small":
        p, raw = _prepared(_scaled(t1, tmp, 0.5), _scaled(aicha, tmp, 0.5), "mr", spacing)
        lr = split_hemispheres(p.label, p.affine, aicha_names)
        return Case(name, "mr", raw, p.image, p.body, p.spacing, [("aicha_lr", *lr)])
    if name == "mni":
        p, raw = _prepared(t1, aicha, "mr", spacing)
        labels = [("aicha", p.label, aicha_names)]
        labels.append(("aicha_lr", *split_hemispheres(p.label, p.affine, aicha_names)))
        for set_name, path, names in (
            ("jhu", jhu, _names(DATA / "mr_brain_mni152_jhu_wm_labels_1mm.json")),
            ("gm_wm", _mni_label(tmp), {1: "grey_matter", 2: "white_matter"}),
        ):
            q, _ = _prepared(t1, path, "mr", spacing)
            assert q.label.shape == p.label.shape
            labels.append((set_name, q.label, names))
        return Case(name, "mr", raw, p.image, p.body, p.spacing, labels)
    raise ValueError(f"unknown case {name!r}; use {CASES}")


def stored_bytes(ps, case: Case) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        bank = Bank.create(Path(tmp) / "bank")
        bank.write_scan(
            "s", {"image": case.image, "body": case.body}, {"spacing": list(case.spacing)}
        )
        if not ps.has_features:  # a baseline's plain segments: the bank stores features too
            compute_features(ps, case.image, case.body, case.spacing)
        write_proposals(bank, "s", ps)
        return ProposalReader(bank.scan("s")).nbytes_stored()


def measure(ps, case: Case, seconds: float) -> dict:
    if not ps.has_features:
        compute_features(ps, case.image.astype(np.float32), case.body, case.spacing)
    nbytes = stored_bytes(ps, case)
    out = {
        "proposals": ps.count,
        "seconds": round(seconds, 1),
        "bytes_per_proposal": round(nbytes / max(ps.count, 1), 1),
        "labels": {},
    }
    for set_name, label, names in case.labels:
        sc = score(ps, label, names, min_voxels=MIN_VOXELS)
        out["labels"][set_name] = {
            "structures": {k: round(v, 4) for k, v in sc["structures"].items()},
            "sizes": sc["sizes"],
        }
    return out


def _row(best: dict[str, float]) -> dict:
    s = summarise(best, RECALL_LEVELS)
    return {"n": len(best)} | {k: round(v, 3) for k, v in s.items()}


def report(results: dict) -> str:
    keys = ["abo", *(recall_key(v) for v in RECALL_LEVELS)]
    head = f"{'case/labels':<18}{'method':>7}{'n':>5}" + "".join(f"{k:>10}" for k in keys)
    head += f"{'props':>7}{'B/prop':>8}{'sec':>7}"
    lines = [head]
    pooled: dict[str, list[float]] = {}
    per_scan: dict[str, list[float]] = {}
    for case, res in results.items():
        for method, m in res.items():
            for set_name, lab in m["labels"].items():
                best = lab["structures"]
                pooled.setdefault(method, []).extend(best.values())
                per_scan.setdefault(method, []).append(float(np.mean(list(best.values()))))
                r = _row(best)
                lines.append(
                    f"{case + '/' + set_name:<18}{method:>7}{r['n']:>5}"
                    + "".join(f"{r[k]:>10.3f}" for k in keys)
                    + f"{m['proposals']:>7}{m['bytes_per_proposal']:>8.1f}{m['seconds']:>7.1f}"
                )
    for method, vals in pooled.items():
        r = _row(dict(enumerate(vals)))
        lines.append(
            f"{'overall':<18}{method:>7}{r['n']:>5}"
            + "".join(f"{r[k]:>10.3f}" for k in keys)
            + f"   ABO per label set {np.mean(per_scan[method]):.3f}"
        )
    return "\n".join(lines)


def main() -> int:
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {CASES}")
    ap.add_argument("--out", default=None, help="write per-structure results as JSON here")
    ap.add_argument("--slic-cache", default=None, help="JSON file keeping SLIC results")
    ap.add_argument("--no-slic", action="store_true", help="skip the SLIC baseline")
    ap.add_argument("--slic-segments", type=int, default=2000)
    args = ap.parse_args()
    cache_path = Path(args.slic_cache) if args.slic_cache else None
    cache = (
        json.loads(cache_path.read_text(encoding="utf-8"))
        if cache_path and cache_path.exists()
        else {}
    )
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmpd:
        for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
            case = load_case(name, Path(tmpd))
            if case is None:
                continue
            t0 = time.perf_counter()
            cfg = ProposalConfig()
            ps = generate_proposals(case.raw, case.body, case.spacing, case.modality, cfg)
            ps, budget = fit_byte_budget(ps, proposal_nbytes, cfg.max_bytes_per_proposal)
            results[name] = {"ours": measure(ps, case, time.perf_counter() - t0)}
            # what the budget held (its estimate) beside what the bank then stored
            ours = results[name]["ours"]
            ours["budget"] = {k: budget[k] for k in ("bytes_per_proposal", "fits", "dropped")}
            ours["budget"]["dropped_layers"] = len(budget["dropped_layers"])
            print(
                f"{name}: byte budget {cfg.max_bytes_per_proposal:g} B/proposal, estimate "
                f"{budget['bytes_per_proposal']}, stored {ours['bytes_per_proposal']} "
                f"({len(budget['dropped_layers'])} layers dropped)",
                file=sys.stderr,
            )
            sets = "+".join(s for s, _, _ in case.labels)
            key = f"{name}:{sets}:{args.slic_segments}:{SLIC_COMPACTNESS}"
            if not args.no_slic:
                if key not in cache:
                    t0 = time.perf_counter()
                    base = slic_proposals(case.image, case.body, case.spacing, args.slic_segments)
                    cache[key] = measure(base, case, time.perf_counter() - t0)
                    if cache_path:
                        cache_path.write_text(json.dumps(cache), encoding="utf-8")
                results[name]["slic"] = cache[key]
            print(report({name: results[name]}), file=sys.stderr, flush=True)
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
