"""§3.1 (offline stand-in) `streaks`: a procedurally generated 4-class image dataset, the default.

No files, no download: every image is drawn from a seed, at any resolution. Each image is binary,
a dark and a light state. The class is an offset (dy, dx): the image's pixels are split into chains
that step by (dy, dx), wrapping round the edges (a torus), and each chain is a Markov chain:

    s[next] = s[this]        with probability STAY,
              a fair coin    otherwise (and at the chain's first pixel)

    class  offset   looks like
    0      (0, 1)   horizontal lines       (each chain is a row)
    1      (1, 0)   vertical lines         (each chain is a column)
    2      (1, 1)   diagonal lines \\      (a chain steps down and right)
    3      (1, -1)  diagonal lines /       (a chain steps down and left)

Why this data (the first run must show the paper's effect). Every pixel is dark with probability
1/2 in every class, so all classes have the same mean image; every offset splits an n x n image
into n chains of n pixels, so the share of dark pixels varies from image to image in the same way in
every class, too. The class is only in which earlier pixel each pixel repeats: to draw the next
pixel an autoregressive model has to find the pixel it copies (the one before it for horizontal
lines, n, n + 1 or n - 1 pixels back for the others) and first tell from the pixels so far which
class the image is, all learned from the pixels alone. A linear model on raw pixels sees the same
mean in every class. Measured (README "Measured on this machine"): raw pixels and the
random-init model against the default run's features, and the samples, which draw the classes.

Why four classes, at 8x8, and STAY = 0.95 (README, "What was tried on the way"): a copy from n
pixels back is only learned once the position embeddings have found the rows, and at 16x16 that
took longer than the first run's minutes (ten classes, 787 steps: only the horizontal class was
learned, and the samples drew nothing else); steeper and shallower offsets are hard to tell apart
by eye even in the data; with long runs (STAY near 1) the classes are lines a reader sees at once.
"""
from __future__ import annotations

import numpy as np

OFFSETS = [(0, 1), (1, 0), (1, 1), (1, -1)]
CLASSES = ["horizontal", "vertical", "diagonal \\", "diagonal /"]
STAY = 0.95                     # probability that a pixel repeats the one before it on its chain
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


def class_log_likelihoods(images: np.ndarray) -> np.ndarray:
    """log p(image | class) of each class, (N, K), for streak images (N, n, n, 3), exactly: on each
    of the class's chains the first pixel is a fair coin, and every next pixel agrees with the one
    before with probability p = STAY + (1 - STAY) / 2 (a repeat, or a fresh coin that agrees):

        log p(image | class) = sum over its chains of  log 1/2 + a log p + d log (1 - p)

    with a and d the chain's agreeing and differing neighbours."""
    n = images.shape[1]
    dark = (images[..., 0] < (DARK + LIGHT) / 2).reshape(len(images), n * n)   # (N, n^2) raster order
    p = STAY + (1 - STAY) / 2
    out = np.zeros((len(images), len(OFFSETS)))
    for c, (dy, dx) in enumerate(OFFSETS):
        for chain in chains(dy, dx, n):
            s = dark[:, chain]                                                 # (N, len(chain))
            agree = (s[:, 1:] == s[:, :-1]).sum(1)
            out[:, c] += np.log(0.5) + agree * np.log(p) + (len(chain) - 1 - agree) * np.log(1 - p)
    return out


def judge_samples(images: np.ndarray, rng: np.random.Generator, reference: int = 2000) -> str:
    """A line saying which class each sampled image (N, n, n, 3) is by the data's own likelihood,
    and how many are as likely as the data's own images of that class: within the middle 90% of
    log p(image | its class) over `reference` images drawn from rng."""
    n = images.shape[1]
    L = class_log_likelihoods(images)                                          # (N, K)
    data, labels = make_streaks(reference, n, rng)
    own = class_log_likelihoods(data)[np.arange(reference), labels]            # (reference,)
    low, high = np.quantile(own, [0.05, 0.95])
    best, typical = L.argmax(1), (L.max(1) >= low) & (L.max(1) <= high)
    counts = ", ".join(f"{np.sum(best == c)} {name}" for c, name in enumerate(CLASSES))
    return (f"by the data's own likelihood the {len(images)} samples are {counts}; {typical.sum()} of "
            f"{len(images)} are as likely as the middle 90% of real images of their class")
