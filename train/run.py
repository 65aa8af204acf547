"""Pretrain a 3D network on pairs streamed from a bank (in-context segmentation by default).

From Python: ``pretrain(TrainConfig.load("tiny", ["max_steps=20"]), BANK, DIR) -> RunSummary``
(also ``maskbank.train.pretrain``). The command line parses its arguments into a
``TrainConfig`` and calls it:

    python train/run.py --config tiny --bank BANK --out DIR [key=value ...]
    python train/run.py ... pretext=reconstruction  # masked-volume baseline, same budget
    torchrun --nproc_per_node=N train/run.py --config base --bank BANK --out DIR
    python train/run.py ... --resume            # continue DIR/checkpoints/last.pt exactly
    python train/run.py ... --resume-from CKPT  # or from a given checkpoint file

Writes DIR/config.yaml (resolved), DIR/metrics.jsonl (one JSON object per logged
step), DIR/tb/ (TensorBoard) and DIR/checkpoints/. On SIGTERM (preemption) the
current step finishes, a checkpoint is written and the process exits 0.

A step whose loss or gradients are not finite is skipped on every rank together;
``train.max_skipped_steps`` in a row, a hung or dead DataLoader worker, or weights that
are not finite at a checkpoint stop the run with exit 2 and a message (see train/README.md,
"Safety").
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from maskbank.train.augment import NONE, PairAugmenter
from maskbank.train.checkpointing import (
    CheckpointError,
    check_resume,
    find_checkpoint,
    load_checkpoint,
    non_finite_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from maskbank.train.evaluation.provenance import pretraining_scans
from maskbank.train.incontext_net import count_parameters
from maskbank.train.loader_watchdog import (
    LoaderWatchdog,
    is_loader_failure,
    kill_workers,
    loader_failure_message,
)
from maskbank.train.memory_policy import retain_freed_memory
from maskbank.train.optimizer_setup import build_optimizer, build_scheduler
from maskbank.train.pair_sampler import PairStream, SamplerError, make_loader, open_bank
from maskbank.train.pretext import PretextError, create_pretext
from maskbank.train.ranks import (
    Placement,
    Preemption,
    any_rank,
    setup_distributed,
    weights_hash,
)
from maskbank.train.run_config import ConfigError, TrainConfig, dump_config
from maskbank.train.run_log import RunLog, StepOutcome
from maskbank.train.seeding import seeded_torch, torch_generator
from maskbank.train.validation import PairValidator, headline, resolve_validation, write_record
from maskbank.train.weight_ema import WeightEMA


class TrainingError(RuntimeError):
    """The run cannot go on safely (diverged, hung data loading); the message says why."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", help="YAML file or preset name (tiny/small/base)")
    p.add_argument("--bank", required=True, help="bank path or fsspec URL")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--resume", action="store_true", help="continue exactly from OUT/checkpoints/last.pt"
    )
    p.add_argument("--resume-from", metavar="CKPT", help="continue from this checkpoint file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. max_steps=20")
    return p.parse_args(argv)


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_out_dir(out: str) -> None:
    """The run directory is renamed into and fsync'd: only a local or mounted path will do."""
    if URL.match(out):
        raise ConfigError(
            f"--out {out} is a URL; the run directory (checkpoints written with atomic "
            "renames and fsync) must be a local or mounted path: train into e.g. runs/NAME "
            f"and copy it to {out} afterwards"
        )


def checkpoint_to_resume(
    resume: str | None, out: Path, cfg: TrainConfig, world: int
) -> dict[str, Any] | None:
    """The checkpoint ``resume`` names ("auto": OUT/checkpoints/last.pt, or a file), checked
    against this run's config (same pretext, preset, batch, K, crop, proposal set and ranks);
    None for a fresh run."""
    if resume is None:
        return None
    path = find_checkpoint(resume, out)
    ckpt = load_checkpoint(path)
    check_resume(path, ckpt, cfg, world)
    return ckpt


