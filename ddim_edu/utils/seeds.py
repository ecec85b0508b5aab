"""Seeds derived from one user seed, so that independent streams of randomness never overlap."""
from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(seed: int, *key: int) -> int:
    """A 64-bit seed for the stream named by the integers ``key`` (e.g. (stream, item)), from ``seed``.

    numpy's ``SeedSequence(seed, spawn_key=key)`` hashes the pair, so distinct keys give statistically
    independent seeds, and the value is stable across numpy versions (it is part of numpy's API).
    """
    return int(np.random.SeedSequence(seed % 2**64, spawn_key=key).generate_state(1, np.uint64)[0])
