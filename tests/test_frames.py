"""Pictures in memory (issue #22): ``PatchCore.predict`` on numpy arrays, tensors, PIL images
and encoded bytes gives the scores and maps of the same picture read from a file, bit for
bit where the pixels decode the same; bad frames raise one clear error."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_fast import frames
from patchcore_fast.images import read_image
from patchcore_fast.frames import FrameError
from patchcore_fast.model import PatchCore


@pytest.fixture(scope="module")
def demo(fit_demo):
    """(model, test images): Lite0 at 64 px, longer side, no crop."""
    root, model_file = fit_demo("frames", n_train=10, n_test_good=2, n_test_defect=3)
    files = sorted((root / "widget" / "test").rglob("*.png"))
    return PatchCore.load(model_file, device="cpu"), files


def same(a, b) -> None:
    """Two predictions agree bit for bit: scores and every map."""
    assert np.array_equal(a.scores, b.scores), (a.scores, b.scores)
    assert len(a.maps) == len(b.maps)
    for x, y in zip(a.maps, b.maps):
        assert x.shape == y.shape and np.array_equal(x, y)


def png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, RGB or RGBA) written by hand (Pillow does not write 16-bit
    colour)."""
    h, w = a.shape[:2]
    colour = {2: 0, 3: {3: 2, 4: 6}.get(a.shape[-1])}[a.ndim]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour,
                                                             0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_every_kind_of_frame_scores_as_its_file(demo):
    """8-bit RGB files (libpng's fast path) against the same pixels as arrays, CHW and BCHW
    tensors, floats in [0, 1], PIL images and the encoded bytes."""
    model, files = demo
    from_files = model.predict(files)
    arrays = [np.asarray(read_image(f)) for f in files]
    tensors = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays]
    same(from_files, model.predict(arrays))
    same(from_files, model.predict(tensors))
    same(from_files, model.predict(torch.stack(tensors)))       # one B x C x H x W tensor
    same(from_files, model.predict([t.float() / 255 for t in tensors]))
    same(from_files, model.predict([a / 255.0 for a in arrays]))
    same(from_files, model.predict([Image.open(f) for f in files]))
    same(from_files, model.predict([f.read_bytes() for f in files]))
    one = model.predict(arrays[0])  # a single frame, not in a list
    same(model.predict(files[:1]), one)
    assert one.paths == [None] and one.maps[0].shape == arrays[0].shape[:2]


@pytest.mark.parametrize("kind", ["grey8", "grey8x1", "grey16", "grey16x1", "rgb16",
                                  "rgba16", "rgba8"])
def test_grey_16_bit_and_alpha_frames_score_as_their_files(demo, tmp_path, kind):
    """Grey, 16-bit and RGBA pictures: the array scores as the PNG holding it (Pillow's
    conversions: round(v / 257) for 16-bit grey, the high byte for 16-bit colour, alpha
    dropped)."""
    model, files = demo
    rgb = np.asarray(read_image(files[-1]))
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    rng = np.random.default_rng(0)
    wide = rgb.astype(np.uint16) * 257 + rng.integers(0, 257, rgb.shape, dtype=np.uint16)
    alpha8 = rng.integers(0, 256, grey.shape, dtype=np.uint8)[..., None]
    alpha16 = (alpha8.astype(np.uint16) * 257)
    array = {"grey8": grey, "grey8x1": grey[..., None], "grey16": wide[..., 0],
             "grey16x1": wide[..., :1], "rgb16": wide,
             "rgba16": np.concatenate([wide, alpha16], axis=2),
             "rgba8": np.concatenate([rgb, alpha8], axis=2)}[kind]
    stored = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    path = tmp_path / f"{kind}.png"
    if array.dtype == np.uint16:
        path.write_bytes(png16(stored))
    else:
        Image.fromarray(stored).save(path)
    from_file = model.predict([path])
    same(from_file, model.predict([array]))
    same(from_file, model.predict([path.read_bytes()]))
    if array.dtype == np.uint8 and array.ndim == 3:  # the same values as C x H x W
        same(from_file, model.predict([torch.from_numpy(array.copy()).permute(2, 0, 1)]))