@dataclass
class Progress:
    """Where the run stands: steps taken, and the non-finite steps skipped (checkpointed)."""

    step: int = 0
    skipped: int = 0  # in all, on all ranks together
    in_a_row: int = 0  # consecutive, up to the last step

    @classmethod
    def of(cls, ckpt: dict[str, Any] | None) -> Progress:
        if ckpt is None:
            return cls()
        return cls(
            int(ckpt["step"]),
            int(ckpt.get("skipped_steps", 0)),
            int(ckpt.get("skipped_in_a_row", 0)),
        )


def prepare_run_dir(out: Path, cfg: TrainConfig) -> None:
    """Create the run directory and write the resolved config.yaml."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --out {out}: {exc}; choose a writable path") from exc
    (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")


class Trainer:
    """One pretraining run on one rank: built in named steps, then ``run()`` to max_steps.

    ``resume``: None (a fresh run), "auto" (OUT/checkpoints/last.pt) or a checkpoint file."""

    def __init__(
        self,
        cfg: TrainConfig,
        bank: str,
        out: Path,
        place: Placement,
        preempt: Preemption,
        resume: str | None = None,
    ) -> None:
        if not isinstance(cfg, TrainConfig):  # e.g. an argparse.Namespace: parse it first
            raise TypeError(f"Trainer takes a TrainConfig, not {type(cfg).__name__}")
        self.cfg, self.place, self.preempt = cfg, place, preempt
        self.out, self.bank = Path(out), str(bank)
        self.pretext = create_pretext(cfg.pretext, cfg)
        self.ckpt = checkpoint_to_resume(resume, self.out, cfg, place.world)
        self.progress = Progress.of(self.ckpt)
        self.last_loss: torch.Tensor | None = None  # of the last step taken
        self.last_validation: dict[str, float] | None = None
        self.nan_steps = cfg.train.debug_nan.applies_to(place.rank)
        # The bank first, opened once for the split (validation scans held out of the stream),
        # the stream and the validator: a missing bank or scan fails before the model exists.
        opened = open_bank(self.bank)
        self.train_scans, self.val_scans = resolve_validation(opened, cfg.data)
        self.stream = self._open_stream(opened)
        self.model = self._build_model()
        self.loader = make_loader(
            self.stream,
            cfg.data.num_workers,
            cfg.data.prefetch_factor,
            pin_memory=place.device.type == "cuda",
            timeout=cfg.data.worker_timeout,
        )
        self.ema = WeightEMA(self.model, cfg.train.ema_decay)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        if self.ckpt is not None:
            self._restore(self.ckpt)
        self.net = self._wrap_for_training()
        self.aug_device = (
            place.device if cfg.augment.device == "auto" else torch.device(cfg.augment.device)
        )
        crop = cfg.data.crop
        self.augmenter = (
            PairAugmenter(crop) if cfg.augment.enabled else PairAugmenter(crop, NONE, NONE)
        )
        self.use_bf16 = cfg.train.bf16 and place.device.type == "cuda"
        self.validator = None
        if self.val_scans and place.is_main:
            self.validator = PairValidator(opened, cfg, self.val_scans, place.device)
            self.val_model = self.pretext.build_model(cfg.model.preset).to(place.device)

    # ------------------------------------------------------------------ building
    def _build_model(self) -> torch.nn.Module:
        # Identical initial weights on every rank, without seeding the caller's global RNG.
        with seeded_torch(self.cfg.seed, "init"):
            model = self.pretext.build_model(self.cfg.model.preset)
        model = model.to(self.place.device)
        crop = self.cfg.data.crop
        if crop % model.min_size:
            raise ConfigError(
                f"data.crop={crop} must be a multiple of {model.min_size} for this model"
            )
        return model

    def _open_stream(self, bank: Any) -> PairStream:
        data = self.cfg.data
        if self.val_scans:
            data = replace(data, scans=self.train_scans)
        stream = PairStream(
            bank,
            data,
            seed=self.cfg.seed,
            rank=self.place.rank,
            world_size=self.place.world,
            start_batch=self.progress.step,
            compact=True,  # float16 images / int16 bit fields: half the bytes (same values)
        )
        theirs = self.ckpt.get("bank_fingerprint") if self.ckpt else None
        if self.ckpt and theirs != stream.fingerprint and self.place.is_main:
            print(
                f"warning: bank fingerprint {stream.fingerprint} differs from the checkpoint's "
                f"{theirs}: the data stream will not match the original run",
                file=sys.stderr,
            )
        return stream

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Weights, EMA, optimiser, schedule and this rank's RNG states of the checkpoint."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        rngs = ckpt["rng"]
        set_rng_state(rngs[self.place.rank] if isinstance(rngs, list) else rngs)

    def _wrap_for_training(self) -> torch.nn.Module:
        """The model as the step calls it: DDP across ranks, compiled if asked."""
        net: torch.nn.Module = self.model
        device = self.place.device
        if self.place.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if self.cfg.train.compile:
            net = torch.compile(net)
        return net

    # ------------------------------------------------------------------ one step
    def _train_step(self, batch: dict[str, torch.Tensor], step: int) -> StepOutcome:
        """Augment, forward, backward, and update -- or skip, on every rank together."""
        device = self.place.device
        # Augmentations depend only on (seed, step, rank): exact resume.
        gen = torch_generator(
            self.cfg.seed, "augment", step, self.place.rank, device=self.aug_device
        )
        aug = self.augmenter(batch, self.stream.cfg.n_tasks, gen)
        aug = {k: v.to(device, non_blocking=True) for k, v in aug.items()}
        # The pretext's loss; the same generator draws its randomness (exact resume).
        result = self.pretext(self.net, aug, gen, self.use_bf16)
        inject = step + 1 in self.nan_steps
        target = self.cfg.train.debug_nan.target
        loss = result.loss * float("nan") if inject and target == "loss" else result.loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if inject and target == "grad":  # finite loss, this rank's grads only
            grad = next(p.grad for p in self.model.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("nan")
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.optim.grad_clip
        )
        # clip_grad_norm_'s norm is non-finite when any gradient is. Every rank learns
        # whether any rank saw a non-finite loss or gradient (and SIGTERM) in one
        # all-reduce, so all skip or step together and stop at the same step.
        local_bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        stop_flag = torch.tensor(float(self.preempt.requested), device=local_bad.device)
        skip, preempted = any_rank(torch.stack([local_bad.float(), stop_flag]))
        self._update(skip)
        self.scheduler.step()  # the schedule follows the step count, skipped or not
        return StepOutcome(loss, grad_norm, result, aug, skip, preempted)

    def _update(self, skip: bool) -> None:
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.skipped += 1
            self.progress.in_a_row += 1
        else:
            self.optimizer.step()
            self.ema.update(self.model)
            self.progress.in_a_row = 0

    def _stop_if_diverged(self) -> None:
        p, limit = self.progress, self.cfg.train.max_skipped_steps
        if limit > 0 and p.in_a_row >= limit:
            raise TrainingError(
                f"{p.in_a_row} steps in a row (up to step {p.step}) had a non-finite loss or "
                f"gradients and were skipped; the weights are those of step "
                f"{p.step - p.in_a_row}. Lower optim.lr, check the bank for non-finite images "
                "(maskbank verify BANK), or resume from an earlier checkpoint "
                "(train.max_skipped_steps sets how many in a row are tolerated)"
            )

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, step: int) -> None:
        """Every rank checks its weights and hands its RNG state over; rank 0 writes."""
        model, ema, world = self.model, self.ema, self.place.world
        # Skipped steps keep non-finite updates out of the weights; should some still get in
        # (an optimiser dividing by zero), no rank writes them: every resume would fail.
        bad = non_finite_tensors({"model": model.state_dict(), "ema": ema.state_dict()})
        if any_rank(torch.tensor([float(bool(bad))], device=self.place.device))[0]:
            where = ", ".join(bad[:3]) or "on another rank"
            raise TrainingError(
                f"the weights are not finite at step {step} ({where}); no checkpoint was "
                "written. Resume from the last checkpoint with a lower optim.lr"
            )
        rngs = [None] * world if world > 1 else None
        hashes = [weights_hash(model)]
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
            hashes = [None] * world
            dist.all_gather_object(hashes, weights_hash(model))
            if self.place.is_main and len(set(hashes)) > 1:
                print(f"warning: ranks' weights differ at step {step}: {hashes}", file=sys.stderr)
        if not self.place.is_main:
            return
        payload = {
            "step": step,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.stream.state_dict(step),
            "rng": rngs if world > 1 else rng_state(),
            "bank_fingerprint": self.stream.fingerprint,
            "bank": self.bank,
            "pretraining_scans": pretraining_scans(self.bank, self.stream.scan_ids),
            "config": self.cfg.to_dict(),
            "world_size": world,
            "rank_weight_hashes": hashes,  # one per rank; DDP keeps them identical
            "skipped_steps": self.progress.skipped,
            "skipped_in_a_row": self.progress.in_a_row,
        }
        save_checkpoint(self.out / "checkpoints", step, payload, self.cfg.train.keep_last)

    # ------------------------------------------------------------------ the loop
    def _open_log(self) -> RunLog | None:
        """Rank 0 only: the run directory, config.yaml, the log, and a one-line summary."""
        if not self.place.is_main:
            return None
        prepare_run_dir(self.out, self.cfg)
        start, max_steps = self.progress.step, self.cfg.train.max_steps
        pairs_per_step = self.cfg.data.batch_size * self.place.world
        log = RunLog(
            self.out,
            self.cfg,
            self.pretext,
            self.place.device,
            start,
            pairs_per_step,
            resumed=self.ckpt is not None,
        )
        print(
            f"pretext {self.pretext.name}; model {self.cfg.model.preset}: "
            f"{count_parameters(self.model) / 1e6:.2f} M params; "
            f"{len(self.stream.scan_ids)} scans; world {self.place.world}; "
            f"device {self.place.device}; steps {start}->{max_steps}",
            file=sys.stderr,
        )
        return log

    def run(self) -> bool:
        """Train to ``train.max_steps``; True when stopped early by preemption (checkpointed)."""
        log = self._open_log()
        # The iterator lives in this frame only: collecting it when training ends is what
        # shuts its workers down (the watchdog holds it weakly).
        batches = iter(self.loader)
        watchdog = LoaderWatchdog(batches, self.cfg.data.worker_timeout)
        self.model.train()
        try:
            return self._loop(watchdog, log)
        except RuntimeError as exc:
            if not is_loader_failure(exc):
                raise
            kill_workers(batches)
            timeout, step = self.cfg.data.worker_timeout, self.progress.step
            raise TrainingError(loader_failure_message(exc, step, timeout, watchdog.fired)) from exc
        finally:
            if log is not None:
                log.close()
            watchdog.stop()

    def _validate(self, step: int, log: RunLog) -> None:
        """Score the EMA weights (what evaluation loads) on the held-out pairs; rank 0 only."""
        self.ema.copy_to(self.val_model)
        numbers, _ = self.validator.score(self.val_model)
        self.last_validation = dict(numbers)
        write_record(log.metrics, log.writer, step, numbers)
        self.validator.figure(self.val_model, self.out / "val" / f"step_{step:08d}.png")
        if log.bar is not None:
            log.bar.write(f"step {step}: {headline(numbers)}")

    def _loop(self, watchdog: LoaderWatchdog, log: RunLog | None) -> bool:
        p, tcfg = self.progress, self.cfg.train
        while p.step < tcfg.max_steps:
            t0 = time.perf_counter()
            batch = {
                k: v.to(self.aug_device, non_blocking=True) for k, v in watchdog.next().items()
            }
            t_data = time.perf_counter() - t0
            outcome = self._train_step(batch, p.step)
            self.last_loss = outcome.loss.detach()
            p.step += 1
            if self.place.device.type == "cuda":
                torch.cuda.synchronize()
            if log is not None:
                lr = self.scheduler.get_last_lr()[0]
                log.after_step(p.step, outcome, t_data, time.perf_counter() - t0, lr, p.skipped)
            self._stop_if_diverged()
            due = p.step % tcfg.val_every == 0 or p.step == tcfg.max_steps
            if self.validator is not None and log is not None and due:
                self._validate(p.step, log)
            if outcome.preempted:
                self._checkpoint(p.step)
                return True
            if p.step % tcfg.ckpt_every == 0 or p.step == tcfg.max_steps:
                self._checkpoint(p.step)
        return False


@dataclass(frozen=True)
class RunSummary:
    """What one ``pretrain`` call did, as seen by this rank."""

    out: Path  # the run directory
    steps: int  # the step reached (a resumed run counts the checkpoint's steps too)
    start_step: int  # the step it started from (0, or the checkpoint's)
    final_loss: float | None  # this rank's loss at the last step taken (None: no step taken)
    checkpoint: Path | None  # OUT/checkpoints/last.pt when one was written (rank 0 writes)
    seconds: float
    validation: dict[str, float] | None  # the last held-out pair metrics (rank 0), if any
    preempted: bool = False  # stopped by SIGTERM, checkpoint written at ``steps``
    rank: int = 0

    @property
    def outcome(self) -> str:
        """The one line the command line ends with."""
        if self.preempted:
            return f"preempted: checkpoint written at step {self.steps}; resume with --resume"
        return "done"


def pretrain(
    config: TrainConfig,
    bank: str | os.PathLike | Any,
    out: str | os.PathLike,
    resume: str | os.PathLike | bool | None = None,
) -> RunSummary:
    """Pretrain as ``config`` says on ``bank`` (a path, fsspec URL or open ``Bank``) into the
    run directory ``out`` (local or mounted), and return what was done.

    ``resume``: None/False for a fresh run, True or "auto" for OUT/checkpoints/last.pt, or a
    checkpoint file. Under torchrun each process calls it with its rank from the environment
    (the process group is joined, and left, here). SIGTERM (preemption; main thread only)
    ends the step, writes a checkpoint and returns ``preempted``. Errors in how the run was
    asked for raise one of ``USAGE_ERRORS``, saying what to change. The process keeps freed
    memory for reuse (``memory_policy.retain_freed_memory``)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"pretrain takes a TrainConfig, not {type(config).__name__}")
    check_out_dir(str(out))
    location = str(getattr(bank, "location", bank))
    resume_from = "auto" if resume is True else (None if resume in (None, False) else str(resume))
    retain_freed_memory()  # batches and augmented pairs reuse freed buffers (no page faults)
    t0 = time.perf_counter()
    place, joined = setup_distributed()
    preempt = Preemption()
    preempt.install()
    try:
        trainer = Trainer(config, location, Path(out), place, preempt, resume_from)
        preempted = trainer.run()
    finally:
        preempt.restore()
        if joined and dist.is_initialized():
            dist.destroy_process_group()
    last = Path(out) / "checkpoints" / "last.pt"
    loss = trainer.last_loss
    return RunSummary(
        out=Path(out),
        steps=trainer.progress.step,
        start_step=Progress.of(trainer.ckpt).step,
        final_loss=None if loss is None else float(loss),
        checkpoint=last if last.exists() else None,
        seconds=time.perf_counter() - t0,
        validation=trainer.last_validation,
        preempted=preempted,
        rank=place.rank,
    )


# Errors in how the run was asked for (configuration, bank, checkpoint, run directory) or
# that stop it safely: exit 2 with their one-line message. Anything else is a bug and keeps
# its traceback.
USAGE_ERRORS = (
    ConfigError,
    CheckpointError,
    PretextError,
    SamplerError,
    TrainingError,
    FileNotFoundError,
)


def usage_error(exc: BaseException) -> int:
    """Print a usage error's message on one line of stderr; the exit status, 2."""
    message = " ".join(str(exc).split("\n"))
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """`python train/run.py` and torchrun: the arguments as a ``TrainConfig``, then ``pretrain``."""
    args = parse_args(argv)
    resume = args.resume_from or ("auto" if args.resume else None)
    try:
        config = TrainConfig.load(args.config, args.overrides)
        summary = pretrain(config, args.bank, args.out, resume)
    except USAGE_ERRORS as exc:
        return usage_error(exc)
    if summary.rank == 0:
        print(summary.outcome, file=sys.stderr)
    return 0


if __name__ == "__main__":
    # `python train/run.py` and torchrun: run the installed module, so that nothing
    # exists twice (once as __main__, once as maskbank.train.run)
    from maskbank.train.run import main as installed_main

    sys.exit(installed_main())
