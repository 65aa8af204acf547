"""Turn caller attributes (which may hold numpy scalars/arrays, tuples, Paths) into JSON."""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

import numpy as np


def to_jsonable(value: Any, where: str = "attrs") -> Any:
    """Recursively convert to JSON types; refuse NaN/inf, which zarr.json cannot hold portably."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), where)
    if isinstance(value, np.generic):
        return to_jsonable(value.item(), where)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}; attributes must be finite numbers")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where} has type {type(value).__name__}, which is not JSON-serialisable")
