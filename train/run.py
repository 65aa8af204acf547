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
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python train/run.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from train.checkpointing import (
    check_resume,
    find_checkpoint,
    load_checkpoint,
    non_finite_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from train.cpu_kernels import retain_freed_memory
from train.incontext_net import count_parameters
from train.lamb_optim import Lamb
from train.pair_sampler import PairStream, SamplerConfig, SamplerError, make_loader
from train.paired_augment import NONE, PairAugmenter
from train.pretext import Pretext, PretextOutput, create_pretext
from train.run_config import dump_config, load_config
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
        raise ValueError(
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


def setup_distributed() -> tuple[int, int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return rank, world, local, device


def build_optimizer(model: torch.nn.Module, opt: dict[str, Any]) -> torch.optim.Optimizer:
    # No weight decay on norms, biases and tokens (1-D tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": float(opt["weight_decay"])},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    name = str(opt["name"]).lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=float(opt["lr"]), betas=tuple(opt["betas"]))
    if name == "lamb":
        return Lamb(groups, lr=float(opt["lr"]), betas=tuple(opt["betas"]))
    raise ValueError(f"optim.name must be adamw or lamb, got {opt['name']!r}")


def one_cycle(step: int, max_steps: int, warmup_frac: float, floor: float = 0.01) -> float:
    """LR factor: linear warm-up to 1, then cosine down to ``floor`` (a one-cycle policy).

    Written out instead of OneCycleLR, which divides by zero for very short runs.
    """
    warm = max(1, round(warmup_frac * max_steps))
    if step < warm:
        return (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, max_steps - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer, opt: dict[str, Any], max_steps: int):
    frac = float(opt["warmup_frac"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: one_cycle(step, int(max_steps), frac)
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


def train(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    cfg = load_config(args.config, args.overrides)
    pretext = create_pretext(str(cfg["pretext"]), cfg)
    out = Path(args.out)
    rank, world, _local, device = setup_distributed()
    is_main = rank == 0
    preempt = Preemption()
    preempt.install()
    tcfg, dcfg = cfg["train"], cfg["data"]
    max_steps = int(tcfg["max_steps"])

    ckpt = None
    if args.resume or args.resume_from:
        ckpt_path = find_checkpoint(args.resume_from or "auto", out)
        ckpt = load_checkpoint(ckpt_path)
        check_resume(ckpt_path, ckpt, cfg, world)  # same pretext, preset, batch, K, crop, ranks
    start_step = int(ckpt["step"]) if ckpt else 0
    skipped = int(ckpt.get("skipped_steps", 0)) if ckpt else 0
    in_a_row = int(ckpt.get("skipped_in_a_row", 0)) if ckpt else 0
    max_skipped = int(tcfg["max_skipped_steps"])
    nan_cfg = tcfg["debug_nan"]
    nan_steps = {int(x) for x in nan_cfg["steps"] or ()}
    if nan_cfg["ranks"] is not None and rank not in {int(r) for r in nan_cfg["ranks"]}:
        nan_steps = set()

    torch.manual_seed(int(cfg["seed"]))  # identical initial weights on every rank
    model = pretext.build_model(cfg["model"]["preset"]).to(device)
    crop = int(dcfg["crop"])
    if crop % model.min_size:
        raise ValueError(f"data.crop={crop} must be a multiple of {model.min_size} for this model")
    scfg = SamplerConfig.from_config(dcfg)
    stream = PairStream(
        args.bank,
        scfg,
        seed=int(cfg["seed"]),
        rank=rank,
        world_size=world,
        start_batch=start_step,
        compact=True,  # float16 images / int16 bit fields: half the bytes (same values)
    )
    if ckpt and ckpt.get("bank_fingerprint") != stream.fingerprint and is_main:
        print(
            f"warning: bank fingerprint {stream.fingerprint} differs from the checkpoint's "
            f"{ckpt.get('bank_fingerprint')}: the data stream will not match the original run",
            file=sys.stderr,
        )
    loader = make_loader(
        stream,
        int(dcfg["num_workers"]),
        int(dcfg["prefetch_factor"]),
        pin_memory=device.type == "cuda",
        timeout=float(dcfg["worker_timeout"]),
    )
    ema = WeightEMA(model, float(tcfg["ema_decay"]))
    optimizer = build_optimizer(model, cfg["optim"])
    scheduler = build_scheduler(optimizer, cfg["optim"], max_steps)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if tcfg["compile"]:
        net = torch.compile(net)
    aug_on = str(cfg["augment"]["device"])
    aug_device = device if aug_on == "auto" else torch.device(aug_on)
    augmenter = (
        PairAugmenter(crop) if cfg["augment"]["enabled"] else PairAugmenter(crop, NONE, NONE)
    )
    use_bf16 = bool(tcfg["bf16"]) and device.type == "cuda"

    writer = None
    metrics_fh = None
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create --out {out}: {exc}; choose a writable path") from exc
        (out / "config.yaml").write_text(dump_config(cfg))
        metrics_fh = open(out / "metrics.jsonl", "a" if ckpt else "w")  # noqa: SIM115 (closed in finally)
        if tcfg["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        print(
            f"pretext {pretext.name}; model {cfg['model']['preset']}: "
            f"{count_parameters(model) / 1e6:.2f} M params; "
            f"{len(stream.scan_ids)} scans; world {world}; device {device}; "
            f"steps {start_step}->{max_steps}",
            file=sys.stderr,
        )

    def checkpoint(step: int) -> None:
        # Skipped steps keep non-finite updates out of the weights; should some still get in
        # (an optimiser dividing by zero), no rank writes them: every resume would fail.
        bad = non_finite_tensors({"model": model.state_dict(), "ema": ema.state_dict()})
        if any_rank(torch.tensor([float(bool(bad))], device=device))[0]:
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
            if is_main and len(set(hashes)) > 1:
                print(f"warning: ranks' weights differ at step {step}: {hashes}", file=sys.stderr)
        if not is_main:
            return
        save_checkpoint(
            out / "checkpoints",
            step,
            {
                "step": step,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": stream.state_dict(step),
                "rng": rngs if world > 1 else rng_state(),
                "bank_fingerprint": stream.fingerprint,
                "bank": args.bank,
                "config": cfg,
                "world_size": world,
                "rank_weight_hashes": hashes,  # one per rank; DDP keeps them identical
                "skipped_steps": skipped,
                "skipped_in_a_row": in_a_row,
            },
            keep_last=int(tcfg["keep_last"]),
        )

    bar = None
    if is_main and tcfg["progress"] and start_step < max_steps:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=start_step, desc="pretrain", dynamic_ncols=True)
    n_tasks = scfg.n_tasks
    pairs_per_step = scfg.batch_size * world
    step = start_step
    preempted = False
    batches = iter(loader)
    watchdog = LoaderWatchdog(batches, float(dcfg["worker_timeout"]))
    model.train()
    acc_data = acc_dt = 0.0  # accumulated since the last logged step
    acc_steps = 0
    try:
        while step < max_steps:
            t0 = time.perf_counter()
            batch = watchdog.next()
            batch = {k: v.to(aug_device, non_blocking=True) for k, v in batch.items()}
            t_data = time.perf_counter() - t0
            gen = augment_generator(int(cfg["seed"]), step, rank, aug_device)
            aug = augmenter(batch, n_tasks, gen)
            aug = {k: v.to(device, non_blocking=True) for k, v in aug.items()}
            # The pretext's loss; the same generator draws its randomness (exact resume).
            result = pretext(net, aug, gen, use_bf16)
            loss, parts = result.loss, result.parts
            inject = step + 1 in nan_steps
            if inject and nan_cfg["target"] == "loss":
                loss = loss * float("nan")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if inject and nan_cfg["target"] == "grad":  # finite loss, this rank's grads only
                grad = next(p.grad for p in model.parameters() if p.grad is not None)
                grad.view(-1)[0] = float("nan")
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), float(cfg["optim"]["grad_clip"])
            )
            # clip_grad_norm_'s norm is non-finite when any gradient is. Every rank learns
            # whether any rank saw a non-finite loss or gradient (and SIGTERM) in one
            # all-reduce, so all skip or step together and stop at the same step.
            local_bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
            stop_flag = torch.tensor(float(preempt.requested), device=local_bad.device)
            skip, preempt_now = any_rank(torch.stack([local_bad.float(), stop_flag]))
            if skip:
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                in_a_row += 1
            else:
                optimizer.step()
                ema.update(model)
                in_a_row = 0
            scheduler.step()  # the schedule follows the step count, skipped or not
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            acc_data += t_data
            acc_dt += time.perf_counter() - t0
            acc_steps += 1
            if is_main and (step % int(tcfg["log_every"]) == 0 or step == max_steps or skip):
                rec = {
                    "step": step,
                    "loss": _finite_or_none(float(loss.detach())),
                    **parts,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": _finite_or_none(float(grad_norm)),
                    # throughput and data wait averaged over the steps since the last log
                    "pairs_per_s": pairs_per_step * acc_steps / acc_dt,
                    "data_wait": acc_data / acc_dt,
                    "step_s": acc_dt / acc_steps,
                    "skipped_steps": skipped,  # so far, on all ranks together
                }
                rec.update({k: _finite_or_none(float(v)) for k, v in parts.items()})
                acc_data = acc_dt = 0.0
                acc_steps = 0
                if device.type == "cuda":
                    rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                metrics_fh.write(json.dumps(rec) + "\n")
                metrics_fh.flush()
                if writer is not None:
                    for key in (
                        "loss",
                        *parts,
                        "lr",
                        "pairs_per_s",
                        "data_wait",
                        "grad_norm",
                        "skipped_steps",
                    ):
                        if rec[key] is not None:
                            writer.add_scalar(f"train/{key}", rec[key], step)
                    if "gpu_mem_gb" in rec:
                        writer.add_scalar("train/gpu_mem_gb", rec["gpu_mem_gb"], step)
                    if step % int(tcfg["image_every"]) == 0:
                        log_images(writer, step, pretext, aug, result)
                if bar is not None:
                    shown = "nan" if rec["loss"] is None else f"{rec['loss']:.3f}"
                    bar.set_postfix(loss=shown, wait=f"{rec['data_wait']:.0%}", skipped=skipped)
            if bar is not None:
                bar.update(1)
            if max_skipped > 0 and in_a_row >= max_skipped:
                raise TrainingError(
                    f"{in_a_row} steps in a row (up to step {step}) had a non-finite loss or "
                    f"gradients and were skipped; the weights are those of step "
                    f"{step - in_a_row}. Lower optim.lr, check the bank for non-finite images "
                    "(maskbank verify BANK), or resume from an earlier checkpoint "
                    "(train.max_skipped_steps sets how many in a row are tolerated)"
                )
            if preempt_now:
                preempted = True
                checkpoint(step)
                break
            if step % int(tcfg["ckpt_every"]) == 0 or step == max_steps:
                checkpoint(step)
    except RuntimeError as exc:
        if not _loader_failure(exc):
            raise
        _kill_workers(batches)
        timeout = float(dcfg["worker_timeout"])
        if "timed out" in str(exc) or watchdog.fired:
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
        raise TrainingError(
            f"data loading failed at step {step}: {str(exc).splitlines()[0]}: {what}; "
            "resume with --resume"
        ) from exc
    finally:
        if bar is not None:
            bar.close()
        if metrics_fh is not None:
            metrics_fh.close()
        if writer is not None:
            writer.close()
        preempt.restore()
        watchdog.stop()
    if is_main:
        msg = "preempted: checkpoint written" if preempted else "done"
        print(f"{msg} at step {step}; resume with --resume" if preempted else msg, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python train/run.py`, torchrun and `maskbank pretrain`."""
    args = parse_args(argv)
    retain_freed_memory()  # batches and augmented pairs reuse freed buffers (no page faults)
    try:
        return train(args)
    except (SamplerError, TrainingError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
