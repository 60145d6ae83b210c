"""§3.2 Context reduction: a 9-bit colour palette, one token per pixel.

Image GPT does not model the 3 x 8 bits of a pixel: it clusters (R, G, B) values with k-means
(k = 512, "9-bit colour") and models the index of each pixel's nearest cluster centre, in raster order.

    u(p)      = p / 127.5 - 1                                pixels scaled to [-1, 1] (released code)
    centres   = k-means on u(p) over pixels sampled from the training split (k-means++ start, Lloyd)
                (images with at most k distinct colours: those colours, one centre each)
    encode(p) = argmin_k ||u(p) - c_k||^2                    exact nearest centre, lowest k on ties
    decode(k) = round(127.5 (c_k + 1))                       back to 8-bit colour

Lloyd's iterations run on the distinct colours of the sample, each weighted by how often it occurs:
the same objective as on every sampled pixel, on far fewer points. The nearest-centre search is the
numba kernel palette_kernels.palette_lookup, which checks only the centres that can win in the pixel's cell of
an RGB grid (`palette_grid`), so it is exact and fast; large inputs read a table of all 2^24 colours.

Preview what the palette does to real images:
    python -m minigpt_img.palette --preview palette.png --data cifar10 --data-dir ../shared/data
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import palette_kernels
from .streams import generator

GRID_SHIFT = 4                    # cells of 16 intensity levels per channel
GRID_LEVELS = 256 >> GRID_SHIFT   # a 16 x 16 x 16 grid over the RGB cube


def to_unit(pixels) -> np.ndarray:
    """uint8 -> float in [-1, 1], as the released code scales pixels."""
    return np.asarray(pixels, dtype=np.float64) / 127.5 - 1.0


def palette_grid(centers: np.ndarray, shift: int = GRID_SHIFT):
    """For each cell of the RGB grid, the centres that may be nearest to some colour in the cell:
    those whose smallest distance to the cell is at most the smallest largest-distance of any centre.
    -> (cell_start (cells+1,), cell_items) in CSR form, items in increasing centre index."""
    levels, side = 256 >> shift, 1 << shift
    lo = to_unit(np.arange(levels) * side)                     # (levels,) cell's lowest value
    hi = to_unit(np.arange(levels) * side + side - 1)          # (levels,) and highest
    lower = np.zeros((levels, len(centers), 3))                # per channel: squared distance bounds
    upper = np.zeros((levels, len(centers), 3))
    for ch in range(3):
        c = centers[None, :, ch]
        lower[:, :, ch] = np.maximum(0.0, np.maximum(lo[:, None] - c, c - hi[:, None])) ** 2
        upper[:, :, ch] = np.maximum(np.abs(c - lo[:, None]), np.abs(c - hi[:, None])) ** 2
    # sum the three channels over the whole grid: (levels, levels, levels, K)
    lb = lower[:, None, None, :, 0] + lower[None, :, None, :, 1] + lower[None, None, :, :, 2]
    ub = upper[:, None, None, :, 0] + upper[None, :, None, :, 1] + upper[None, None, :, :, 2]
    keep = lb.reshape(-1, len(centers)) <= ub.reshape(-1, len(centers)).min(axis=1, keepdims=True) + 1e-9
    cell_start = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
    cell_items = np.nonzero(keep)[1].astype(np.int64)          # row-major: increasing index per cell
    return cell_start, cell_items


class Palette:
    """k colours (k, 3) in [-1, 1] with exact nearest-colour encoding and decoding.

    Small inputs are encoded by the grid kernel directly. Inputs of a million pixels or more first
    build a table of the token of all 2^24 8-bit colours (about a second, by the same kernel core, so
    the results are identical) and then read one table entry per pixel."""

    TABLE_FROM = 1 << 20  # pixels in one call from which building the table pays off

    def __init__(self, centers):
        self.centers = np.ascontiguousarray(check_palette(centers, "palette"))  # (k, 3)
        self._c64 = self.centers.astype(np.float64)
        self._grid = palette_grid(self._c64)
        self._table = None

    def __len__(self) -> int:
        return len(self.centers)

    def nearest(self, pixels: np.ndarray):
        """pixels (..., 3) uint8 -> (tokens (...) uint16, squared distances (...) float64)."""
        flat = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1, 3)
        tokens, dist = palette_kernels.palette_lookup(flat, self._c64, *self._grid, GRID_SHIFT, GRID_LEVELS)
        return tokens.reshape(pixels.shape[:-1]), dist.reshape(pixels.shape[:-1])

    def table(self) -> np.ndarray:
        if self._table is None:
            self._table = palette_kernels.palette_table(self._c64, *self._grid, GRID_SHIFT, GRID_LEVELS)
        return self._table

    def encode(self, images: np.ndarray) -> np.ndarray:
        """images (N, H, W, 3) uint8 -> tokens (N, H*W) uint16 in raster order."""
        images = np.asarray(images)
        flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(-1, 3)
        if self._table is None and len(flat) < self.TABLE_FROM:
            tokens = self.nearest(flat)[0]
        else:
            tokens = palette_kernels.palette_encode_table(flat, self.table())
        return tokens.reshape(len(images), -1)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (N, T) with T = n_px^2 -> images (N, n_px, n_px, 3) uint8."""
        tokens = np.asarray(tokens)
        n_px = int(round(np.sqrt(tokens.shape[-1])))
        if n_px * n_px != tokens.shape[-1]:
            raise ValueError(f"{tokens.shape[-1]} tokens do not form a square image")
        colours = np.clip(np.round(127.5 * (self._c64 + 1.0)), 0, 255).astype(np.uint8)
        return colours[tokens].reshape(*tokens.shape[:-1], n_px, n_px, 3)


