"""`maskbank demo`: the README's main job, end to end on sample scans.

Stages run in order and share one context dict; each returns an exit code.
Stages (prepare, proposals, a tiny pretraining run, evaluation) plug in by appending to
`STAGES` -- see the comment there.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from pathlib import Path

from maskbank.flows.commands._prefect_env import apply_cli_defaults
from maskbank.flows.commands.options import add_workers_option

STAGE_ORDER = ("prepare", "propose", "pretrain", "evaluate")  # the functions are in STAGES below

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


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="build a bank from sample scans end to end and print its summary",
        description="Build a bank from sample scans: the real ones in ../shared/data when "
        "present (plus a synthetic PET phantom, since no real PET is public), otherwise "
        "synthetic CT/MR/PET phantoms written as NIfTI into OUT/inputs. Runs `prepare` "
        "into OUT/bank and prints the bank summary, makes the mask proposals and prints "
        "their quality against the scans' labels, then pretrains the `tiny` in-context "
        "network on the CPU for --steps steps (OUT/pretrain) on every scan except the "
        "labelled ones the evaluation scores, and prints its loss curve, and ends with the "
        "answer: 1-shot in-context segmentation of the labelled structures in those unseen "
        "scans by the pretrained network beside atlas registration and the untrained floor "
        "(OUT/evaluate: results.md, results.json, figures). "
        "Re-running skips finished prepare/propose work. Exit status as for `maskbank prepare`.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for inputs and bank")
    p.add_argument("--spacing", default="1.5", metavar="MM", help="target spacing (default 1.5)")
    add_workers_option(p, default=2)
    p.add_argument(
        "--synthetic", action="store_true", help="use phantoms even when real scans exist"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--steps",
        type=int,
        default=1000,
        metavar="N",
        help="tiny pretraining steps (default 1000: a minute or two on a CPU, enough for the "
        "pretrained network to beat the untrained floor in the evaluation)",
    )
    p.add_argument(
        "--until",
        choices=STAGE_ORDER,
        default="evaluate",
        help="stop after this stage (default: evaluate, i.e. run everything)",
    )
    return p


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


def stage_prepare(args: argparse.Namespace, ctx: dict) -> int:
    from maskbank.flows.commands.info import format_summary
    from maskbank.flows.inputs import parse_spacing
    from maskbank.flows.prepare import prepare_bank
    from maskbank.flows.report import format_prepare_report
    from maskbank.pipeline.config import PrepareConfig

    manifest = write_inputs(ctx["out"], args.synthetic)
    config = PrepareConfig(spacing=parse_spacing(args.spacing))
    report = prepare_bank(
        inputs=[str(manifest)],
        bank=str(ctx["bank"]),
        config=config.to_dict(),
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(format_prepare_report(report))
    from maskbank.bank import Bank

    print()
    print(format_summary(Bank.open(ctx["bank"]).summary()))
    ctx["prepare_report"] = report
    return 1 if report["counts"].get("failed") else 0


def stage_propose(args: argparse.Namespace, ctx: dict) -> int:
    """Mask proposals for every scan, then their quality against the labelled scans."""
    from maskbank.bank import Bank
    from maskbank.flows.commands.proposals_quality import bank_quality, format_table
    from maskbank.flows.propose import propose_bank
    from maskbank.flows.report import format_propose_report
    from maskbank.pipeline.proposals.engine import ProposalConfig

    report = propose_bank(
        bank=str(ctx["bank"]),
        config=ProposalConfig().to_dict(),
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(format_propose_report(report))
    print()
    print(format_table(bank_quality(Bank.open(ctx["bank"]))))
    return 1 if report["counts"].get("failed") else 0


def sparkline(values: list[float], width: int = 60) -> str:
    """One-line picture of a curve (the loss), resampled to ``width`` characters."""
    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    idx = [round(i * (len(values) - 1) / max(width - 1, 1)) for i in range(min(width, len(values)))]
    pts = [values[i] for i in idx]
    lo, hi = min(pts), max(pts)
    span = (hi - lo) or 1.0
    return "".join(bars[min(7, int((v - lo) / span * 7.999))] for v in pts)


def pretraining_scans(bank_path: Path) -> tuple[list[str], list[str]]:
    """(scans to pretrain on, evaluation queries left out): the evaluation never scores a
    scan the network was pretrained on. The references may stay: their labels are given
    to the network at evaluation anyway, and pretraining never sees a label."""
    from maskbank.bank import Bank
    from maskbank.train.evaluation.incontext import query_scan_ids

    bank = Bank.open(bank_path)
    try:
        queries = query_scan_ids(bank)
    except ValueError:  # no labelled classes: nothing will be evaluated, pretrain on all
        queries = []
    return [s for s in sorted(bank.scan_ids) if s not in set(queries)], queries


def stage_pretrain(args: argparse.Namespace, ctx: dict) -> int:
    """A short CPU pretraining of the `tiny` preset on all but the evaluation queries."""
    import json

    from maskbank.train.run import main as train_main

    run_dir = ctx["out"] / "pretrain"
    scans, queries = pretraining_scans(ctx["bank"])
    print(
        f"pretraining on {len(scans)} scans; the {len(queries)} labelled scans the evaluation "
        f"scores as queries are left out: {', '.join(queries) or 'none'}"
    )
    code = train_main(
        [
            "--config",
            "tiny",
            "--bank",
            str(ctx["bank"]),
            "--out",
            str(run_dir),
            f"data.scans={json.dumps(scans)}",
            # The held-out queries double as validation scans: the pretext's Dice on pairs
            # from scans it never trained on, every train.val_every steps.
            *([f"data.val_scans={json.dumps(queries)}"] if queries else []),
            f"train.max_steps={args.steps}",
            f"train.progress={'false' if args.no_progress else 'true'}",
            f"train.ckpt_every={max(20, args.steps // 4)}",  # a few checkpoints, not 50
        ]
    )
    if code:
        return code
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [float(r["loss"]) for r in rows if "loss" in r]
    if losses:
        k = max(1, len(losses) // 10)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"\npretraining loss over {len(losses)} steps: {sparkline(losses)}")
        print(f"mean loss of the first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    val = [(int(r["step"]), float(r["val_dice"])) for r in rows if "val_dice" in r]
    if val:
        curve = ", ".join(f"{step}: {dice:.3f}" for step, dice in val)
        print(f"held-out pair Dice (scans left out of pretraining) by step: {curve}")
    if losses:
        print(f"run directory: {run_dir} (tensorboard --logdir {run_dir / 'tb'})")
    return 0


def stage_evaluate(args: argparse.Namespace, ctx: dict) -> int:
    """1-shot in-context segmentation: the pretrained `tiny`, atlas registration, the floor."""
    from maskbank.flows.cli import main as cli

    out = ctx["out"] / "evaluate" / "incontext"
    argv = ["evaluate", "incontext", "--checkpoint", str(ctx["out"] / "pretrain")]
    argv += ["--checkpoint", "registration"]
    argv += ["--bank", str(ctx["bank"]), "--shots", "1", "--out", str(out)]
    if args.no_progress:
        argv.append("--no-progress")
    print(
        "\n1-shot in-context segmentation of the labelled structures on scans left out of "
        "pretraining (pretrained vs atlas registration vs untrained floor; the headline is "
        "the mean over datasets of the class means, with its 95 % bootstrap interval):"
    )
    code = cli(argv)
    if code == 0:
        print(f"overlays per class: {out / 'figures'}")
    return code


# Stages share ctx["out"], ctx["bank"] and what earlier stages stored.
STAGES: list[tuple[str, Callable[[argparse.Namespace, dict], int]]] = [
    ("prepare", stage_prepare),
    ("propose", stage_propose),
    ("pretrain", stage_pretrain),
    ("evaluate", stage_evaluate),
]
assert tuple(name for name, _ in STAGES) == STAGE_ORDER


def run(args: argparse.Namespace) -> int:
    apply_cli_defaults()
    out = Path(args.out).expanduser().resolve()
    ctx: dict = {"out": out, "bank": out / "bank"}
    for name, stage in STAGES:
        print(f"== demo: {name} ==", file=sys.stderr)
        code = stage(args, ctx)
        if code:
            print(f"demo stopped after stage {name!r} (exit {code})", file=sys.stderr)
            return code
        if name == args.until:
            break
    print(f"\ndemo done: bank at {ctx['bank']}")
    return 0
