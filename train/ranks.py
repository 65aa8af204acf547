"""Where a training process runs among its ranks, and what the ranks decide together.

``setup_distributed`` reads torchrun's environment (one rank without it) and joins the
process group; ``any_rank`` turns per-rank flags into one decision every rank takes (one
rank alone skipping or stopping would hang the others); ``Preemption`` turns SIGTERM into
such a flag, checked between steps; ``weights_hash`` lets a checkpoint show that every
rank held the same weights.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


class Preemption:
    """Turns SIGTERM into a flag checked between steps (all ranks stop at the same step).

    Signal handlers can only be installed from the main thread: elsewhere (a library
    caller's worker thread) ``install`` does nothing and SIGTERM keeps its handler."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._old)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        self.requested = True


def any_rank(flags: torch.Tensor) -> list[bool]:
    """Element-wise "true on any rank" of a vector of 0/1 flags: one all-reduce, so that
    every rank takes the same decision (one rank alone skipping or stopping hangs the rest)."""
    flags = flags.float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags)
    return [bool(v > 0) for v in flags.tolist()]


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its rank among ``world`` ranks and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> tuple[Placement, bool]:
    """This process's rank and device from torchrun's environment, and whether this call
    joined the process group (the caller then leaves it: ``dist.destroy_process_group``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    joined = world > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Placement(rank, world, device), joined


def weights_hash(model: torch.nn.Module) -> str:
    """Hash of all parameters' bytes: lets a checkpoint prove every rank held the same weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
