"""Pretrain a 3D network on pairs streamed from a bank (in-context segmentation by default).

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
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python train/run.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from train.augment import NONE, PairAugmenter
from train.checkpointing import (
    CheckpointError,
    check_resume,
    find_checkpoint,
    load_checkpoint,
    non_finite_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from train.incontext_net import count_parameters
from train.lamb_optim import Lamb
from train.memory_policy import retain_freed_memory
from train.pair_sampler import PairStream, SamplerConfig, SamplerError, make_loader
from train.pretext import Pretext, PretextError, PretextOutput, create_pretext
from train.run_config import ConfigError, OptimConfig, TrainConfig, dump_config
from train.weight_ema import WeightEMA


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


class Preemption:
    """Turns SIGTERM into a flag checked between steps (all ranks stop at the same step)."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def install(self) -> None:
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def any_rank(flags: torch.Tensor) -> list[bool]:
    """Element-wise "true on any rank" of a vector of 0/1 flags: one all-reduce, so that
    every rank takes the same decision (one rank alone skipping or stopping hangs the rest)."""
    flags = flags.float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags)
    return [bool(v > 0) for v in flags.tolist()]


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_out_dir(out: str) -> None:
    """The run directory is renamed into and fsync'd: only a local or mounted path will do."""
    if URL.match(out):
        raise ConfigError(
            f"--out {out} is a URL; the run directory (checkpoints written with atomic "
            "renames and fsync) must be a local or mounted path: train into e.g. runs/NAME "
            f"and copy it to {out} afterwards"
        )


def _finite_or_none(value: float) -> float | None:
    """metrics.jsonl stays strict JSON: NaN and inf are written as null."""
    return value if math.isfinite(value) else None


def _loader_failure(exc: BaseException) -> bool:
    """torch reports a dead or timed-out DataLoader worker as a plain RuntimeError (a worker's
    own exception is re-raised as itself, starting "Caught ...", and left alone)."""
    msg = str(exc)
    return type(exc) is RuntimeError and msg.startswith(
        ("DataLoader worker (pid", "DataLoader timed out")
    )


def _kill_workers(batches: Any) -> None:
    """A hung worker ignores SIGTERM (see ``make_loader``), and Python's exit would join it
    forever: kill what is left of the loader's workers.

    torch's SIGCHLD handler would then raise "worker killed" into the main thread at some
    later moment (a traceback and exit 1 after our message), so the loader's workers are
    first taken off its watch list, as torch's own shutdown does.
    """
    from torch.utils.data._utils import signal_handling

    if getattr(batches, "_worker_pids_set", False):
        signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for w in getattr(batches, "_workers", ()):
        if w.is_alive():
            w.kill()


class LoaderWatchdog:
    """Kills the loader's workers when the trainer has waited for a batch far past the timeout.

    torch's own ``timeout`` cannot fire while the main thread is blocked reading a batch
    that a worker stopped half-way through writing (a SIGSTOP'd or wedged worker): the
    read never returns. Killing the workers ends that read, and the run stops with the
    timed-out message instead of hanging.
    """

    def __init__(self, batches: Any, timeout: float) -> None:
        # A weak reference: the iterator must be collected when training ends, which is
        # what shuts its workers down (they ignore SIGTERM, so nothing else would).
        self._batches = weakref.ref(batches)
        self.limit = 2 * timeout + 5
        self.waiting_since: float | None = None
        self.fired = False
        self._stop = threading.Event()
        if timeout > 0 and getattr(batches, "_workers", None):
            threading.Thread(target=self._watch, daemon=True, name="loader-watchdog").start()

    def next(self) -> Any:
        self.waiting_since = time.monotonic()
        try:
            return next(self._batches())
        except (OSError, EOFError) as exc:
            # A worker killed half-way through handing over a batch (by this watchdog or
            # by the OOM killer) breaks the shared-memory hand-over itself: report that as
            # the loader failure it is, not as a socket error. A worker's own OSError (a
            # missing chunk, say) comes here too, with every worker alive: left alone.
            why = self._describe(exc)
            if why is None:
                raise
            raise RuntimeError(why) from exc
        finally:
            self.waiting_since = None

    def _describe(self, exc: BaseException) -> str | None:
        err = f"{type(exc).__name__}: {exc}"
        if self.fired:
            return f"DataLoader timed out after {self.limit:g} s ({err})"
        batches = self._batches()
        dead = [w.pid for w in getattr(batches, "_workers", ()) if not w.is_alive()]
        if not dead:
            return None
        pids = ", ".join(map(str, dead))
        return f"DataLoader worker (pid(s) {pids}) exited unexpectedly ({err})"

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            since = self.waiting_since
            batches = self._batches()
            if batches is None:
                return
            if since is not None and time.monotonic() - since > self.limit:
                self.fired = True
                _kill_workers(batches)
                return
            del batches


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its rank among ``world`` ranks and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Placement:
    """This process's rank and device from torchrun's environment; joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Placement(rank, world, device)


def build_optimizer(
    model: torch.nn.Module, opt: OptimConfig | Mapping[str, Any]
) -> torch.optim.Optimizer:
    """AdamW or LAMB; ``opt`` is the typed ``optim`` section or its dict form."""
    opt = opt if isinstance(opt, OptimConfig) else OptimConfig.from_dict(opt)
    # No weight decay on norms, biases and tokens (1-D tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": opt.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = {"adamw": torch.optim.AdamW, "lamb": Lamb}[opt.name]
    return optimizer(groups, lr=opt.lr, betas=opt.betas)


def one_cycle(step: int, max_steps: int, warmup_frac: float, floor: float = 0.01) -> float:
    """LR factor: linear warm-up to 1, then cosine down to ``floor`` (a one-cycle policy).

    Written out instead of OneCycleLR, which divides by zero for very short runs.
    """
    warm = max(1, round(warmup_frac * max_steps))
    if step < warm:
        return (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, max_steps - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, opt: OptimConfig, max_steps: int):
    frac = opt.warmup_frac
    # A lambda, not a callable object: LambdaLR then keeps nothing of it in its state dict.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: one_cycle(step, max_steps, frac)
    )


def augment_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """Per-step generator: augmentations depend only on (seed, step, rank) -> exact resume."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step * 1_009 + rank) % (2**63 - 1))
    return gen


