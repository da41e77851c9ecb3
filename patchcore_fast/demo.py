"""A small synthetic MVTec-style data set, so the whole pipeline runs offline anywhere.

Category ``widget``: a textured disc (the "product") on a textured background, with small
random shifts and lighting changes. Defects are drawn on the disc: ``scratch`` (a dark
line) and ``spot`` (a coloured blob), each with its ground-truth mask.

Category ``rod`` (issue #15): elongated parts in photos of varying shape, ``ROD_HEIGHT``
pixels high and 1 to 3 times as wide: a grained bar with rounded ends, lengthwise. Defects
(``scratch``, ``spot``) lie anywhere along the bar, the ends included, where the paper's
centre crop of the shorter side never looks.

Each category has its own seeded ``numpy.random.Generator``, so the same seed writes the
same files (``widget``'s are those written before ``rod`` existed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .errors import PatchCoreError
from .files import atomic_path

SIZE = 256


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: random values on a coarse grid, upsampled bicubically."""
    coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float64) / 255.0


def _product(rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A good image as float RGB [SIZE, SIZE, 3] and the disc (cx, cy, r)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    background = 0.35 + 0.15 * _smooth_noise(rng, SIZE, 16) + 0.05 * rng.random((SIZE, SIZE))
    img = np.stack([background * 0.9, background * 0.85, background * 0.8], axis=-1)
    cx, cy = SIZE / 2 + rng.uniform(-4, 4), SIZE / 2 + rng.uniform(-4, 4)
    r = 88 + rng.uniform(-2, 2)
    d = np.hypot(xx - cx, yy - cy)
    # Concentric rings plus fine grain: a regular texture the model has to learn.
    rings = 0.5 + 0.5 * np.sin(d / 3.0 + rng.uniform(0, 2 * np.pi))
    grain = 0.08 * _smooth_noise(rng, SIZE, 64)
    disc = 0.55 + 0.12 * rings + grain
    inside = np.clip(r - d, 0, 1)[..., None]  # one-pixel anti-aliased rim
    colour = np.stack([disc * 0.75, disc * 0.8, disc * 0.95], axis=-1)
    img = img * (1 - inside) + colour * inside
    img *= rng.uniform(0.93, 1.07)  # lighting
    return np.clip(img, 0, 1), (cx, cy, r)


def _mark(rng: np.random.Generator, kind: str, size: tuple[int, int], x: float, y: float,
          scratch: tuple[float, float], spot: tuple[float, float], centred: bool
          ) -> Image.Image:
    """A defect mask (mode L, 255 = defect) of ``size`` with one mark at (x, y).

    ``scratch``: a line 3-5 px wide in a random direction, its length drawn from the
    ``scratch`` range, starting at (x, y) or ``centred`` on it; ``spot``: an ellipse whose
    radii come from the ``spot`` range.
    """
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    if kind == "scratch":
        t, length = rng.uniform(0, np.pi), rng.uniform(*scratch)
        if centred:
            dx, dy = 0.5 * length * np.cos(t), 0.5 * length * np.sin(t)
            ends = [(x - dx, y - dy), (x + dx, y + dy)]
        else:
            ends = [(x, y), (x + length * np.cos(t), y + length * np.sin(t))]
        draw.line(ends, fill=255, width=int(rng.integers(3, 6)))
    else:
        rx, ry = rng.uniform(*spot), rng.uniform(*spot)
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
    return mask


SCRATCH_COLOUR = (40, 30, 25)


def _defect(rng: np.random.Generator, kind: str, disc: tuple[float, float, float]
            ) -> tuple[Image.Image, tuple[int, int, int]]:
    """A defect mask (mode L, 255 = defect) on the disc, and its colour."""
    cx, cy, r = disc
    a, rho = rng.uniform(0, 2 * np.pi), rng.uniform(0, r * 0.6)
    x0, y0 = cx + rho * np.cos(a), cy + rho * np.sin(a)
    mask = _mark(rng, kind, (SIZE, SIZE), x0, y0, (25, 50), (6, 12), centred=False)
    return mask, SCRATCH_COLOUR if kind == "scratch" else (200, 120, 40)


ROD_HEIGHT = 160


def _rod(rng: np.random.Generator, width: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """A good rod image as float RGB [ROD_HEIGHT, width, 3] and the bar (x0, x1, cy, r)."""
    h = ROD_HEIGHT
    yy, xx = np.mgrid[0:h, 0:width].astype(np.float64)
    big = max(h, width)
    noise = _smooth_noise(rng, big, max(4, big // 16))[:h, :width]
    background = 0.3 + 0.15 * noise + 0.05 * rng.random((h, width))
    img = np.stack([background * 0.85, background * 0.9, background * 0.85], axis=-1)
    cy, r = h / 2 + rng.uniform(-3, 3), h * 0.3 + rng.uniform(-2, 2)
    x0, x1 = r + 10 + rng.uniform(-3, 3), width - r - 10 + rng.uniform(-3, 3)
    # Distance to the bar's axis segment: a capsule (a bar with rounded ends).
    d = np.hypot(xx - np.clip(xx, x0, x1), yy - cy)
    grain = 0.5 + 0.5 * np.sin(xx / 2.5 + 0.6 * np.sin(yy / 9.0) + rng.uniform(0, 2 * np.pi))
    bar = 0.6 + 0.1 * grain + 0.06 * _smooth_noise(rng, big, max(8, big // 4))[:h, :width]
    inside = np.clip(r - d, 0, 1)[..., None]
    colour = np.stack([bar * 0.9, bar * 0.8, bar * 0.6], axis=-1)  # brass
    img = img * (1 - inside) + colour * inside
    img *= rng.uniform(0.93, 1.07)
    return np.clip(img, 0, 1), (x0, x1, cy, r)


def _rod_defect(rng: np.random.Generator, kind: str, width: int, bar: tuple[float, ...],
                at: float) -> tuple[Image.Image, tuple[int, int, int]]:
    """A defect mask on the bar at ``at`` (0: its left end, 1: its right end)."""
    x0, x1, cy, r = bar
    x, y = x0 + at * (x1 - x0), cy + rng.uniform(-0.5, 0.5) * r
    mask = _mark(rng, kind, (width, ROD_HEIGHT), x, y, (20, 35), (6, 11), centred=True)
    return mask, SCRATCH_COLOUR if kind == "scratch" else (60, 140, 200)


def _blend(img: np.ndarray, mask: Image.Image, colour: tuple[int, int, int]) -> np.ndarray:
    """Paint ``colour`` where ``mask`` is, with a soft one-pixel edge."""
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(1)), dtype=np.float64)
    alpha = (soft / 255.0)[..., None] * 0.85
    return img * (1 - alpha) + np.asarray(colour, dtype=np.float64) / 255.0 * alpha


def write_rod(base: Path, seed: int, n_train: int, n_test_good: int, n_test_defect: int
              ) -> dict[str, int]:
    """Write the ``rod`` category under ``base`` (see the module docstring).

    Widths are drawn from 1 to 3 times :data:`ROD_HEIGHT`; defects sit at a uniformly drawn
    place along the bar, so about a third of them lie in its outer sixths (the ends).

    Returns:
        dict of folder (relative to ``base``) -> number of images written.
    """
    rng = np.random.default_rng([seed, 15])
    counts: dict[str, int] = {}

    def width() -> int:
        return int(round(ROD_HEIGHT * rng.uniform(1.0, 3.0)))

    for folder, n in (("train/good", n_train), ("test/good", n_test_good)):
        for i in range(n):
            img, _ = _rod(rng, width())
            _save_png((img * 255).round().astype(np.uint8), base / folder / f"{i:03d}.png")
        counts[folder] = n
    for kind in ("scratch", "spot"):
        for i in range(n_test_defect):
            w = width()
            img, bar = _rod(rng, w)
            mask, colour = _rod_defect(rng, kind, w, bar, rng.uniform(0.0, 1.0))
            _save_png((_blend(img, mask, colour) * 255).round().astype(np.uint8),
                      base / "test" / kind / f"{i:03d}.png")
            _save_png(np.asarray(mask), base / "ground_truth" / kind / f"{i:03d}_mask.png")
        counts[f"test/{kind}"] = n_test_defect
    return counts


def _save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_demo_data(root: str | os.PathLike, seed: int = 0, n_train: int = 40,
                    n_test_good: int = 12, n_test_defect: int = 10, overwrite: bool = False,
                    categories: tuple[str, ...] = ("widget", "rod")) -> dict[str, int]:
    """Write ``<root>/widget`` and ``<root>/rod`` in the MVTec AD layout.

    Args:
        root: output folder (the data set root).
        seed: random seed.
        n_train: good training images.
        n_test_good: good test images.
        n_test_defect: test images per defect type (``scratch``, ``spot``).
        overwrite: write into ``root`` even if it is not empty (a user's own files of the
            same names would be replaced, so this is refused unless asked for).
        categories: which of ``widget`` and ``rod`` to write.

    Returns:
        dict of folder (``<category>/test/spot``, ...) -> number of images written.

    Raises:
        PatchCoreError: ``root`` is a file, or a non-empty folder without ``overwrite``.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise PatchCoreError(f"demo-data: {root} is a file, not a folder")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise PatchCoreError(f"demo-data: {root} is not empty; choose an empty or new folder, "
                             f"or give --overwrite to write into it anyway")
    unknown = sorted(set(categories) - {"widget", "rod"})
    if unknown:
        raise PatchCoreError(f"demo-data: no category {unknown[0]!r} (widget, rod)")
    counts: dict[str, int] = {}
    if "rod" in categories:
        rod = write_rod(Path(root) / "rod", seed, n_train, n_test_good, n_test_defect)
        counts.update({f"rod/{k}": v for k, v in rod.items()})
    if "widget" not in categories:
        return counts
    rng = np.random.default_rng(seed)
    base = Path(root) / "widget"

    def good(folder: Path, n: int) -> None:
        for i in range(n):
            img, _ = _product(rng)
            _save_png((img * 255).round().astype(np.uint8), folder / f"{i:03d}.png")
        counts[f"widget/{folder.relative_to(base)}"] = n

    good(base / "train" / "good", n_train)
    good(base / "test" / "good", n_test_good)
    for kind in ("scratch", "spot"):
        for i in range(n_test_defect):
            img, disc = _product(rng)
            mask, colour = _defect(rng, kind, disc)
            img = _blend(img, mask, colour)
            _save_png((img * 255).round().astype(np.uint8),
                      base / "test" / kind / f"{i:03d}.png")
            _save_png(np.asarray(mask), base / "ground_truth" / kind / f"{i:03d}_mask.png")
        counts[f"widget/test/{kind}"] = n_test_defect
    return counts
