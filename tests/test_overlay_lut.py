"""Overlays: the 256-entry colour table gives matplotlib's colours exactly, and the pool of
writer threads writes every file and records the journal in order."""

import matplotlib
import numpy as np
from PIL import Image

from patchcore_fast.geometry import Preprocess
from patchcore_fast.files import ArraySpool
from patchcore_fast.metrics import PixelHistogram
from patchcore_fast.overlays import overlay, write_map_files


def _overlay_matplotlib(image, amap, vmin, vmax):
    """The previous implementation: the colormap called on the float map."""
    t = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colour = matplotlib.colormaps["jet"](t)[..., :3] * 255.0
    alpha = 0.25 + 0.35 * t[..., None]
    return np.clip((1 - alpha) * image + alpha * colour, 0, 255).astype(np.uint8)


def test_lut_overlay_equals_matplotlib():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (64, 48, 3))
    amap = rng.normal(size=(64, 48)).astype(np.float32)
    # Values on the table's bin edges, below vmin and above vmax too.
    amap[0, :9] = np.array([-5, -1, 0, 1 / 256, 0.5, 255 / 256, 1, 2, 7], np.float32)
    for vmin, vmax in ((-1.0, 1.0), (0.0, 1.0), (0.3, 0.3)):
        np.testing.assert_array_equal(overlay(image, amap, vmin, vmax),
                                      _overlay_matplotlib(image, amap, vmin, vmax))


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
