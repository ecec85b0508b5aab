"""Seeds: independent streams derived from one user seed, and repeatable draws from one seed."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["derive_seed", "seeded_normal"]


def derive_seed(seed: int, *key: int) -> int:
    """A 64-bit seed for the stream named by the integers ``key`` (e.g. (stream, item)), from ``seed``.

    numpy's ``SeedSequence(seed, spawn_key=key)`` hashes the pair, so distinct keys give statistically
    independent seeds, and the value is stable across numpy versions (it is part of numpy's API).
    """
    return int(np.random.SeedSequence(seed % 2**64, spawn_key=key).generate_state(1, np.uint64)[0])


def seeded_normal(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Standard normal draws of the given shape from a generator seeded with ``seed`` alone (float64 by default):
    the same numbers on every run, e.g. the x_T ~ N(0, I) of an experiment that is to be repeated exactly."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
