"""Overlays: the 256-entry colour table gives matplotlib's colours exactly, the float32
blend is the float64 one within a grey level, and the pool of writer threads writes every
file and records the journal in order."""

import matplotlib
import numpy as np
import pytest
from PIL import Image

from patchcore_fast.geometry import Preprocess
from patchcore_fast.files import ArraySpool
from patchcore_fast.metrics import PixelHistogram
from patchcore_fast.overlays import jet_colours, jet_levels, overlay, write_map_files


def _map_with_edges(rng):
    amap = rng.normal(size=(64, 300)).astype(np.float32)
    # Values on the table's bin edges, below vmin and above vmax too.
    amap[0, :9] = np.array([-5, -1, 0, 1 / 256, 0.5, 255 / 256, 1, 2, 7], np.float32)
    amap[1, :256] = np.arange(256, dtype=np.float32) / 256  # every edge of [0, 1]
    return amap


def _blend_float64(image, amap, vmin, vmax):
    """The first implementation's blend, before its cast: matplotlib's colormap called on
    the map's levels, mixed with the image in float64."""
    t = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0).astype(np.float64)
    colour = matplotlib.colormaps["jet"](t)[..., :3] * 255.0
    alpha = 0.25 + 0.35 * t[..., None]
    return (1 - alpha) * image + alpha * colour


def test_table_colours_equal_matplotlib():
    amap = _map_with_edges(np.random.default_rng(0))
    for vmin, vmax in ((-1.0, 1.0), (0.0, 1.0), (0.3, 0.3), (0.1, 0.7), (1 / 3, 2 / 3)):
        t = jet_levels(amap, vmin, vmax)
        assert t.dtype == np.float32 and t.min() >= 0 and t.max() <= 1
        # The levels of the first implementation, bit for bit (a range whose reciprocal is
        # inexact too: multiplying by it would move some levels across a colour's edge).
        np.testing.assert_array_equal(
            t, np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0))
        np.testing.assert_array_equal(
            jet_colours(t), (matplotlib.colormaps["jet"](t)[..., :3] * 255.0).astype(np.float32))


def test_float32_blend_is_the_float64_blend_within_a_level():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 300, 3), dtype=np.uint8)
    image[0, :4] = [[0, 0, 0], [255, 255, 255], [255, 0, 255], [0, 255, 0]]
    amap = _map_with_edges(rng)
    for vmin, vmax in ((-1.0, 1.0), (0.0, 1.0), (0.3, 0.3), (0.1, 0.7), (1 / 3, 2 / 3)):
        ours = overlay(image, amap, vmin, vmax)
        assert ours.dtype == np.uint8 and ours.shape == image.shape
        # The same whether the photo comes as uint8 or as floats.
        np.testing.assert_array_equal(ours, overlay(image.astype(np.float64), amap, vmin, vmax))
        blend = _blend_float64(image.astype(np.float64), amap, vmin, vmax)
        diff = np.abs(ours.astype(int) - np.clip(blend, 0, 255).astype(np.uint8).astype(int))
        assert diff.max() <= 1
        # Only where the float64 blend sits on a whole grey level (e.g. 0.4 x 5 + 0.6 x 0
        # where the map is saturated), which float32 may put a hair below it.
        on_edge = np.abs(blend - np.round(blend)) < 1e-4
        assert np.all(on_edge[diff != 0])


def test_writer_pool_writes_all_and_records_in_order(tmp_path):
    rng = np.random.default_rng(1)
    sources = []
    for i in range(11):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
        sources.append(p)
    pre = Preprocess(32, 32, resize="shorter")
    hist = PixelHistogram()
    out = tmp_path / "out"
    recorded = []
    with ArraySpool((32, 32), np.float32, None, "map file") as spool:
        maps = rng.normal(size=(11, 32, 32)).astype(np.float32)
        spool.append(maps)
        for m in maps:
            hist.add(m)
        write_map_files(out, spool, [(p, p.stem) for p in sources], pre, hist,
                        overlays=True, save_maps=True, threads=3,
                        written=lambda p, regions: recorded.append(p))
    assert recorded == sources
    for i, p in enumerate(sources):
        assert Image.open(out / "overlays" / f"{p.stem}.png").size == (32, 32)
        np.testing.assert_array_equal(np.load(out / "maps" / f"{p.stem}.npy"), maps[i])
    assert not list(out.rglob("*.tmp"))


def _odd_photos(tmp_path):
    """A rotated JPEG (EXIF orientation 6), a grey PNG and an RGBA PNG."""
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "turned.jpg", exif=exif)
    img.convert("L").save(tmp_path / "grey.png")
    img.convert("RGBA").save(tmp_path / "alpha.png")
    return [tmp_path / "turned.jpg", tmp_path / "grey.png", tmp_path / "alpha.png"]


@pytest.mark.parametrize("workers", [0, 1])
def test_overlay_on_the_pixels_read_for_the_map_equals_reading_again(tmp_path, workers):
    """The one pass draws each overlay on the pixels its map was computed from (no second
    decoding); they are the photo as read again, upright, so the overlay is the same."""
    from patchcore_fast.datasets import iterate_images
    from patchcore_fast.images import read_image
    from patchcore_fast.overlays import write_overlay

    paths = _odd_photos(tmp_path)
    pre = Preprocess(32, 28, resize="shorter")
    batches = list(iterate_images(paths, pre, 2, workers, photos=True))
    assert [len(b) for b in batches] == [4, 4]
    assert all(len(b) == 3 for b in iterate_images(paths, pre, 2, workers))
    got = [(paths[i], size, pixels) for idx, _, sizes, photos in batches
           for i, size, pixels in zip(idx, sizes, photos)]
    assert [p for p, _, _ in got] == paths
    rng = np.random.default_rng(3)
    for path, size, pixels in got:
        again = np.asarray(read_image(path))
        assert pixels.dtype == np.uint8 and pixels.shape == (size[1], size[0], 3)
        np.testing.assert_array_equal(pixels, again)
        for shape in ((size[1], size[0]), (28, 28)):  # the photo's size, the crop's
            amap = rng.normal(size=shape).astype(np.float32)
            mask = amap > 1.0
            one, two = tmp_path / f"one-{path.stem}.png", tmp_path / f"two-{path.stem}.png"
            write_overlay(one, path, amap, pre, -1.0, 2.0, mask, pixels)
            write_overlay(two, path, amap, pre, -1.0, 2.0, mask)
            assert one.read_bytes() == two.read_bytes()
