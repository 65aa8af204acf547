"""Streaming pretraining of an in-context segmentation network on a mask bank.

Entry points: ``maskbank.train.pretrain(config, bank, out) -> RunSummary`` (the library
function; ``config`` a ``train.run_config.TrainConfig``), ``train.run.main(argv) -> int``
(``python train/run.py`` and torchrun, which parse their arguments and call it),
``train.pair_sampler.PairStream`` (the IterableDataset), ``train.incontext_net.build_model(preset)``,
``train.augment.PairAugmenter``. See train/README.md. Imports torch, numpy and ``bank``
only (no Prefect/Dask); importing this package imports none of them (``pretrain`` and
``RunSummary`` load ``train.run`` on first use).
"""

from __future__ import annotations

from typing import Any

_LAZY = {"pretrain": "maskbank.train.run", "RunSummary": "maskbank.train.run"}

__all__ = ["RunSummary", "pretrain"]


def __getattr__(name: str) -> Any:
    """``pretrain`` and ``RunSummary`` from ``train.run``, imported on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
