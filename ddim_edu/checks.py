"""Input checks shared by the public entry points: one message format for every parameter."""
from __future__ import annotations

import numbers


def check_int(name: str, value, minimum: int = 1) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