def log_images(
    writer, step: int, pretext: Pretext, aug: dict[str, torch.Tensor], out: PretextOutput
) -> None:
    """The pretext's mid-slice tiles of the first pair, side by side (in-context: reference /
    reference mask / query / target / prediction; reconstruction: masked / mask / output /
    target)."""
    tag, tiles = pretext.image_tiles(aug, out)
    grid = torch.cat([t.detach().float().cpu() for t in tiles], dim=1)
    writer.add_image(tag, grid[None], step)


def weights_hash(model: torch.nn.Module) -> str:
    """Hash of all parameters' bytes: lets a checkpoint prove every rank held the same weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def checkpoint_to_resume(
    args: argparse.Namespace, cfg: TrainConfig, world: int
) -> dict[str, Any] | None:
    """The checkpoint ``--resume``/``--resume-from`` names, checked against this run's config
    (same pretext, preset, batch, K, crop and ranks); None for a fresh run."""
    if not (args.resume or args.resume_from):
        return None
    path = find_checkpoint(args.resume_from or "auto", Path(args.out))
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


@dataclass
class StepOutcome:
    """What one optimisation step produced (for the log) and decided (skip, stop)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    result: PretextOutput
    aug: dict[str, torch.Tensor]
    skipped: bool
    preempted: bool