def test_jpeg_bytes_and_exif_orientation(demo, tmp_path):
    """A JPEG decodes the same from bytes as from its file; a PIL image carrying an EXIF
    rotation is turned upright as the file reader turns the file."""
    model, files = demo
    img = Image.open(files[0]).crop((0, 0, 200, 120))
    jpeg = tmp_path / "x.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    img.save(jpeg, format="JPEG", quality=90, exif=exif)
    from_file = model.predict([jpeg])
    assert from_file.maps[0].shape == (200, 120)  # upright: height and width swapped
    same(from_file, model.predict([jpeg.read_bytes()]))
    same(from_file, model.predict([Image.open(jpeg)]))


def test_maps_at_crop(demo):
    model, files = demo
    arrays = [np.asarray(read_image(f)) for f in files[:2]]
    same(model.predict(files[:2], maps_at="crop"), model.predict(arrays, maps_at="crop"))


BAD = {
    "int64": (np.zeros((8, 8, 3), np.int64), "dtype int64"),
    "bool": (np.zeros((8, 8), bool), "dtype bool"),
    "zero-size": (np.zeros((0, 8, 3), np.uint8), "no pixels"),
    "zero-width tensor": (torch.zeros(3, 8, 0, dtype=torch.uint8), "no pixels"),
    "NaN": (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    "NaN tensor": (torch.full((3, 8, 8), float("nan")), "NaN"),
    "5 channels": (np.zeros((8, 8, 5), np.uint8), "5 channels"),
    "2 channels": (np.zeros((8, 8, 2), np.uint8), "2 channels"),
    "channels-last tensor": (torch.zeros(8, 8, 3, dtype=torch.uint8), "8 channels"),
    "channels-first array": (np.zeros((3, 8, 8), np.uint8), "8 channels"),
    "4-D array": (np.zeros((2, 8, 8, 3), np.uint8), "pass a list"),
    "1-D tensor": (torch.zeros(8), "C x H x W"),
    "floats above 1": (np.full((8, 8, 3), 2.0), "from 2 to 2"),
    "negative floats": (torch.full((3, 8, 8), -0.5), "[0, 1]"),
    "empty bytes": (b"", "empty"),
    "text bytes": (b"not an image at all", "not an image"),
    "truncated PNG": ("truncated", "truncated"),
    "empty batch": (torch.zeros(0, 3, 8, 8), "no frames"),
}


ALONE = ("empty batch",)  # passed as they are, not inside a list


@pytest.mark.parametrize("case", list(BAD))
def test_bad_frames_raise_one_clear_error(demo, case):
    model, files = demo
    frame, words = BAD[case]
    if case == "truncated PNG":
        frame = files[0].read_bytes()[:3000]
    with pytest.raises(FrameError) as info:
        # After a good frame, so that the message must name the bad one's position.
        model.predict(frame if case in ALONE else [files[0].read_bytes(), frame])
    message = str(info.value)
    assert "\n" not in message and words in message, message
    if case not in ALONE:
        assert message.startswith("frame 1"), message


def test_mixed_list_other_objects_and_huge_frames(demo):
    model, files = demo
    with pytest.raises(FrameError, match="mixes in-memory frames with file paths"):
        model.predict([files[0], np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(FrameError, match="give a numpy array"):
        frames.to_image({"not": "a frame"})
    # Above the file reader's pixel limit (calloc'd zeros: no memory is touched).
    with pytest.raises(FrameError, match="more than"):
        model.predict(np.zeros((1, frames.MAX_FRAME_PIXELS + 1), np.uint8))


def test_decode_bytes_names_unsupported_formats():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="GIF")
    with pytest.raises(FrameError, match="unsupported image format GIF"):
        frames.decode_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (1, 2, 3)).save(buf, format="PNG")
    assert frames.decode_bytes(buf.getvalue()).size == (5, 4)
