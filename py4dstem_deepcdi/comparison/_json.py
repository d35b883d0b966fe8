"""JSON helpers of the comparison's summaries: numpy values to plain Python, and a JSON-ability test."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def plain(value: Any) -> Any:
    """``value`` with numpy scalars/arrays turned into Python numbers/lists (JSON-able), recursively through dicts,
    lists and tuples (tuples become lists); other values are returned unchanged."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def jsonable(value: Any) -> bool:
    """Whether ``json.dumps`` accepts ``value`` as it is."""
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
