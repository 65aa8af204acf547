"""Where `open_bank_scans` used to live; it is in `flows.commands.options` now."""

from flows.commands.options import open_bank_scans

__all__ = ["open_bank_scans"]
