"""Image grids: many images tiled into one picture, for sample sheets and ``grid.png``."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..utils.files import atomic_write
from .data import float_to_pixels

__all__ = ["make_grid", "save_png", "show_rows", "tile"]


def tile(pixels: np.ndarray, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 images [B, H, W, C] into one uint8 array [rows·(H+p)+p, nrow·(W+p)+p, C].

    ``nrow`` images per row (default ``ceil(sqrt(B))``); ``padding`` pixels of ``pad_value`` between
    and around them.
    """
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4 or len(pixels) < 1:
        raise ValueError(f"pixels must be a uint8 array [B, H, W, C] with B >= 1, got {getattr(pixels, 'shape', type(pixels))}")
    B, H, W, C = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = np.full((rows * (H + padding) + padding, nrow * (W + padding) + padding, C), pad_value, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[top:top + H, left:left + W] = pixels[i]
    return grid


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """:func:`tile` for float images [B, C, H, W] in [-1, 1] (C = 1 grey or 3 RGB), mapped to pixels first."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(f"images must be a tensor [B, C, H, W] with C in (1, 3) and B >= 1, got {getattr(images, 'shape', images)}")
    return tile(float_to_pixels(images.cpu()).permute(0, 2, 3, 1).numpy(), nrow, padding, pad_value)


def save_png(grid: np.ndarray, path) -> Path:
    """Write a uint8 picture [H, W, C] (C = 1 or 3) as a PNG, atomically (through matplotlib); returns the path."""
    import matplotlib.image

    path = Path(path)
    with atomic_write(path) as f:
        matplotlib.image.imsave(f, grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255, format="png")
    return path


def show_rows(ax, rows, labels, *, title: str = "", xlabel: str = "", column_labels=None, padding: int = 1) -> None:
    """Draw image batches as labelled rows on a matplotlib Axes ``ax``.

    ``rows``: batches [K, C, H, W] in [-1, 1] (clamped), one row each, labelled ``labels`` on the left;
    ``column_labels`` (K of them) under the columns, or no ticks there. Grey images (C = 1) in grey.
    """
    K, C, H, W = rows[0].shape
    grid = make_grid(torch.cat([r.clamp(-1, 1) for r in rows]), nrow=K, padding=padding)
    ax.imshow(grid[..., 0] if C == 1 else grid, cmap="gray" if C == 1 else None, vmin=0, vmax=255)
    ax.set_yticks([padding + (H + padding) * r + (H - 1) / 2 for r in range(len(rows))], labels)
    ax.set_xticks([padding + (W + padding) * c + (W - 1) / 2 for c in range(K)] if column_labels else [],
                  list(column_labels) if column_labels else [], fontsize=8)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
