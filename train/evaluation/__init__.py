"""Downstream evaluation: does the pretrained encoder help?

Three protocols, each one command (`maskbank evaluate ...`) on the user's own
labelled bank, with a baseline of the same budget beside it:

* ``incontext``: in-context few-shot segmentation of labelled structures;
* ``finetune``: label-efficient fine-tuning vs the same network from scratch;
* ``probe``: a frozen-encoder scan-level probe vs a random encoder.

Banks are read only through ``bank``; nothing here imports Prefect or Dask.
"""
