"""`maskbank pretrain`: pretraining on a bank (``maskbank.train.pretrain`` on the parsed config)."""

from __future__ import annotations

import argparse
import sys

from maskbank.flows.commands.options import add_storage_options

DESCRIPTION = """\
Pretrain the in-context segmentation network on reference/query pairs streamed from
BANK (scans with mask proposals). `pretext=reconstruction` trains the same encoder by
masked-volume reconstruction instead, on the same stream and budget: the baseline
pretext to compare against with `maskbank evaluate`. Same as `python train/run.py --config CONFIG --bank
BANK --out OUT [key=value ...]`; for several GPUs use torchrun on train/run.py:

  torchrun --nproc_per_node=8 train/run.py --config base --bank BANK --out OUT

From Python: maskbank.train.pretrain(TrainConfig.load(CONFIG, [key=value ...]), BANK, OUT).

Writes OUT/config.yaml, OUT/metrics.jsonl (step, loss, pairs_per_s, data_wait),
OUT/tb/ (TensorBoard) and OUT/checkpoints/ (every N steps and on SIGTERM).
"""

EPILOG = """\
examples:
  maskbank pretrain bank/ --out runs/tiny                          # CPU, tiny preset
  maskbank pretrain bank/ --out runs/base --config base max_steps=100000 data.batch_size=4
  maskbank pretrain bank/ --out runs/base --config base --resume  # continue after preemption
  maskbank pretrain bank/ --out runs/recon pretext=reconstruction  # the baseline pretext
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain the in-context segmentation network on a bank",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bank", metavar="BANK", help="bank path or fsspec URL (needs proposals)")
    add_storage_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory")
    p.add_argument(
        "--config", default="tiny", help="preset (tiny, small, base) or YAML file (default: tiny)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue exactly from OUT/checkpoints/last.pt"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    return p


def run(args: argparse.Namespace) -> int:
    """The arguments as a ``TrainConfig``, then ``maskbank.train.pretrain``; usage errors
    (configuration, bank, resume, safety) print one line and exit 2."""
    from maskbank.train import pretrain
    from maskbank.train.run import USAGE_ERRORS, usage_error
    from maskbank.train.run_config import TrainConfig

    try:
        config = TrainConfig.load(args.config, args.overrides)
        summary = pretrain(config, args.bank, args.out, resume=args.resume)
    except USAGE_ERRORS as exc:
        return usage_error(exc)
    if summary.rank == 0:
        print(summary.outcome, file=sys.stderr)
    return 0
