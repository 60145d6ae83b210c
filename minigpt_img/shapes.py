"""§3.1 (offline stand-in) `shapes`: a procedurally generated 10-class image dataset.

No files, no download: every image is drawn from a seed, at any resolution, so `python train.py`
works on a fresh machine. One coloured shape per image, of a random size and position, over a
textured background (a gradient, stripes, checks or noise, in random colours), plus pixel noise. The
class is the shape; colour, size, position and texture vary independently of it, so raw pixels are a
poor linear feature (a linear classifier on pixels is far from 100%, see tests/test_data.py) while
the shape is easy to see.

Shapes are drawn as anti-aliased masks: each is an inequality on a 2x-supersampled pixel grid
(e.g. circle: (x - cx)^2 + (y - cy)^2 < r^2), averaged down to the image.
"""
from __future__ import annotations

import numpy as np

CLASSES = ["circle", "square", "diamond", "triangle", "ring", "plus", "cross", "hbar", "vbar", "frame"]
SUPERSAMPLE = 2


def _mask(cls: int, x, y, cx, cy, r):
    """Where shape `cls` of centre (cx, cy) and radius r covers the points (x, y); all (B, 1, 1) or
    grids (1, S, S), coordinates in [0, 1]."""
    dx, dy = x - cx, y - cy
    ax, ay = np.abs(dx), np.abs(dy)
    w = 0.35 * r  # stroke width of the thin shapes
    if cls == 0:
        return dx * dx + dy * dy < r * r
    if cls == 1:
        return np.maximum(ax, ay) < 0.85 * r
    if cls == 2:
        return ax + ay < 1.1 * r
    if cls == 3:  # upward triangle: below the apex, inside both slanted edges
        return (dy < 0.8 * r) & (dy > -r + 2.0 * ax)
    if cls == 4:
        d2 = dx * dx + dy * dy
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
    if cls == 5:
        return ((ax < w) & (ay < r)) | ((ay < w) & (ax < r))
    if cls == 6:
        return (np.abs(dx - dy) < 1.4 * w) & (np.maximum(ax, ay) < 0.8 * r) | \
               (np.abs(dx + dy) < 1.4 * w) & (np.maximum(ax, ay) < 0.8 * r)
    if cls == 7:
        return (ax < r) & (ay < 0.4 * r)
    if cls == 8:
        return (ay < r) & (ax < 0.4 * r)
    if cls == 9:
        m = np.maximum(ax, ay)
        return (m < 0.9 * r) & (m > 0.55 * r)
    raise ValueError(cls)


def _backgrounds(rng, B, x, y):
    """(B, R, R, 3) float textures in [0, 255] on the coordinates x (1, 1, R), y (1, R, 1): a gradient,
    stripes, checks or blotchy noise between two random colours."""
    R = x.shape[-1]
    c1 = rng.uniform(0, 255, (B, 1, 1, 3))
    c2 = rng.uniform(0, 255, (B, 1, 1, 3))
    kind = rng.integers(0, 4, B)
    angle = rng.uniform(0, np.pi, (B, 1, 1))
    freq = rng.uniform(2, 6, (B, 1, 1))
    coarse = rng.uniform(0, 1, (B, 4, 4))
    t = np.empty((B, R, R))
    for k, sel in enumerate(kind[None, :] == np.arange(4)[:, None]):
        a, f = angle[sel], freq[sel]
        ramp = np.cos(a) * x + np.sin(a) * y                                   # (b, R, R)
        if k == 0:
            ramp = ramp - ramp.min(axis=(1, 2), keepdims=True)
            t[sel] = ramp / np.maximum(ramp.max(axis=(1, 2), keepdims=True), 1e-9)
        elif k == 1:
            t[sel] = np.sin(2 * np.pi * f * ramp) > 0
        elif k == 2:
            t[sel] = (np.floor(f * x) + np.floor(f * y)) % 2
        else:
            t[sel] = coarse[sel].repeat(-(-R // 4), axis=1).repeat(-(-R // 4), axis=2)[:, :R, :R]
    return c1 + (c2 - c1) * t[..., None]


def make_shapes(n: int, res: int, rng: np.random.Generator, batch: int = 500):
    """n images (n, res, res, 3) uint8 and labels (n,) int64, classes balanced, drawn from rng."""
    if res < 4:
        raise ValueError(f"shapes needs a resolution of at least 4 pixels, got {res}")
    labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
    images = np.empty((n, res, res, 3), np.uint8)
    S = res * SUPERSAMPLE
    fine = (np.arange(S) + 0.5) / S
    coarse = (np.arange(res) + 0.5) / res
    for s in range(0, n, batch):
        lab = labels[s:s + batch]
        B = len(lab)
        r = rng.uniform(0.18, 0.38, (B, 1, 1))
        cx = rng.uniform(r[:, 0, 0], 1 - r[:, 0, 0])[:, None, None]
        cy = rng.uniform(r[:, 0, 0], 1 - r[:, 0, 0])[:, None, None]
        colour = rng.uniform(0, 255, (B, 1, 1, 3))
        mask = np.zeros((B, S, S), np.float32)                                 # supersampled
        for cls in np.unique(lab):
            sel = lab == cls
            mask[sel] = _mask(int(cls), fine[None, None, :], fine[None, :, None], cx[sel], cy[sel], r[sel])
        cover = mask.reshape(B, res, SUPERSAMPLE, res, SUPERSAMPLE).mean(axis=(2, 4))[..., None]
        img = _backgrounds(rng, B, coarse[None, None, :], coarse[None, :, None])  # (B, res, res, 3)
        img = img * (1 - cover) + colour * cover + 3 * rng.standard_normal(img.shape, dtype=np.float32)
        images[s:s + B] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return images, labels
