"""How far held-out pair validation can go: a network's pair Dice beside what a perfect
mask-propagation readout would reach on the same pairs.

Run:  .venv/bin/python bench/pair_ceiling.py --bank BANK [--checkpoint RUN]
          [--config tiny | RUN/config.yaml] [--set data.val_scans=[a,b] ...]
          [--pairs 48] [--json]

The pairs are the fixed held-out validation pairs of a training config
(``train.validation.PairValidator``: what a run scores as ``val_dice``; the config is the
checkpoint's unless ``--config`` names one). Per size bin of the query target (voxels in
the 32^3-style crop), over tasks present in the query:

* ``reference view``: the target cut to the query voxels the reference crop shows
  (``train.reference_view``), scored against the whole target -- an exact copy of what
  the reference shows, with nothing guessed beyond it (``val_dice_seen``);
* ``ceiling L1`` / ``L2`` / ``L3``: that cut target averaged over 2^L-voxel cells and
  upsampled trilinearly, thresholded at 0.5 -- the masks a readout at encoder level L
  returns when it matches every query cell to the right reference cell (and cells the
  reference does not show to none), before the decoder corrects anything. It bounds what
  the readout alone can give at that level;
* ``untrained``: the same architecture at its initial weights (the baseline, built in this
  process), Dice at threshold 0.5;
* ``network`` (with ``--checkpoint``): its EMA weights' Dice at threshold 0.5, and
  ``best threshold``: with each task's best threshold of a grid (0.02-0.9), an upper bound
  for any thresholding rule, so a gap between the two is calibration, not matching.

The ratios network / ceiling at the network's readout level and network / untrained are
printed last. Everything runs on the CPU with one thread.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from maskbank.train.evaluation.checkpoint import load_network  # noqa: E402
from maskbank.train.evaluation.metrics import dice  # noqa: E402
from maskbank.train.run_config import TrainConfig, apply_overrides  # noqa: E402
from maskbank.train.validation import PairValidator, resolve_validation  # noqa: E402

BINS = ((1, 64), (64, 256), (256, 1024), (1024, 4096), (4096, None))
GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
LEVELS = (1, 2, 3)


def ceiling_rows(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    """One row per present task: its size and the perfect readout's Dice at each level."""
    rows = []
    for batch in batches:
        target = batch["query_masks"][:, :-1].float()  # the global all-ones task aside
        seen = target * batch["ref_view"][:, None]
        ups = {}
        for lv in LEVELS:
            f = 2**lv
            occ = F.avg_pool3d(seen, f, f)
            ups[lv] = F.interpolate(occ, size=target.shape[-3:], mode="trilinear") >= 0.5
        for i in range(target.shape[0]):
            for k in range(target.shape[1]):
                t = target[i, k].bool()
                if not t.any():
                    continue
                row = {"voxels": int(t.sum())}
                row["reference view"] = dice(seen[i, k].bool().numpy(), t.numpy())
                row.update(
                    {f"ceiling L{lv}": dice(ups[lv][i, k].numpy(), t.numpy()) for lv in LEVELS}
                )
                rows.append(row)
    return rows


@torch.no_grad()
def network_dice(model: torch.nn.Module, batches, best: bool) -> list[dict[str, float]]:
    """Per present task (same order as ``ceiling_rows``): Dice at 0.5, and with ``best``
    the Dice at the task's best threshold of ``GRID``."""
    model.eval()
    rows = []
    for batch in batches:
        prob = torch.sigmoid(
            model(batch["ref_image"], batch["ref_masks"], batch["query_image"]).float()
        )[:, :-1]
        target = batch["query_masks"][:, :-1].bool()
        for i in range(target.shape[0]):
            for k in range(target.shape[1]):
                t = target[i, k]
                if not t.any():
                    continue
                row = {"dice": dice((prob[i, k] > 0.5).numpy(), t.numpy())}
                if best:
                    row["best"] = max(dice((prob[i, k] > g).numpy(), t.numpy()) for g in GRID)
                rows.append(row)
    return rows


