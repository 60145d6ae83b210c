"""Pictures a person looks at, drawn with Pillow: image grids (palette previews, samples,
completions) and line charts (loss curves, probe accuracy per layer)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, ncols: int, scale: int = 1, pad: int = 1,
               background: int = 255) -> np.ndarray:
    """images (N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, ncols*(W+pad)+pad, 3) uint8 grid, row
    by row, each image enlarged `scale` times with nearest-neighbour so single pixels stay visible."""
    images = np.asarray(images, dtype=np.uint8)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    N, H, W, _ = images.shape
    nrows = -(-N // ncols)
    grid = np.full((nrows * (H + pad) + pad, ncols * (W + pad) + pad, 3), background, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y:y + H, x:x + W] = img
    return grid


def save_png(array: np.ndarray, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path
