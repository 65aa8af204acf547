"""What the in-context network keeps of a reference: ``TaskEmbedding``.

Evaluation and segmentation encode a reference once and reuse its embedding for every
window of every query, several shots averaged, tasks of different references joined; so
the embedding is a value with its own algebra (broadcast, mean, select, concatenate),
apart from the network that makes and reads it (``train.incontext_net``). With the
propagation readout it also holds the reference's memory (``train.readout``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def _pad_positions(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad memory positions (axis ``dim``) to ``length``; zero keys are never attended."""
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _align_memory(
    parts: list[TaskEmbedding],
) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Keys (per task, padded) and masks (padded) of ``parts`` ready to concatenate."""
    if any(p.mem_keys is None for p in parts):
        if any(p.mem_keys is not None for p in parts):
            raise ValueError("cannot join task embeddings with and without a readout memory")
        return None
    length = max(p.mem_masks.shape[-1] for p in parts)
    shared = all(p.mem_keys is parts[0].mem_keys for p in parts) and (
        parts[0].mem_keys.shape[1] == 1
    )
    keys = []
    for p in parts:
        k = p.mem_keys if shared else p.mem_keys.expand(-1, p.n_tasks, -1, -1)
        keys.append(_pad_positions(k, length, 2))
    masks = [_pad_positions(p.mem_masks, length, 2) for p in parts]
    return keys, masks


@dataclass
class TaskEmbedding:
    """What the network keeps of a reference: per task, tokens at each token level + fg0.

    ``tokens[level]`` is (N, K, 1 + n_query_tokens, C_level) and ``fg0`` (N, K, C_0).
    With the propagation readout also its memory: ``mem_keys`` (N, 1 or K, L, C_key), the
    reference's unit keys at the readout level (1: shared by every task), and ``mem_masks``
    (N, K, L), each task's reference mask occupancy there (``train.readout``).
    """

    tokens: dict[int, torch.Tensor]
    fg0: torch.Tensor
    mem_keys: torch.Tensor | None = None
    mem_masks: torch.Tensor | None = None

    @property
    def n_tasks(self) -> int:
        return self.fg0.shape[1]

    def _memory(
        self, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.mem_keys is None:
            return None, None
        return fn(self.mem_keys), fn(self.mem_masks)

    def expand(self, n: int) -> TaskEmbedding:
        """Broadcast a batch-1 embedding to batch ``n`` (no copy)."""
        if self.fg0.shape[0] == n:
            return self
        if self.fg0.shape[0] != 1:
            raise ValueError(f"task batch {self.fg0.shape[0]} cannot serve a query batch of {n}")
        return TaskEmbedding(
            {lv: t.expand(n, *t.shape[1:]) for lv, t in self.tokens.items()},
            self.fg0.expand(n, *self.fg0.shape[1:]),
            *self._memory(lambda t: t.expand(n, *t.shape[1:])),
        )

    def mean(self) -> TaskEmbedding:
        """Average over the batch (several reference shots of the same tasks) -> batch 1.

        The readout memory is not averaged but joined: the positions of every shot, so a
        query voxel can match any shot. Tasks whose masks are all ones (the global task)
        keep the first shot's memory: they propagate ones wherever they match.
        """
        mem_keys = mem_masks = None
        if self.mem_keys is not None:
            s, k, length = self.mem_masks.shape
            padding = self.mem_keys.abs().sum(-1) == 0  # (S, Km, L), Km 1 or K
            if bool(((self.mem_masks == 1) | padding).all()):
                mem_keys, mem_masks = self.mem_keys[:1], self.mem_masks[:1]
            else:
                keys = self.mem_keys.transpose(0, 1)  # (Km, S, L, C)
                mem_keys = keys.reshape(keys.shape[0], s * length, -1)[None]
                mem_masks = self.mem_masks.transpose(0, 1).reshape(k, s * length)[None]
        return TaskEmbedding(
            {lv: t.mean(0, keepdim=True) for lv, t in self.tokens.items()},
            self.fg0.mean(0, keepdim=True),
            mem_keys,
            mem_masks,
        )

    def select(self, tasks: list[int]) -> TaskEmbedding:
        """A subset of tasks, in the given order."""
        idx = torch.as_tensor(tasks, device=self.fg0.device)
        mem_keys = mem_masks = None
        if self.mem_keys is not None:
            shared = self.mem_keys.shape[1] == 1
            mem_keys = self.mem_keys if shared else self.mem_keys.index_select(1, idx)
            mem_masks = self.mem_masks.index_select(1, idx)
        return TaskEmbedding(
            {lv: t.index_select(1, idx) for lv, t in self.tokens.items()},
            self.fg0.index_select(1, idx),
            mem_keys,
            mem_masks,
        )

    @staticmethod
    def cat(parts: list[TaskEmbedding]) -> TaskEmbedding:
        """Concatenate along the task axis (same batch size)."""
        levels = parts[0].tokens
        memory = _align_memory(parts)
        mem_keys = mem_masks = None
        if memory is not None:
            keys, masks = memory
            mem_keys = keys[0] if all(k is keys[0] for k in keys) else torch.cat(keys, 1)
            mem_masks = torch.cat(masks, 1)
        return TaskEmbedding(
            {lv: torch.cat([p.tokens[lv] for p in parts], 1) for lv in levels},
            torch.cat([p.fg0 for p in parts], 1),
            mem_keys,
            mem_masks,
        )

    @staticmethod
    def cat_batch(parts: list[TaskEmbedding]) -> TaskEmbedding:
        """Stack along the batch axis (e.g. several shots of the same tasks, for ``mean``)."""
        levels = parts[0].tokens
        memory = _align_memory(parts)
        mem_keys = mem_masks = None
        if memory is not None:
            keys, masks = memory
            if len({k.shape[1] for k in keys}) > 1:
                keys = [k.expand(-1, parts[0].n_tasks, -1, -1) for k in keys]
            mem_keys, mem_masks = torch.cat(keys, 0), torch.cat(masks, 0)
        return TaskEmbedding(
            {lv: torch.cat([p.tokens[lv] for p in parts], 0) for lv in levels},
            torch.cat([p.fg0 for p in parts], 0),
            mem_keys,
            mem_masks,
        )

    def to(self, *args, **kwargs) -> TaskEmbedding:
        return TaskEmbedding(
            {lv: t.to(*args, **kwargs) for lv, t in self.tokens.items()},
            self.fg0.to(*args, **kwargs),
            *self._memory(lambda t: t.to(*args, **kwargs)),
        )