# ---- k-means ---------------------------------------------------------------------------------
def _kmeans_pp(points, weights, k, rng):
    """k-means++: the first centre drawn by weight, each next with probability ~ weight * D^2."""
    centers = np.empty((k, 3))
    d2 = np.full(len(points), np.inf)
    p = weights / weights.sum()
    centers[0] = points[rng.choice(len(points), p=p)]
    palette_kernels.min_sq_dist_update(points, centers[0], d2)
    for j in range(1, k):
        score = np.cumsum(weights * d2)
        centers[j] = points[min(np.searchsorted(score, rng.random() * score[-1]), len(points) - 1)]
        palette_kernels.min_sq_dist_update(points, centers[j], d2)
    return centers


def fit_palette(images: np.ndarray, k: int = 512, n_pixels: int = 1_000_000, seed: int = 0,
                max_iter: int = 50, history: list | None = None) -> np.ndarray:
    """k-means palette (k, 3) float32 in [-1, 1] from up to n_pixels pixels sampled from images
    (N, H, W, 3) uint8. Deterministic given seed. Appends each iteration's inertia (weighted mean
    squared distance) to `history` when given.

    When the sample holds at most k distinct colours the palette is those colours, (n, 3) with n <= k:
    k-means would only add copies, tokens the data never uses but the model must still learn to
    give no probability (two-colour images with k = 512 left 510 such tokens)."""
    rng = generator(seed, "palette")
    pixels = np.asarray(images, dtype=np.uint8).reshape(-1, 3)
    if len(pixels) > n_pixels:
        pixels = pixels[rng.choice(len(pixels), n_pixels, replace=False)]
    packed = (pixels[:, 0].astype(np.int64) << 16) | (pixels[:, 1].astype(np.int64) << 8) | pixels[:, 2]
    uniq, counts = np.unique(packed, return_counts=True)
    colours = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=1).astype(np.uint8)
    points, weights = to_unit(colours), counts.astype(np.float64)      # (n, 3), (n,)
    if len(points) <= k:
        return points.astype(np.float32)

    centers = _kmeans_pp(points, weights, k, rng)
    labels = None
    for _ in range(max_iter):
        new_labels, d2 = Palette(centers).nearest(colours)              # assignment step
        if history is not None:
            history.append(float(np.dot(weights, d2) / weights.sum()))
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels.astype(np.int64)
        mass = np.bincount(labels, weights, minlength=k)                # update step
        for ch in range(3):
            sums = np.bincount(labels, weights * points[:, ch], minlength=k)
            centers[:, ch] = np.where(mass > 0, sums / np.maximum(mass, 1e-300), centers[:, ch])
        empty = np.flatnonzero(mass == 0)
        if len(empty):  # re-seed dead centres at the colours that fit worst (largest weighted error)
            worst = np.argsort(-(weights * d2), kind="stable")[:len(empty)]
            centers[empty[:len(worst)]] = points[worst]
    return centers.astype(np.float32)


def check_palette(values, where) -> np.ndarray:
    """values as a (k, 3) float32 palette, or ValueError naming `where`: k >= 1 colours, each
    finite and in [-1, 1] (a NaN colour would make every pixel one token)."""
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: a palette is a (k, 3) array of numbers ({e})") from None
    if arr.ndim != 2 or arr.shape[1] != 3 or len(arr) < 1:
        raise ValueError(f"{where}: a palette is a (k, 3) array in [-1, 1], got shape {arr.shape}")
    if not np.isfinite(arr).all() or np.abs(arr).max() > 1.0 + 1e-6:
        raise ValueError(f"{where}: palette colours must be finite and in [-1, 1]")
    return arr


def load_palette(path) -> np.ndarray:
    """A palette from a file: a .npy (k, 3) array, or a Hugging Face preprocessor_config.json
    (its `clusters` field, as OpenAI released them). Values must lie in [-1, 1]."""
    path = Path(path)
    if not path.is_file():  # a FIFO would block the read forever; a folder is no palette
        raise ValueError(f"{path} is not a regular file: give a (k, 3) .npy or a preprocessor_config.json")
    try:
        if path.suffix == ".json":
            values = json.loads(path.read_text())["clusters"]
        else:
            values = np.load(path, allow_pickle=False)
    except (OSError, KeyError, TypeError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read a palette from {path} ({type(e).__name__}: {e}); give a (k, 3) "
                         ".npy or a preprocessor_config.json with 'clusters'") from None
    return check_palette(values, path)


def preview(train_images: np.ndarray, shown: np.ndarray, k: int, seed: int) -> np.ndarray:
    """What the palette does to images: k-means with k colours fitted on train_images, then each
    image of `shown` (n, H, W, 3) beside its quantised version -> (2n, H, W, 3), pairs in order
    (sample.py --palette-preview draws them as a grid)."""
    pal = Palette(fit_palette(train_images, k=k, seed=seed))
    quantised = pal.decode(pal.encode(shown))
    return np.stack([shown, quantised], axis=1).reshape(-1, *shown.shape[1:])  # original, quantised
