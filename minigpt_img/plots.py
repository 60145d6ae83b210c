"""Pictures a person looks at, drawn with Pillow: image grids (palette previews, samples,
completions) and line charts (loss curves, probe accuracy per layer), each written atomically.

Not a paper section: a file helper."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .files import write_atomic

GRID_PAD = 2      # pixels between the images of a grid


def image_grid(images: np.ndarray, ncols: int, scale: int = 1, pad: int = GRID_PAD,
               background: int = 128) -> np.ndarray:
    """images (N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, ncols*(W+pad)+pad, 3) uint8 grid, row
    by row, each image enlarged `scale` times with nearest-neighbour so single pixels stay visible,
    on a mid-grey background that stands apart from both white and black images."""
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


FONT_SIZE = 12    # Pillow's default scalable font; at its own default size 10 it drops spaces
LINE_HEIGHT = 15  # pixels per line of caption text


def _font():
    from PIL import ImageFont
    return ImageFont.load_default(size=FONT_SIZE)


def with_caption(grid: np.ndarray, lines: list, column_labels: list | None = None,
                 column_width: int | None = None, pad: int = GRID_PAD) -> np.ndarray:
    """The grid under a white strip with the caption's lines and, when given, one label above each
    column (column_width: the width of a cell, image plus its padding)."""
    from PIL import ImageDraw
    rows = len(lines) + (1 if column_labels else 0)
    strip = Image.new("RGB", (grid.shape[1], rows * LINE_HEIGHT + 4), "white")
    draw, font = ImageDraw.Draw(strip), _font()
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    for c, label in enumerate(column_labels or []):
        draw.text((pad + c * column_width + column_width / 2, 2 + len(lines) * LINE_HEIGHT), label,
                  fill=(60, 60, 60), font=font, anchor="ma")
    return np.concatenate([np.asarray(strip), np.asarray(grid, np.uint8)], axis=0)


def save_png(array: np.ndarray, path) -> Path:
    path = Path(path)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    write_atomic(path, lambda f: image.save(f, format="PNG"))
    return path


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75)]


def _nice_ticks(lo: float, hi: float, n: int = 5, whole: bool = False) -> list:
    """About n round tick values from lo to hi (whole numbers only when `whole`: layers, steps)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = max((hi - lo) / n, 1.0) if whole else (hi - lo) / n
    step = 10 ** np.floor(np.log10(raw))
    step *= min((m for m in (1, 2, 5, 10) if m * step >= raw), default=10)
    return list(np.arange(np.ceil(lo / step) * step, hi + step * 1e-9, step))


def line_chart(series: dict, path, title: str = "", xlabel: str = "", ylabel: str = "",
               hlines: dict | None = None, size=(800, 480), ylim: tuple | None = None) -> Path:
    """Draw named (x, y) series as lines (a series of one point is drawn as a dot), optional
    horizontal reference lines {label: y}, with axes, ticks and a legend, to a PNG. ylim fixes the
    y range (accuracies: 0 to 100, so that noise does not look like a trend)."""
    from PIL import ImageDraw
    font = _font()
    W, H = size
    left, right, top, bottom = 80, 24, 52, 56
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [np.asarray(x, float) for x, _ in series.values() if len(x)]
    ys = [np.asarray(y, float) for _, y in series.values() if len(y)] + \
         [np.asarray(list((hlines or {}).values()), float)]
    x_all, y_all = np.concatenate(xs) if xs else np.zeros(1), np.concatenate(ys)
    y_all = y_all[np.isfinite(y_all)] if np.isfinite(y_all).any() else np.zeros(1)
    x0, x1 = float(x_all.min()), float(x_all.max()) if x_all.max() > x_all.min() else x_all.min() + 1
    y0, y1 = float(y_all.min()), float(y_all.max())
    pad = 0.05 * (y1 - y0 if y1 > y0 else 1.0)
    y0, y1 = (y0 - pad, y1 + pad) if ylim is None else ylim

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                top + (y1 - y) / (y1 - y0) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for t in _nice_ticks(y0, y1):
        _, yy = px(x0, t)
        d.line([left - 4, yy, left, yy], fill=(0, 0, 0))
        d.line([left + 1, yy, W - right - 1, yy], fill=(235, 235, 235))
        d.text((left - 6, yy), f"{t:g}", fill=(0, 0, 0), font=font, anchor="rm")
    for t in _nice_ticks(x0, x1, whole=bool(np.all(np.mod(x_all, 1) == 0))):
        xx, _ = px(t, y0)
        d.line([xx, H - bottom, xx, H - bottom + 4], fill=(0, 0, 0))
        d.text((xx, H - bottom + 6), f"{t:g}", fill=(0, 0, 0), font=font, anchor="mt")
    for i, (label, y) in enumerate((hlines or {}).items()):
        _, yy = px(x0, y)
        for xx in range(left, W - right, 12):  # dashed
            d.line([xx, yy, min(xx + 6, W - right), yy], fill=(120, 120, 120))
        d.text((W - right - 4, yy - 2), label, fill=(90, 90, 90), font=font, anchor="rb")
    for i, (x, y) in enumerate(series.values()):
        colour = COLOURS[i % len(COLOURS)]
        pts = [px(a, b) for a, b in zip(x, y) if np.isfinite(b)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for p in pts if len(pts) <= 40 else []:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
    lx, ly = W - right, top - 12  # the legend: one row above the frame, right-aligned, off the data
    for i, label in reversed(list(enumerate(series))):
        colour = COLOURS[i % len(COLOURS)]
        lx -= font.getlength(label)
        d.text((lx, ly), label, fill=colour, font=font, anchor="lm")
        d.line([lx - 22, ly, lx - 6, ly], fill=colour, width=2)
        lx -= 22 + 16
    d.text((W / 2, 10), title, fill=(0, 0, 0), font=font, anchor="mt")
    d.text((W / 2, H - 18), xlabel, fill=(0, 0, 0), font=font, anchor="mt")
    d.text((8, top - 22), ylabel, fill=(0, 0, 0), font=font)
    path = Path(path)
    write_atomic(path, lambda f: img.save(f, format="PNG"))
    return path
