"""Errors of `maskbank segment` that stop the whole run (the CLI's exit 2)."""

from __future__ import annotations


class SegmentError(ValueError):
    """Unusable arguments: a checkpoint, reference, task file or label choice that cannot work.

    A query that cannot be segmented is not one of these: it fails alone, with its reason.
    """
