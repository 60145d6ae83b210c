"""§3.2 The palette's kernels: the exact nearest palette colour of 8-bit RGB pixels, and k-means++'s
distance update, each beside a NumPy twin where NumPy is not already one (palette_table and
palette_encode_table are tested against palette_lookup, whose twin is palette_lookup_ref).

    token(p) = argmin_k ||u(p) - c_k||^2,   u(p) = p / 127.5 - 1   (lowest k among exact ties)

The RGB cube is cut into a grid of cells; `palette_grid` (palette.py) lists, per cell, every centre
that can be nearest for some colour in it (its lower-bound distance to the cell is at most the
smallest upper bound), in increasing index order. The kernel checks only those. Compiled without
fast-math so the distance is summed in the same order as the reference: ties resolve identically.
"""
import numpy as np
from numba import njit, prange

from .jit import _JIT, _JIT_EXACT


@njit(inline="always", **_JIT_EXACT)
def _nearest_colour(r, g, b, centers, cell_start, cell_items, cell_shift, levels):
    """(token, squared distance) of the nearest centre to 8-bit colour (r, g, b)."""
    cell = ((r >> cell_shift) * levels + (g >> cell_shift)) * levels + (b >> cell_shift)
    u0 = r / 127.5 - 1.0
    u1 = g / 127.5 - 1.0
    u2 = b / 127.5 - 1.0
    best, best_d = 0, np.inf
    for j in range(cell_start[cell], cell_start[cell + 1]):
        k = cell_items[j]
        d0 = u0 - centers[k, 0]
        d1 = u1 - centers[k, 1]
        d2 = u2 - centers[k, 2]
        d = d0 * d0 + d1 * d1 + d2 * d2
        if d < best_d:
            best, best_d = k, d
    return best, best_d


@njit(parallel=True, **_JIT_EXACT)
def palette_lookup(pixels, centers, cell_start, cell_items, cell_shift, levels):
    """pixels (n, 3) uint8, centers (K, 3) float64 -> tokens (n,) uint16 and squared distance (n,).
    Cell of a pixel: (r >> cell_shift, g >> cell_shift, b >> cell_shift) in a levels^3 grid; its
    candidates are cell_items[cell_start[cell]:cell_start[cell + 1]]."""
    n = pixels.shape[0]
    tokens = np.empty(n, dtype=np.uint16)
    dist = np.empty(n, dtype=np.float64)
    for i in prange(n):
        k, d = _nearest_colour(np.int64(pixels[i, 0]), np.int64(pixels[i, 1]), np.int64(pixels[i, 2]),
                               centers, cell_start, cell_items, cell_shift, levels)
        tokens[i] = k
        dist[i] = d
    return tokens, dist


@njit(parallel=True, **_JIT_EXACT)
def palette_table(centers, cell_start, cell_items, cell_shift, levels):
    """The token of every 8-bit colour: table[(r << 16) | (g << 8) | b], (2^24,) uint16."""
    table = np.empty(1 << 24, dtype=np.uint16)
    for code in prange(1 << 24):
        table[code] = _nearest_colour(code >> 16, (code >> 8) & 255, code & 255,
                                      centers, cell_start, cell_items, cell_shift, levels)[0]
    return table


@njit(parallel=True, **_JIT_EXACT)
def palette_encode_table(pixels, table):
    """pixels (n, 3) uint8 -> tokens (n,) uint16 by one table read per pixel."""
    n = pixels.shape[0]
    tokens = np.empty(n, dtype=np.uint16)
    for i in prange(n):
        tokens[i] = table[(np.int64(pixels[i, 0]) << 16) | (np.int64(pixels[i, 1]) << 8) | pixels[i, 2]]
    return tokens


def palette_lookup_ref(pixels, centers):
    """Brute force over every centre (chunked to bound memory); np.argmin takes the lowest index."""
    tokens = np.empty(len(pixels), dtype=np.uint16)
    dist = np.empty(len(pixels), dtype=np.float64)
    for s in range(0, len(pixels), 65536):
        u = pixels[s:s + 65536].astype(np.float64) / 127.5 - 1.0
        d = u[:, None, :] - centers[None, :, :]
        d2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]
        tokens[s:s + 65536] = np.argmin(d2, axis=1)
        dist[s:s + 65536] = d2.min(axis=1)
    return tokens, dist


@njit(parallel=True, **_JIT)
def min_sq_dist_update(points, center, d2):
    """k-means++ step: d2[i] = min(d2[i], ||points[i] - center||^2) for float64 points (n, 3)."""
    for i in prange(points.shape[0]):
        a = points[i, 0] - center[0]
        b = points[i, 1] - center[1]
        c = points[i, 2] - center[2]
        d2[i] = min(d2[i], a * a + b * b + c * c)


def min_sq_dist_update_ref(points, center, d2):
    np.minimum(d2, ((points - center) ** 2).sum(axis=1), out=d2)
