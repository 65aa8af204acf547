"""A small labelled bank (CT phantoms: the same organs in every subject) and a checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from maskbank.flows.demo_bank import _normalise

SHAPE = (48, 48, 40)


def write_labelled_phantoms(
    path: Path,
    n: int = 4,
    dataset: str = "phantom-ct",
    edit: Callable[[int, dict, dict], None] | None = None,
) -> str:
    """``n`` CT phantoms (seeds 0..n-1) with organ labels, names and a 'lesion' metadata.

    ``edit(seed, arrays, attrs)`` may change a scan before it is written (another label
    map, names, source hash or a ``subject`` in its metadata).
    """
    from maskbank.bank import Bank
    from maskbank.pipeline.phantom import NAMES, make_phantom

    bank = Bank.create(path)
    for seed in range(n):
        lesions = 2 if seed % 2 else 0
        ph = make_phantom("ct", shape=SHAPE, spacing=(2.0, 2.0, 2.0), seed=seed, n_lesions=lesions)
        attrs = {
            "dataset": dataset,
            "modality": "ct",
            "spacing": list(ph.spacing),
            "affine": ph.affine.tolist(),
            "source_path": f"phantom://ct/{seed}",
            "source_sha256": f"phantom-ct-{seed}",
            "fingerprint": "phantom",
            "label_names": {str(v): name for v, name in NAMES.items() if (ph.labels == v).any()},
            "metadata": {"lesion": "yes" if lesions else "no"},
        }
        arrays = {"image": _normalise(ph.image, ph.body), "body": ph.body, "label": ph.labels}
        if edit is not None:
            edit(seed, arrays, attrs)
        bank.write_scan(f"ct-{seed:02d}", arrays, attrs)
    return str(path)


@pytest.fixture(scope="session")
def labelled_bank(tmp_path_factory) -> str:
    return write_labelled_phantoms(tmp_path_factory.mktemp("eval") / "bank")


@pytest.fixture(scope="session")
def tiny_checkpoint(phantom_bank, tmp_path_factory) -> Path:
    """A `tiny` network pretrained for a few steps (CPU, seconds): OUT/checkpoints/last.pt."""
    from maskbank.train.run import main

    out = tmp_path_factory.mktemp("eval") / "run"
    argv = ["--config", "tiny", "--bank", phantom_bank, "--out", str(out)]
    assert main([*argv, "train.max_steps=4", "train.progress=false"]) == 0
    path = out / "checkpoints" / "last.pt"
    assert path.exists()
    return path
