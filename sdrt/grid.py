"""Tile images into one picture, captioned by nothing but their order (rows x columns)."""

from __future__ import annotations

import numpy as np


def tile(images: list[np.ndarray], columns: int, gap: int = 2) -> np.ndarray:
    """images: equal-sized (H, W, 3) uint8 -> one (rows*(H+gap)-gap, columns*(W+gap)-gap, 3) uint8 grid, white gaps."""
    h, w, _ = images[0].shape
    rows = -(-len(images) // columns)
    grid = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = image
    return grid