def prepare_run_dir(out: Path, cfg: TrainConfig) -> None:
    """Create the run directory and write the resolved config.yaml."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --out {out}: {exc}; choose a writable path") from exc
    (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")


class RunLog:
    """The main rank's record of a run: metrics.jsonl, TensorBoard and the progress bar.

    Throughput and data wait are averaged over the steps since the last record.
    """

    def __init__(
        self,
        out: Path,
        cfg: TrainConfig,
        pretext: Pretext,
        device: torch.device,
        start_step: int,
        pairs_per_step: int,
        resumed: bool,
    ) -> None:
        self.tcfg, self.pretext, self.device = cfg.train, pretext, device
        self.pairs_per_step = pairs_per_step
        self.acc_data = self.acc_dt = 0.0  # accumulated since the last record
        self.acc_steps = 0
        self.metrics = open(out / "metrics.jsonl", "a" if resumed else "w", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self.writer = None
        self.bar = None
        if self.tcfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"))
        if self.tcfg.progress and start_step < self.tcfg.max_steps:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.tcfg.max_steps, initial=start_step, desc="pretrain", dynamic_ncols=True
            )

    def after_step(
        self, step: int, outcome: StepOutcome, t_data: float, t_step: float, lr: float, skipped: int
    ) -> None:
        """Account for the step just taken; record it when due (and every skipped step)."""
        self.acc_data += t_data
        self.acc_dt += t_step
        self.acc_steps += 1
        due = step % self.tcfg.log_every == 0 or step == self.tcfg.max_steps
        if due or outcome.skipped:
            self._record(step, outcome, lr, skipped)
        if self.bar is not None:
            self.bar.update(1)

    def _record(self, step: int, outcome: StepOutcome, lr: float, skipped: int) -> None:
        parts = outcome.result.parts
        rec = {
            "step": step,
            "loss": _finite_or_none(float(outcome.loss.detach())),
            **parts,
            "lr": lr,
            "grad_norm": _finite_or_none(float(outcome.grad_norm)),
            "pairs_per_s": self.pairs_per_step * self.acc_steps / self.acc_dt,
            "data_wait": self.acc_data / self.acc_dt,
            "step_s": self.acc_dt / self.acc_steps,
            "skipped_steps": skipped,  # so far, on all ranks together
        }
        rec.update({k: _finite_or_none(float(v)) for k, v in parts.items()})
        self.acc_data = self.acc_dt = 0.0
        self.acc_steps = 0
        if self.device.type == "cuda":
            rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            self._write_tensorboard(step, rec, outcome)
        if self.bar is not None:
            shown = "nan" if rec["loss"] is None else f"{rec['loss']:.3f}"
            self.bar.set_postfix(loss=shown, wait=f"{rec['data_wait']:.0%}", skipped=skipped)

    def _write_tensorboard(self, step: int, rec: dict[str, Any], outcome: StepOutcome) -> None:
        parts = outcome.result.parts
        keys = ("loss", *parts, "lr", "pairs_per_s", "data_wait", "grad_norm", "skipped_steps")
        for key in keys:
            if rec[key] is not None:
                self.writer.add_scalar(f"train/{key}", rec[key], step)
        if "gpu_mem_gb" in rec:
            self.writer.add_scalar("train/gpu_mem_gb", rec["gpu_mem_gb"], step)
        if step % self.tcfg.image_every == 0:
            log_images(self.writer, step, self.pretext, outcome.aug, outcome.result)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()


def loader_failure_error(exc: RuntimeError, step: int, timeout: float, timed_out: bool):
    """The TrainingError for a dead or hung DataLoader worker, saying what to do."""
    if timed_out or "timed out" in str(exc):
        what = (
            f"a DataLoader worker timed out: no batch for data.worker_timeout={timeout:g} s "
            "(hung, e.g. on the bank's storage); check the storage, or raise "
            "data.worker_timeout (0 waits forever)"
        )
    else:
        what = (
            "a DataLoader worker died (often the out-of-memory killer: lower "
            "data.num_workers or data.prefetch_factor; data.num_workers=0 shows a "
            "worker's own error in the main process)"
        )
    return TrainingError(
        f"data loading failed at step {step}: {str(exc).splitlines()[0]}: {what}; "
        "resume with --resume"
    )


class Trainer:
    """One pretraining run on one rank: built in named steps, then ``run()`` to max_steps."""

    def __init__(
        self, args: argparse.Namespace, cfg: TrainConfig, place: Placement, preempt: Preemption
    ) -> None:
        self.cfg, self.place, self.preempt = cfg, place, preempt
        self.out, self.bank = Path(args.out), args.bank
        self.pretext = create_pretext(cfg.pretext, cfg)
        self.ckpt = checkpoint_to_resume(args, cfg, place.world)
        self.progress = Progress.of(self.ckpt)
        self.nan_steps = cfg.train.debug_nan.applies_to(place.rank)
        self.model = self._build_model()
        self.stream = self._open_stream()
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

    # ------------------------------------------------------------------ building
    def _build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every rank
        model = self.pretext.build_model(self.cfg.model.preset).to(self.place.device)
        crop = self.cfg.data.crop
        if crop % model.min_size:
            raise ConfigError(
                f"data.crop={crop} must be a multiple of {model.min_size} for this model"
            )
        return model

    def _open_stream(self) -> PairStream:
        stream = PairStream(
            self.bank,
            SamplerConfig.from_config(self.cfg.data),
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
        gen = augment_generator(self.cfg.seed, step, self.place.rank, self.aug_device)
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
            if not _loader_failure(exc):
                raise
            _kill_workers(batches)
            timeout, step = self.cfg.data.worker_timeout, self.progress.step
            raise loader_failure_error(exc, step, timeout, watchdog.fired) from exc
        finally:
            if log is not None:
                log.close()
            watchdog.stop()

    def _loop(self, watchdog: LoaderWatchdog, log: RunLog | None) -> bool:
        p, tcfg = self.progress, self.cfg.train
        while p.step < tcfg.max_steps:
            t0 = time.perf_counter()
            batch = {
                k: v.to(self.aug_device, non_blocking=True) for k, v in watchdog.next().items()
            }
            t_data = time.perf_counter() - t0
            outcome = self._train_step(batch, p.step)
            p.step += 1
            if self.place.device.type == "cuda":
                torch.cuda.synchronize()
            if log is not None:
                lr = self.scheduler.get_last_lr()[0]
                log.after_step(p.step, outcome, t_data, time.perf_counter() - t0, lr, p.skipped)
            self._stop_if_diverged()
            if outcome.preempted:
                self._checkpoint(p.step)
                return True
            if p.step % tcfg.ckpt_every == 0 or p.step == tcfg.max_steps:
                self._checkpoint(p.step)
        return False


def train(args: argparse.Namespace) -> int:
    """Configure, build and run one training process (one rank under torchrun)."""
    check_out_dir(args.out)
    cfg = TrainConfig.load(args.config, args.overrides)
    place = setup_distributed()
    preempt = Preemption()
    preempt.install()
    try:
        trainer = Trainer(args, cfg, place, preempt)
        preempted = trainer.run()
    finally:
        preempt.restore()
    if place.is_main:
        step = trainer.progress.step
        done = f"preempted: checkpoint written at step {step}; resume with --resume"
        print(done if preempted else "done", file=sys.stderr)
    return 0


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


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python train/run.py`, torchrun and `maskbank pretrain`."""
    args = parse_args(argv)
    retain_freed_memory()  # batches and augmented pairs reuse freed buffers (no page faults)
    try:
        return train(args)
    except USAGE_ERRORS as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
