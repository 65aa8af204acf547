"""`maskbank export`: a pretrained ResEnc checkpoint as an nnU-Net, MONAI or Hugging Face folder.

The work is ``maskbank.train.export.export_checkpoint``; this module only parses arguments
and turns its refusals into one-line errors (exit 2).
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ("nnunet", "monai", "hf")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a pretrained ResEnc encoder for nnU-Net, MONAI or Hugging Face",
        description="Write a pretraining checkpoint of the resenc encoder (--config "
        "resenc-l / resenc-tiny) as a folder another framework fine-tunes from: nnunet "
        "(checkpoint_final.pth in nnssl format + adaptation_plan.json + plans_architecture.json"
        " for -pretrained_weights), monai (a bundle), hf (a Hugging Face model repository; "
        "nothing is uploaded). Every folder has a model card recording the mask source, the "
        "bank, the pretraining config and any --results. The export self-tests first (rebuild "
        "from the plan, strict load, encoder equal to the pretrained one, forward pass). "
        "docs/export.md has the fine-tuning commands. Exit status: 0 written, 2 refused.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a .pt file or a run directory of `maskbank pretrain`")  # fmt: skip
    p.add_argument("--format", required=True, dest="fmt", metavar="FORMAT",
                   help=f"one of {', '.join(FORMATS)}")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty)")
    p.add_argument("--results", nargs="+", default=[], metavar="DIR",
                   help="evaluation result folders (`maskbank evaluate ... --out DIR`) for the card")  # fmt: skip
    p.add_argument("--bank", default=None,
                   help="the pretraining bank, if it moved since (default: the path the "
                   "checkpoint recorded); read for the card's mask source and scan counts")  # fmt: skip
    p.add_argument("--weights", default="ema", choices=("ema", "model"),
                   help="EMA weights (default; refused when the checkpoint has none) or the raw ones")  # fmt: skip
    p.add_argument("--license", default="other", dest="license_id",
                   help="licence id for the card (default 'other': the pretraining scans' terms)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


def run(args: argparse.Namespace) -> int:
    from maskbank.train.export import ExportError, export_checkpoint

    try:
        result = export_checkpoint(
            args.checkpoint, args.fmt, args.out, results=args.results, bank=args.bank,
            weights=args.weights, license_id=args.license_id, force=args.force,
        )  # fmt: skip
    except (ExportError, ImportError) as exc:
        print(f"maskbank export: error: {exc}", file=sys.stderr)
        return 2
    test = result.self_test
    print(
        f"exported {result.encoder.preset} ({result.encoder.weights} weights, step "
        f"{result.encoder.step}) as {result.fmt} to {result.out}; self-test passed: strict "
        f"load, {test['pretrained_tensors_equal']} encoder tensors equal, forward pass"
    )
    for path in result.files:
        print(f"  {path}")
    return 0
