"""Regenerate the frozen toy samples ``toy_data/<name>.csv`` from the generators in ddim_edu.toy.datasets.

Run from the repository root:  python toy_data/make_toy_data.py
Each file holds N points drawn with a fresh ``torch.Generator().manual_seed(SEED)``, written with
a header ``x,y`` and 6 decimals. The tests re-draw them with the same SEED and N and compare.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, so ddim_edu imports without installing

from ddim_edu.toy.datasets import DATASETS  # noqa: E402

SEED = 2021  # differs from the training default seed 0, so the frozen files are held out
N = 2000


def frozen_sample(name: str) -> torch.Tensor:
    """The sample stored in ``<name>.csv``: N points from a generator seeded with SEED."""
    return DATASETS[name](N, generator=torch.Generator().manual_seed(SEED))


def to_csv(points: torch.Tensor) -> str:
    """Header ``x,y`` and one ``%.6f,%.6f`` row per point."""
    rows = [f"{x:.6f},{y:.6f}" for x, y in points.tolist()]
    return "x,y\n" + "\n".join(rows) + "\n"


def main() -> None:
    for name in DATASETS:
        path = HERE / f"{name}.csv"
        path.write_text(to_csv(frozen_sample(name)))
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
