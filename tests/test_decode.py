"""Image decoding: the torchvision.io path for plain RGB PNGs gives Pillow's pixels, and
files it does not handle (palette, grey, RGBA, 16-bit, EXIF, truncated, JPEG) go to Pillow."""

import numpy as np
import pytest
from PIL import Image

from patchcore_fast.geometry import Preprocess
from patchcore_fast.images import UnreadableImage, _decode_png, read_image


def _same(path):
    fast, slow = read_image(path), read_image(path, fast=False)
    assert fast.mode == slow.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(slow))
    pre = Preprocess(256, 224, resize="shorter")
    np.testing.assert_array_equal(pre.image(fast).numpy(), pre.image(slow).numpy())


def test_bottle_pngs_same_pixels_and_preprocessing(mvtec_root):
    files = sorted((mvtec_root / "bottle" / "test" / "broken_large").glob("*.png"))[:3]
    assert files
    for f in files:
        with Image.open(f) as img:
            assert _decode_png(f, img) is not None  # the fast path is really taken
        _same(f)


@pytest.mark.parametrize("kind", ["rgb", "rgb16", "grey", "palette", "rgba", "exif", "jpeg"])
def test_generated_files(tmp_path, kind):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / ("x.jpg" if kind == "jpeg" else "x.png")
    img = Image.fromarray(a)
    if kind == "rgb16":
        # 16 bits per channel: Pillow reduces it; this path leaves it to Pillow.
        import zlib, struct
        raw = b"".join(b"\x00" + (a.astype(">u2") * 257).tobytes()[i * 53 * 6:(i + 1) * 53 * 6]
                       for i in range(37))

        def chunk(t, d):
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 53, 37,
                         16, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    elif kind == "grey":
        img.convert("L").save(path)
    elif kind == "palette":
        img.convert("P").save(path)
    elif kind == "rgba":
        img.convert("RGBA").save(path)
    elif kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated: Pillow's path turns it upright
        img.save(path, exif=exif)
    else:
        img.save(path)
    with Image.open(path) as opened:
        assert (_decode_png(path, opened) is not None) == (kind == "rgb")
    _same(path)
    if kind == "exif":
        assert read_image(path).size == (37, 53)


def test_truncated_png_named_by_pillow(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UnreadableImage):
        read_image(path)
