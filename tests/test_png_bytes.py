"""overlays.png_bytes: lossless PNGs that other readers decode to the same pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_fast.overlays import encode_overlay, png_bytes

SHAPES = [(1, 1), (1, 7), (9, 1), (5, 3), (64, 97), (300, 257)]


def _pixels(shape, colour: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    full = (*shape, 3) if colour else shape
    # Noise (every byte value, rows unlike the row above: the Up filter wraps modulo 256)
    # plus a smooth gradient (long runs after filtering).
    noise = rng.integers(0, 256, size=full, dtype=np.uint8)
    ramp = np.broadcast_to(np.arange(shape[1], dtype=np.uint8)[None, :, None] if colour
                           else np.arange(shape[1], dtype=np.uint8)[None, :], full)
    return np.where(rng.random(full) < 0.5, noise, ramp).astype(np.uint8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("colour", [True, False])
def test_pillow_reads_the_same_pixels(shape, colour):
    pixels = _pixels(shape, colour, seed=shape[0] * 1000 + shape[1])
    with Image.open(io.BytesIO(png_bytes(pixels))) as img:
        img.load()
        assert img.format == "PNG"
        assert img.mode == ("RGB" if colour else "L")
        assert img.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(img), pixels)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("colour", [True, False])
def test_libpng_reads_the_same_pixels(shape, colour):
    tio = pytest.importorskip("torchvision.io")
    pixels = _pixels(shape, colour, seed=7 + shape[0])
    data = torch.frombuffer(bytearray(png_bytes(pixels)), dtype=torch.uint8)
    out = tio.decode_png(data).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(out if colour else out[..., 0], pixels)


def test_non_contiguous_and_views():
    pixels = _pixels((40, 60), True, seed=3)
    view = pixels[::2, ::3]
    with Image.open(io.BytesIO(png_bytes(view))) as img:
        np.testing.assert_array_equal(np.asarray(img), view)


def test_smooth_images_compress():
    """A smooth image deflates to well below its raw size."""
    y, x = np.mgrid[0:256, 0:256]
    smooth = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    assert len(png_bytes(smooth)) < smooth.nbytes / 4


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((0, 4, 3), np.uint8), np.zeros(5, np.uint8)])
def test_refuses_other_arrays(bad):
    with pytest.raises(ValueError, match="png_bytes takes uint8"):
        png_bytes(bad)


def test_encode_overlay_formats():
    pixels = _pixels((30, 40), True, seed=5)
    assert encode_overlay(pixels) == png_bytes(pixels)
    with Image.open(io.BytesIO(encode_overlay(pixels, "jpg"))) as img:
        assert img.format == "JPEG" and img.size == (40, 30)
    with pytest.raises(ValueError, match="overlay_format should be one of"):
        encode_overlay(pixels, "gif")
