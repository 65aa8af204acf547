"""Streaming pretraining of an in-context segmentation network on a mask bank.

Entry points: ``train.run.main(argv) -> int`` (also ``python train/run.py`` and
torchrun), ``train.pair_sampler.PairStream`` (the IterableDataset),
``train.incontext_net.build_model(preset)``, ``train.augment.PairAugmenter``.
See train/README.md. Imports torch, numpy and ``bank`` only (no Prefect/Dask).
"""
