"""Held-out pair validation: is the pretext being learnt on scans the network never saw?

The training loss mixes easy and hard pairs and moves with the stream; it cannot say
whether the network segments a structure it was shown once, or predicts nothing where the
structure is absent. This module keeps a fixed, seeded set of reference/query pairs cut
from scans excluded from training (``data.val_scans``, or ``data.val_fraction`` of the
scans chosen by id hash, stable as a bank grows) and scores the EMA weights -- what
evaluation loads -- on them every ``train.val_every`` steps:

* ``val_dice``: mean Dice (threshold 0.5) over tasks whose structure is in the query crop;
* ``val_vol_ratio``: median predicted / true volume over those tasks, and
  ``val_vol_in_range`` the share of them within [0.5, 2];
* ``val_absent_clean``: share of tasks absent from the query with no voxel predicted, and
  ``val_absent_fp``: mean fraction of the crop predicted on them;
* ``val_seen_share``: mean share of a present target's voxels that the reference crop
  shows (``train.reference_view``; the rest lies outside it, all of it on the pairs whose
  query lies beside the reference); ``val_dice_view``: Dice with prediction and target
  cut to that view (tasks with a target there), what matching the reference can recover;
  ``val_dice_seen``: the Dice of an exact copy of that view (target cut to it, against the
  whole target) -- about the most ``val_dice`` reaches without guessing a structure beyond
  what the reference showed;
* ``val_absent_share``: share of absent tasks in the set (``VAL_DISJOINT`` of its pairs
  have a query beside the reference, ``VAL_ABSENT`` of the other pairs' tasks miss it), so
  runs with different training absence settings are scored on the same kind of pairs.

The global all-ones task is left out of every number (it is trivial). A PNG of a few pairs
(reference with its mask, query with target and prediction) is written beside the numbers.
This module imports torch, numpy and the sampler only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskbank.train.augment import PairAugmenter
from maskbank.train.pair_sampler import PairStream, SamplerError, open_bank
from maskbank.train.reference_view import reference_view
from maskbank.train.run_config import DataConfig, TrainConfig
from maskbank.train.scan_choice import gc_paused
from maskbank.train.seeding import torch_generator

VAL_SEED = 0x7A11D  # the validation pairs do not depend on the run's seed
VAL_DISJOINT = 0.25  # share of validation pairs whose query lies beside the reference
VAL_ABSENT = 0.2  # share of the other pairs' tasks drawn among proposals missing the query
FILL_COVER = 0.9  # a mask covering this much of its crop fills it


def fills_crop(masks: torch.Tensor, cover: float = FILL_COVER) -> torch.Tensor:
    """(N, K, *S) bool -> (N, K) bool: the mask covers >= ``cover`` of its crop or touches all
    six faces, so it shows no boundary to learn the structure's extent from."""
    m = masks.bool()
    covers = m.flatten(2).float().mean(-1) >= cover
    faces = torch.ones_like(covers)
    for axis in (2, 3, 4):
        for index in (0, -1):
            faces &= m.select(axis, index).flatten(2).any(-1)
    return covers | faces


def _hash_key(scan_id: str) -> str:
    return hashlib.sha256(scan_id.encode()).hexdigest()


def split_scans(bank, data: DataConfig) -> tuple[tuple[str, ...] | None, list[str]]:
    """(training scan ids, or None for all; validation scan ids, possibly none).

    ``data.val_scans`` names them (they may lie outside ``data.scans``); otherwise
    ``data.val_fraction`` of the training scans (at least one), the lowest id hashes.
    Training keeps every other scan; none left is an error.
    """
    ids = bank.scan_ids  # sorted, as the rows were; no copy of every row
    pool = list(data.scans) if data.scans is not None else ids
    if data.val_scans:
        missing = sorted(set(data.val_scans) - set(ids))
        if missing:
            raise SamplerError(f"data.val_scans not in bank {bank.location!r}: {missing}")
        val = list(data.val_scans)
    elif data.val_fraction > 0:
        n = max(1, round(data.val_fraction * len(pool)))
        val = sorted(sorted(pool, key=_hash_key)[:n])
    else:
        return data.scans, []
    held_out = set(val)
    train = tuple(s for s in pool if s not in held_out)
    if not train:
        raise SamplerError(
            f"no training scans left after holding out {len(val)} for validation "
            "(data.val_scans / data.val_fraction)"
        )
    return train, val


