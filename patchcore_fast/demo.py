"""A small synthetic MVTec-style data set, so the whole pipeline runs offline anywhere.

Category ``widget``: a textured disc (the "product") on a textured background, with small
random shifts and lighting changes. Defects are drawn on the disc: ``scratch`` (a dark
line) and ``spot`` (a coloured blob), each with its ground-truth mask. Everything comes
from one seeded ``numpy.random.Generator``, so the same seed writes the same files.
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


def _defect(rng: np.random.Generator, kind: str, disc: tuple[float, float, float]
            ) -> tuple[Image.Image, tuple[int, int, int]]:
    """A defect mask (mode L, 255 = defect) on the disc, and its colour."""
    cx, cy, r = disc
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    a, rho = rng.uniform(0, 2 * np.pi), rng.uniform(0, r * 0.6)
    x0, y0 = cx + rho * np.cos(a), cy + rho * np.sin(a)
    if kind == "scratch":
        t, length = rng.uniform(0, np.pi), rng.uniform(25, 50)
        x1, y1 = x0 + length * np.cos(t), y0 + length * np.sin(t)
        draw.line([(x0, y0), (x1, y1)], fill=255, width=int(rng.integers(3, 6)))
        colour = (40, 30, 25)
    else:
        rx, ry = rng.uniform(6, 12), rng.uniform(6, 12)
        draw.ellipse([x0 - rx, y0 - ry, x0 + rx, y0 + ry], fill=255)
        colour = (200, 120, 40)
    return mask, colour


def _save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_demo_data(root: str | os.PathLike, seed: int = 0, n_train: int = 40,
                    n_test_good: int = 12, n_test_defect: int = 10, overwrite: bool = False
                    ) -> dict[str, int]:
    """Write ``<root>/widget`` in the MVTec AD layout.

    Args:
        root: output folder (the data set root).
        seed: random seed.
        n_train: good training images.
        n_test_good: good test images.
        n_test_defect: test images per defect type (``scratch``, ``spot``).
        overwrite: write into ``root`` even if it is not empty (a user's own files of the
            same names would be replaced, so this is refused unless asked for).

    Returns:
        dict of folder -> number of images written.

    Raises:
        PatchCoreError: ``root`` is a file, or a non-empty folder without ``overwrite``.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise PatchCoreError(f"demo-data: {root} is a file, not a folder")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise PatchCoreError(f"demo-data: {root} is not empty; choose an empty or new folder, "
                             f"or give --overwrite to write into it anyway")
    rng = np.random.default_rng(seed)
    base = Path(root) / "widget"
    counts: dict[str, int] = {}

    def good(folder: Path, n: int) -> None:
        for i in range(n):
            img, _ = _product(rng)
            _save_png((img * 255).round().astype(np.uint8), folder / f"{i:03d}.png")
        counts[str(folder.relative_to(base))] = n

    good(base / "train" / "good", n_train)
    good(base / "test" / "good", n_test_good)
    for kind in ("scratch", "spot"):
        for i in range(n_test_defect):
            img, disc = _product(rng)
            mask, colour = _defect(rng, kind, disc)
            soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(1)), dtype=np.float64)
            alpha = (soft / 255.0)[..., None] * 0.85
            img = img * (1 - alpha) + np.asarray(colour, dtype=np.float64) / 255.0 * alpha
            _save_png((img * 255).round().astype(np.uint8),
                      base / "test" / kind / f"{i:03d}.png")
            _save_png(np.asarray(mask), base / "ground_truth" / kind / f"{i:03d}_mask.png")
        counts[f"test/{kind}"] = n_test_defect
    return counts
