"""§3.1 (offline stand-in) `streaks`: a procedurally generated 10-class image dataset, the default.

No files, no download: every image is drawn from a seed, at any resolution. Each image is binary,
a dark and a light state. The class is an offset (dy, dx): the image's pixels are split into chains
that step by (dy, dx), wrapping round the edges (a torus), and each chain is a Markov chain:

    s[next] = s[this]        with probability STAY,
              a fair coin    otherwise (and at the chain's first pixel)

    class  offset   class  offset          the steeper or shallower a slope, the further apart
    0      (0, 1)   5      (1, -2)         the pixels it joins: (1, 3) joins pixels three
    1      (1, 0)   6      (2, 1)          columns apart on the next row
    2      (1, 1)   7      (2, -1)
    3      (1, -1)  8      (1, 3)
    4      (1, 2)   9      (1, -3)

Why this data (the first run must show the paper's effect). Every pixel is dark with probability
1/2 in every class, so all classes have the same mean image. At 16x16 every offset splits the image
into 16 chains of 16 pixels, so the share of dark pixels varies from image to image in the same way
in every class, too. The class is only in which pixel each pixel repeats: to draw the next pixel an
autoregressive model has to find the earlier pixel it copies, ten classes, ten attention patterns,
which pre-training must learn from the pixels alone. A randomly initialised model attends almost
uniformly to the whole prefix and cannot pick one pixel out of it. Measured (README "Measured on
this machine"): raw pixels and the random-init model against the default run's features.
"""
from __future__ import annotations

import numpy as np

OFFSETS = [(0, 1), (1, 0), (1, 1), (1, -1), (1, 2), (1, -2), (2, 1), (2, -1), (1, 3), (1, -3)]
CLASSES = ["horizontal", "vertical", "diagonal \\", "diagonal /", "shallow \\", "shallow /", "steep \\",
           "steep /", "flat \\", "flat /"]
STAY = 0.85                     # probability that a pixel repeats the one before it on its chain
DARK, LIGHT = 20, 235           # the two states' grey levels


def chains(dy: int, dx: int, res: int) -> list:
    """The image's pixels (flat indices) split into chains (y, x) -> (y + dy, x + dx), wrapping round
    the edges (a torus), each chain starting at its first pixel in reading order."""
    seen, out = np.zeros(res * res, bool), []
    for start in range(res * res):
        if not seen[start]:
            chain, (y, x) = [], divmod(start, res)
            while not seen[y * res + x]:
                seen[y * res + x] = True
                chain.append(y * res + x)
                y, x = (y + dy) % res, (x + dx) % res
            out.append(chain)
    return out


def make_streaks(n: int, res: int, rng: np.random.Generator):
    """n images (n, res, res, 3) uint8 and labels (n,) int64, classes balanced, drawn from rng."""
    if res < 3:
        raise ValueError(f"streaks needs a resolution of at least 3 pixels, got {res}")
    labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
    s = np.empty((n, res * res), bool)                             # states, raster order
    for cls, (dy, dx) in enumerate(OFFSETS):
        where = np.flatnonzero(labels == cls)
        for chain in chains(dy, dx, res):                          # a Markov chain along each
            flips = rng.random((len(where), len(chain))) >= STAY   # a fresh coin instead of a repeat...
            fresh = rng.random((len(where), len(chain))) < 0.5
            state = np.empty((len(where), len(chain)), bool)
            state[:, 0] = fresh[:, 0]
            for t in range(1, len(chain)):
                state[:, t] = np.where(flips[:, t], fresh[:, t], state[:, t - 1])
            s[where[:, None], np.array(chain)[None, :]] = state
    grey = np.where(s, DARK, LIGHT).astype(np.uint8).reshape(n, res, res)
    return np.repeat(grey[..., None], 3, axis=3), labels