def _dice(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    inter = (pred & tgt).flatten(2).sum(-1).float()
    total = pred.flatten(2).sum(-1).float() + tgt.flatten(2).sum(-1).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


class PairValidator:
    """Fixed validation pairs (built once, augmented with a fixed generator) and their scores."""

    def __init__(
        self,
        bank: str,
        cfg: TrainConfig,
        scan_ids: list[str],
        device: torch.device,
        augment: bool = True,
    ) -> None:
        self.device = device
        scfg = replace(
            cfg.data,
            scans=tuple(scan_ids),
            disjoint_frac=VAL_DISJOINT,
            absent_frac=VAL_ABSENT,
            max_ref_fill=1.0,  # references as they come, filling ones included
            pairs_per_scan_visit=1,  # the same pairs whatever the training stream's visits
        )
        stream = PairStream(bank, scfg, seed=VAL_SEED, compact=True)
        self.scan_ids = list(scan_ids)
        self.n_tasks = scfg.n_tasks
        augmenter = PairAugmenter(scfg.crop, geometry=True)
        if not augment:
            from maskbank.train.augment import NONE

            augmenter = PairAugmenter(scfg.crop, NONE, NONE, geometry=True)
        self.batches: list[dict[str, torch.Tensor]] = []
        n = cfg.train.val_pairs
        for b in range(math.ceil(n / scfg.batch_size)):
            gen = torch_generator(VAL_SEED, "validation", b)
            raw = stream.batch(b)
            aug = augmenter(raw, scfg.n_tasks, gen)
            aug["ref_view"] = reference_view(
                raw["ref_start"], raw["query_start"], scfg.read_size,
                aug.pop("ref_affine"), aug.pop("query_affine"), scfg.crop,
            )  # fmt: skip
            keep = min(scfg.batch_size, n - b * scfg.batch_size)
            self.batches.append({k: v[:keep] for k, v in aug.items()})
        if isinstance(bank, str):
            self.location = bank
        else:
            self.location = getattr(bank, "location", str(bank))

    @torch.no_grad()
    def predict(self, model: nn.Module) -> list[torch.Tensor]:
        """Boolean predictions (threshold 0.5) of every batch, (n, K + 1, *S) each."""
        was_training = model.training
        model.eval()
        try:
            out = []
            for batch in self.batches:
                logits = model(
                    batch["ref_image"].to(self.device),
                    batch["ref_masks"].to(self.device),
                    batch["query_image"].to(self.device),
                )
                out.append((logits > 0).cpu())
            return out
        finally:
            model.train(was_training)

    def score(self, model: nn.Module) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Aggregate metrics (``val_*``) and one row per (pair, task) of the fixed set."""
        preds = self.predict(model)
        rows: list[dict[str, Any]] = []
        for b, (batch, pred) in enumerate(zip(self.batches, preds, strict=True)):
            tgt = batch["query_masks"][:, :-1].bool()
            pr = pred[:, :-1]
            dice = _dice(pr, tgt)
            true_v = tgt.flatten(2).sum(-1)
            pred_v = pr.flatten(2).sum(-1)
            fill = fills_crop(batch["ref_masks"][:, :-1])
            view = batch["ref_view"][:, None]
            seen = tgt & view  # the target where the reference crop shows the query
            seen_v = seen.flatten(2).sum(-1)
            dice_view = _dice(pr & view, seen)
            dice_seen = _dice(seen, tgt)
            for i in range(tgt.shape[0]):
                for k in range(tgt.shape[1]):
                    rows.append(
                        {
                            "pair": b * len(self.batches[0]["ref_image"]) + i,
                            "task": k,
                            "true_voxels": int(true_v[i, k]),
                            "pred_voxels": int(pred_v[i, k]),
                            "dice": float(dice[i, k]),
                            "ref_fills": bool(fill[i, k]),
                            "seen_voxels": int(seen_v[i, k]),
                            "dice_view": float(dice_view[i, k]),
                            "dice_seen": float(dice_seen[i, k]),
                        }
                    )
        return summarise(rows, int(np.prod(self.batches[0]["ref_image"].shape[-3:]))), rows

    def figure(self, model: nn.Module, path: Path, n: int = 4) -> None:
        """PNG of the first ``n`` pairs: reference + mask, query + target (green),
        prediction (red) and the reference's view (cyan, dashed), mid-slice of the first
        task present in the query."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        preds = self.predict(model)
        pairs = []
        for batch, pred in zip(self.batches, preds, strict=True):
            for i in range(batch["ref_image"].shape[0]):
                pairs.append((batch, pred, i))
        pairs = pairs[:n]
        fig, axes = plt.subplots(len(pairs), 2, figsize=(4, 2 * len(pairs)), squeeze=False)
        for row, (batch, pred, i) in zip(axes, pairs, strict=True):
            tgt = batch["query_masks"][i, :-1]
            present = tgt.flatten(1).any(-1).nonzero().flatten()
            k = int(present[0]) if len(present) else 0
            z = int(batch["ref_masks"][i, k].sum((0, 1)).argmax())
            zq = int(tgt[k].sum((0, 1)).argmax()) if len(present) else z
            ref = batch["ref_image"][i, 0, :, :, z].T.numpy()
            row[0].imshow(ref, cmap="gray", origin="lower")
            ref_mask = batch["ref_masks"][i, k, :, :, z].T.float().numpy()
            if ref_mask.any():
                row[0].contour(ref_mask, [0.5], colors="y")
            row[1].imshow(
                batch["query_image"][i, 0, :, :, zq].T.numpy(), cmap="gray", origin="lower"
            )
            view = batch["ref_view"][i, :, :, zq]
            if view.any() and not view.all():  # where the reference crop looked
                row[1].contour(view.T.float().numpy(), [0.5], colors="c", linestyles="dashed")
            for mask, colour in ((tgt[k], "g"), (pred[i, k], "r")):
                if mask[:, :, zq].any():
                    row[1].contour(mask[:, :, zq].T.float().numpy(), [0.5], colors=colour)
            row[0].set_title(f"ref task {k}", fontsize=7)
            row[1].set_title(
                "query: target g, pred r, ref. view c" + ("" if len(present) else " (absent)"),
                fontsize=7,
            )
            for ax in row:
                ax.axis("off")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
        plt.close(fig)


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else math.nan


def summarise(rows: list[dict[str, Any]], crop_voxels: int) -> dict[str, float]:
    """The ``val_*`` numbers of a set of (pair, task) rows (see the module docstring)."""
    present = [r for r in rows if r["true_voxels"] > 0]
    absent = [r for r in rows if r["true_voxels"] == 0]
    ratios = [r["pred_voxels"] / r["true_voxels"] for r in present]
    out: dict[str, float] = {
        "val_dice": _mean([r["dice"] for r in present]),
        "val_vol_ratio": float(np.median(ratios)) if ratios else math.nan,
        "val_vol_in_range": _mean([0.5 <= x <= 2 for x in ratios]),
        "val_absent_share": len(absent) / max(len(rows), 1),
        "val_absent_clean": _mean([r["pred_voxels"] == 0 for r in absent]),
        "val_absent_fp": _mean([r["pred_voxels"] / crop_voxels for r in absent]),
        "val_ref_fill": _mean([r["ref_fills"] for r in rows]),
    }
    if rows and "seen_voxels" in rows[0]:  # pairs with their geometry (``PairValidator``)
        out["val_seen_share"] = _mean([r["seen_voxels"] / r["true_voxels"] for r in present])
        out["val_dice_view"] = _mean([r["dice_view"] for r in present if r["seen_voxels"]])
        out["val_dice_seen"] = _mean([r["dice_seen"] for r in present])
    return out


def headline(numbers: dict[str, float]) -> str:
    """The validation numbers a progress line shows."""
    line = f"held-out pair Dice {numbers['val_dice']:.3f}"
    if "val_dice_view" in numbers:
        line += (
            f" ({numbers['val_dice_view']:.3f} inside the reference's view; an exact copy of"
            f" that view scores {numbers['val_dice_seen']:.3f})"
        )
    return (
        f"{line}, volume ratio {numbers['val_vol_ratio']:.2f}, "
        f"absent clean {numbers['val_absent_clean']:.2f}"
    )


def write_record(metrics_file, writer, step: int, numbers: dict[str, float]) -> None:
    """One metrics.jsonl row (``step`` + the ``val_*`` numbers, non-finite as null) and the
    same scalars in TensorBoard under ``val/``."""
    rec = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in numbers.items()}}
    metrics_file.write(json.dumps(rec) + "\n")
    metrics_file.flush()
    if writer is not None:
        for key, value in numbers.items():
            if math.isfinite(value):
                writer.add_scalar(f"val/{key.removeprefix('val_')}", value, step)


def resolve_validation(bank: Any, data: DataConfig) -> tuple[tuple[str, ...] | None, list[str]]:
    """``split_scans`` on ``bank``, an open bank or its location (then opened read-only),
    with the collector held while its rows are read (see `gc_paused`)."""
    with gc_paused():
        return split_scans(open_bank(bank) if isinstance(bank, (str, os.PathLike)) else bank, data)
