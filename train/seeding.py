"""One way to seed: every random stream of the library derives from a key of ints and strings.

A key such as ``(seed, "finetune", step)`` names a stream; the same key gives the same numbers
in numpy and torch, on any process, and different keys give independent streams
(``numpy.random.SeedSequence`` spreads them). Library code never seeds the global torch RNG
for its own use: it takes a ``torch.Generator`` from :func:`torch_generator`, or wraps a
seeded initialisation in :func:`seeded_torch`, which restores the caller's RNG state after.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

Key = int | str


def _entropy(key: Sequence[Key]) -> list[int]:
    """Non-negative 32-bit words for SeedSequence; strings by CRC-32, ints wrapped to 32 bits
    only when negative or wider (so ``(seed, sample_id)`` keeps the stream it always had)."""
    words = []
    for part in key:
        if isinstance(part, str):
            words.append(zlib.crc32(part.encode()))
        elif isinstance(part, bool | int | np.integer):
            value = int(part)
            words.append(value if value >= 0 else value & 0xFFFFFFFF)
        else:
            raise TypeError(f"seed key parts are ints or strings, not {type(part).__name__}")
    return words


def seed_sequence(*key: Key) -> np.random.SeedSequence:
    """The SeedSequence of a key."""
    if not key:
        raise ValueError("a seed key needs at least one part (e.g. the run's seed)")
    return np.random.SeedSequence(_entropy(key))


def numpy_rng(*key: Key) -> np.random.Generator:
    """A numpy Generator for the key (``numpy_rng(a, b)`` == ``default_rng([a, b])``)."""
    return np.random.default_rng(seed_sequence(*key))


def torch_seed(*key: Key) -> int:
    """A 63-bit torch seed for the key."""
    hi, lo = seed_sequence(*key).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & (2**63 - 1)


def torch_generator(*key: Key, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch Generator for the key, on ``device``."""
    return torch.Generator(device=device).manual_seed(torch_seed(*key))


@contextmanager
def seeded_torch(*key: Key) -> Iterator[None]:
    """Seed torch's global RNG (CPU and the current CUDA devices) inside the block only.

    For code that draws from the global RNG and takes no generator, such as module
    initialisation: the weights are a function of the key, and the caller's RNG stream
    continues afterwards as if the block had not run.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(torch_seed(*key))
        yield
