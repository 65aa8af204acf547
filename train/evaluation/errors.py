"""The one error type of evaluation: a clear message for the user, never a traceback."""

from __future__ import annotations


class EvaluationError(ValueError):
    """The bank, checkpoint or options cannot give this evaluation (says what to do)."""
