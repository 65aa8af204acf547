"""train.seeding: one key, one stream, in numpy and torch, without touching the global RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskbank.train.seeding import numpy_rng, seed_sequence, seeded_torch, torch_generator


def test_numpy_stream_matches_default_rng_of_the_same_ints() -> None:
    assert numpy_rng(7, 12).integers(0, 1 << 30, 5).tolist() == (
        np.random.default_rng([7, 12]).integers(0, 1 << 30, 5).tolist()
    )


def test_keys_name_independent_reproducible_streams() -> None:
    a = torch.rand(4, generator=torch_generator(1, "finetune", 3))
    b = torch.rand(4, generator=torch_generator(1, "finetune", 3))
    c = torch.rand(4, generator=torch_generator(1, "finetune", 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert numpy_rng(1, "probe").random() != numpy_rng(1, "finetune").random()


def test_seeded_torch_restores_the_callers_stream() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with seeded_torch(5, "init"):
        w1 = torch.nn.Linear(3, 2).weight.detach().clone()
    assert torch.equal(torch.rand(3), expected)  # as if the block had not run
    with seeded_torch(5, "init"):
        w2 = torch.nn.Linear(3, 2).weight.detach().clone()
    assert torch.equal(w1, w2)


def test_bad_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        seed_sequence()
    with pytest.raises(TypeError, match="ints or strings"):
        seed_sequence(1.5)  # type: ignore[arg-type]