def summary(columns: dict[str, list[float]], sizes: np.ndarray) -> list[dict]:
    """Mean of each column over every task and per size bin."""
    out = [
        {"bin": "all", "tasks": len(sizes), **{c: float(np.mean(v)) for c, v in columns.items()}}
    ]
    for lo, hi in BINS:
        sel = (sizes >= lo) & (sizes < (hi or np.inf))
        if sel.any():
            name = f"{lo}-{hi}" if hi else f">={lo}"
            means = {c: float(np.mean(np.asarray(v)[sel])) for c, v in columns.items()}
            out.append({"bin": name, "tasks": int(sel.sum()), **means})
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    trained = load_network(args.checkpoint) if args.checkpoint else None
    if args.config:
        cfg = TrainConfig.load(args.config, args.set)
    elif trained is not None and trained.train_config is not None:
        raw = apply_overrides(trained.train_config.to_dict(), list(args.set))
        cfg = TrainConfig.from_dict(raw)
    else:
        cfg = TrainConfig.load("tiny", args.set)
    cfg = replace(cfg, train=replace(cfg.train, val_pairs=args.pairs))
    _, val_ids = resolve_validation(args.bank, cfg.data)
    if not val_ids:
        raise SystemExit(
            "no validation scans: name them with --set data.val_scans=[...] or "
            "--set data.val_fraction=0.2 (the pairs are cut from scans held out of training)"
        )
    validator = PairValidator(args.bank, cfg, val_ids, torch.device("cpu"))
    ceil = ceiling_rows(validator.batches)
    sizes = np.array([r["voxels"] for r in ceil])
    names = ["reference view"] + [f"ceiling L{lv}" for lv in LEVELS]
    columns = {c: [r[c] for r in ceil] for c in names}
    floor = load_network("random", cfg.model.preset, seed=cfg.seed)
    columns["untrained"] = [r["dice"] for r in network_dice(floor.model, validator.batches, False)]
    readout_level = floor.model.spec.readout_level
    if trained is not None:
        rows = network_dice(trained.model, validator.batches, True)
        columns["network"] = [r["dice"] for r in rows]
        columns["best threshold"] = [r["best"] for r in rows]
    table = summary(columns, sizes)
    result = {"bank": args.bank, "val_scans": val_ids, "pairs": args.pairs,
              "preset": cfg.model.preset, "readout_level": readout_level, "bins": table}  # fmt: skip
    overall = table[0]
    if trained is not None:
        result["network_vs_ceiling"] = overall["network"] / max(
            overall[f"ceiling L{readout_level}"], 1e-9
        )
        result["network_vs_untrained"] = overall["network"] / max(overall["untrained"], 1e-9)
    return result


def print_table(result: dict) -> None:
    cols = [c for c in result["bins"][0] if c not in ("bin", "tasks")]
    print(f"held-out pairs: {result['pairs']} from {', '.join(result['val_scans'])}; "
          f"preset {result['preset']} (readout level {result['readout_level']})")  # fmt: skip
    print(f"{'target voxels':>14} {'tasks':>6} " + " ".join(f"{c:>14}" for c in cols))
    for row in result["bins"]:
        print(f"{row['bin']:>14} {row['tasks']:>6} " + " ".join(f"{row[c]:>14.3f}" for c in cols))
    for key in ("network_vs_ceiling", "network_vs_untrained"):
        if key in result:
            print(f"{key}: {result[key]:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bank", required=True, help="a bank with proposals")
    p.add_argument("--checkpoint", help="a pretraining run folder or checkpoint file")
    p.add_argument(
        "--config",
        help="training config (preset name or YAML); default: the checkpoint's, else tiny",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    p.add_argument("--pairs", type=int, default=48, help="validation pairs (default 48)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
