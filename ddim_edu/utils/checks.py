"""Input checks shared by the public entry points: one message format for every parameter."""
from __future__ import annotations

import numbers

import torch

__all__ = ["check_int", "resolve_device"]


def check_int(name: str, value, minimum: int = 1) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def resolve_device(device=None) -> torch.device:
    """``device`` (default: cuda if available, else cpu) as a torch.device this torch can compute on, or ValueError."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:  # unknown name, or a backend this build or machine lacks
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"device {name!r} (--device) cannot be used here ({reason}); "
                         f"this torch has CUDA: {torch.cuda.is_available()}; try 'cpu'") from None
    if device.type == "meta":  # shapes without data: nothing can be computed on it
        raise ValueError(f"device {name!r} (--device) cannot be used here (it holds shapes, no data); "
                         f"this torch has CUDA: {torch.cuda.is_available()}; try 'cpu'")
    return device
