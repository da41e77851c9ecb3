"""Overlays: each anomaly map drawn on its photo in matplotlib's jet colours, the raw maps
and the defect regions' masks, written by a small pool of threads.

With a calibrated model the maps come as each batch is scored, with the pixels read for
them (:func:`write_maps_as_they_come`), and the colour scale is the model's, fixed at fit.
Without one (a model file from before calibration; ``evaluate``) they come parked in a
temporary :class:`~patchcore_fast.files.MapSpool` (never all in memory), the colour scale
from a histogram of all their pixels (:class:`~patchcore_fast.metrics.PixelHistogram`),
and each photo is read again. Either way the scale is the same for every image of a run.
Every file is written atomically (:mod:`patchcore_fast.files`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from .errors import PatchCoreError
from .files import ArraySpool, MapSpool, atomic_path, text_name
from .images import UnreadableImage, read_image
from .regions import find_regions, outline, regions_json


#: The formats an overlay can be written in (``--overlay-format``), which are also the
#: files' extensions: lossless PNG (:func:`png_bytes`, the default) or JPEG at
#: :data:`JPEG_QUALITY` (Pillow; about 10 times cheaper to write than the PNG and 8 times
#: smaller, for lines that keep an overlay of every photo: bench/RESULTS.md, "Overlays,
#: fifth session").
OVERLAY_FORMATS = ("png", "jpg")
JPEG_QUALITY = 90

#: zlib's settings for overlays and masks: level 1 with its run-length strategy, the
#: fastest of the levels and strategies measured on PNG's filtered rows, and the smallest
#: files too (bench/RESULTS.md, "Overlays, fourth session").
ZLIB_LEVEL, ZLIB_STRATEGY = 1, zlib.Z_RLE


def png_bytes(pixels: np.ndarray) -> bytes:
    """A lossless PNG of 8-bit grey (``[H, W]``) or RGB (``[H, W, 3]``) pixels.

    Each row is stored with PNG's Up filter (the byte above subtracted, modulo 256) and
    deflated by zlib (:data:`ZLIB_LEVEL`, :data:`ZLIB_STRATEGY`). Pillow, the usual writer,
    picks a filter for every row by trying all five and has no option to do otherwise;
    those trials are most of its time at level 1. Up alone writes an overlay (a photo
    under a smooth colour layer) about twice as fast, in a file 15-25 % larger than the
    best filter per row (bench/RESULTS.md, "Overlays, fifth session"). Any PNG reader
    decodes it (tests: Pillow and libpng give the pixels back).

    Args:
        pixels: uint8 array[H, W] or [H, W, 3], H and W >= 1.

    Returns:
        the file's bytes.
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or 0 in pixels.shape[:2] \
            or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"png_bytes takes uint8 [H, W] or [H, W, 3] pixels, got "
                         f"{pixels.dtype} {list(pixels.shape)}")
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    # Each row: its filter type byte (0 None for the first row, which has no row above;
    # 2 Up for the others), then its bytes minus those of the row above.
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[0, 0], filtered[1:, 0] = 0, 2
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    deflate = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS, 8, ZLIB_STRATEGY)
    idat = deflate.compress(filtered) + deflate.flush()
    colour = 2 if pixels.ndim == 3 else 0  # PNG colour types: 2 RGB, 0 grey
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        for kind, data in ((b"IHDR", header), (b"IDAT", idat), (b"IEND", b"")))


@functools.lru_cache(maxsize=None)
def _jet_lut() -> np.ndarray:
    """matplotlib's ``jet`` as its 256-entry table, float32 [256, 3] in 0-255.

    A matplotlib colormap is this table: ``cmap(t)`` for t in [0, 1] is entry
    ``min(int(t * 256), 255)``, computed in t's own dtype, so indexing it gives the same
    colours without the per-call RGBA float64 array (4 x 8 bytes a pixel) that ``cmap(t)``
    builds. (The table's values, products of float64 by 255, are held in float32 for the
    blend, which is float32: see :func:`overlay`.)
    """
    import matplotlib  # here, not at start-up: only runs that draw overlays need it

    cmap = matplotlib.colormaps["jet"]
    return (cmap(np.arange(cmap.N))[:, :3] * 255.0).astype(np.float32)


def jet_levels(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """The map's colour level t in [0, 1], float32: ``vmin`` -> 0, ``vmax`` -> 1, clipped."""
    t = np.subtract(amap, np.float32(vmin), dtype=np.float32)
    t /= np.float32(max(vmax - vmin, 1e-12))  # a division, as ever: not its reciprocal's
    return np.clip(t, 0.0, 1.0, out=t)        # product, which moves t by an ulp


def jet_colours(t: np.ndarray) -> np.ndarray:
    """matplotlib's ``jet`` colours of the levels ``t`` (float32 in [0, 1]), float32
    [..., 3] in 0-255: entry ``min(int(t * 256), 255)`` of :func:`_jet_lut`, as
    ``matplotlib.colormaps["jet"](t)[..., :3] * 255`` gives them for the same float32 t."""
    lut = _jet_lut()
    index = (t * np.float32(len(lut))).astype(np.intp)
    np.minimum(index, len(lut) - 1, out=index)
    return np.take(lut, index, axis=0)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Blend a jet-coloured map onto the image: ``(1 - a) * image + a * colour`` with the
    map's weight ``a = 0.25 + 0.35 t`` (a quarter where it is coldest, 60 % where hottest).

    In float32, in place on the colour array (a 900 x 900 photo: about 13 ms, the float64
    of the first versions about 60). The blend lies between the image and the colour, both
    in [0, 255]; float32 rounding moves it by far less than a grey level, so it is cast
    without clipping (truncated, as before) and differs from the float64 blend by at most
    one level in a few pixels (tests/test_overlay_lut.py).

    Args:
        image (uint8 or float array[H, W, 3]): the image as the model saw it, 0-255.
        amap (float array[H, W]): its anomaly map.
        vmin, vmax: map values drawn as the coldest and hottest colour.

    Returns:
        uint8 array[H, W, 3].
    """
    t = jet_levels(amap, vmin, vmax)
    drawn = jet_colours(t)
    alpha = t[..., None]
    alpha *= np.float32(0.35)
    alpha += np.float32(0.25)
    base = np.asarray(image, dtype=np.float32)
    drawn -= base       # colour - image
    drawn *= alpha      # a (colour - image)
    drawn += base       # image + a (colour - image) = (1 - a) image + a colour
    return drawn.astype(np.uint8)


def encode_overlay(pixels: np.ndarray, overlay_format: str = "png") -> bytes:
    """An overlay's file: :func:`png_bytes`, or a JPEG at :data:`JPEG_QUALITY` (Pillow).

    Args:
        pixels: uint8 array[H, W, 3].
        overlay_format: one of :data:`OVERLAY_FORMATS`.
    """
    if overlay_format == "png":
        return png_bytes(pixels)
    if overlay_format != "jpg":
        raise ValueError(f"overlay_format should be one of {OVERLAY_FORMATS}, got "
                         f"{overlay_format!r}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="JPEG",
                                                       quality=JPEG_QUALITY)
    return buf.getvalue()


def write_overlay(path: Path, source: Path, amap: np.ndarray, preprocess, vmin: float,
                  vmax: float, regions: np.ndarray | None = None,
                  photo: np.ndarray | None = None, overlay_format: str = "png") -> None:
    """Write the overlay of ``amap`` on the image ``source`` as a PNG (or a JPEG:
    ``overlay_format`` is one of :data:`OVERLAY_FORMATS`).

    A map at the photo's own size is laid on the photo itself; a crop-sized map
    (``maps_at="crop"``) on the model's input, without padding. The photo is the pixels
    read for the map when given (``photo``: uint8 array[H, W, 3] upright, as
    :func:`~patchcore_fast.datasets.iterate_images` gives them), else read again as it
    was for its map (:func:`~patchcore_fast.images.read_image`: the same decision on its
    orientation), so they fit; a photo changed on disk since is one line, not a traceback.
    With ``regions`` (the bool mask of the defect regions, the map's shape) their outlines
    are drawn in white (:func:`~patchcore_fast.regions.outline`, 1 pixel per 300 of the
    shorter side).
    """
    if photo is None:
        try:
            photo = np.asarray(read_image(source))
        except UnreadableImage as exc:
            raise PatchCoreError(f"cannot read image {text_name(source)} again for its "
                                 f"overlay (changed during the run?): {exc}") from None
    height, width = photo.shape[:2]
    if amap.shape == (height, width):
        img = photo
    else:
        x0, y0, x1, y1 = preprocess.placement((width, height)).visible()
        img = preprocess.display(Image.fromarray(photo))[y0:y1, x0:x1]
    if img.shape[:2] != amap.shape:
        raise PatchCoreError(f"image {text_name(source)} is {width} x {height} now, not the "
                             f"size it was scored at (changed during the run?)")
    with atomic_path(path) as tmp:
        drawn = overlay(img, amap, vmin, vmax)
        if regions is not None:
            drawn[outline(regions, max(1, min(amap.shape) // 300))] = 255
        tmp.write_bytes(encode_overlay(drawn, overlay_format))


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Write a region mask as an 8-bit grey PNG: 255 in the regions, 0 elsewhere (the
    convention of MVTec AD's ground-truth masks, so it can be compared with them)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(np.asarray(mask, dtype=np.uint8) * np.uint8(255)))


def write_npy(path: Path, array: np.ndarray) -> None:
    """Write one array as ``.npy``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def map_range(pixels) -> tuple[float, float]:
    """Colour scale of the overlays: the 1st and 99.9th percentile of all map pixels.

    Args:
        pixels (metrics.PixelHistogram): every pixel of the maps drawn.
    """
    return pixels.quantile(0.01), pixels.quantile(0.999)


def writer_threads() -> int:
    """Threads that write overlays and maps: PNG encoding (zlib) and numpy release the
    GIL, so a few threads keep the cores busy; more than 4 only add memory."""
    return max(1, min(4, os.cpu_count() or 1))


def write_map_files(out: Path, spool: ArraySpool | MapSpool, images: Sequence[tuple[Path, str]],
                    preprocess, pixels, overlays: bool = True, save_maps: bool = False,
                    written: Callable[[Path, list | None], None] | None = None,
                    threads: int | None = None, scale: tuple[float, float] | None = None,
                    regions_at: float | None = None, overlay_format: str = "png") -> None:
    """The second pass of score and evaluate: each parked map to its overlay and ``.npy``
    (:func:`write_maps_as_they_come` over the spool's maps).

    Args:
        out: output folder (files go to ``overlays/<name>.<overlay_format>`` and
            ``maps/<name>.npy``).
        spool: the maps, item i belonging to ``images[i]``.
        images: (source image, name relative to ``overlays/`` and ``maps/``) per map.
        preprocess (geometry.Preprocess): the model's image geometry.
        pixels (metrics.PixelHistogram): every pixel of the maps (sets the colour scale
            unless ``scale`` is given).
        overlays: write the overlays (``overlay_format``).
        save_maps: write the raw maps.
        written: called with each source image and its regions (None without
            ``regions_at``) once its files are written.
        threads: writer threads (default :func:`writer_threads`).
        scale: (coldest, hottest) map values: the model's fixed colour scale.
        regions_at: draw the outlines of the regions above this pixel threshold.
        overlay_format: ``png`` or ``jpg`` (the overlays' format and extension).
    """
    vmin, vmax = scale if scale is not None else map_range(pixels)
    write_maps_as_they_come(out, ((source, name, spool.read(i)[0], None)
                                  for i, (source, name) in enumerate(images)),
                            preprocess, vmin, vmax, overlays, save_maps, written, threads,
                            regions_at, overlay_format=overlay_format)


def write_maps_as_they_come(out: Path,
                            maps: Iterable[tuple[Path, str, np.ndarray, np.ndarray | None]],
                            preprocess, vmin: float, vmax: float, overlays: bool = True,
                            save_maps: bool = False,
                            written: Callable[[Path, list | None], None] | None = None,
                            threads: int | None = None, regions_at: float | None = None,
                            min_area: int = 0, save_masks: bool = False,
                            overlay_format: str = "png") -> None:
    """Each map to its defect regions, overlay, ``.npy`` and mask as the maps come (one
    pass with scoring when ``maps`` is a generator that scores: the colour scale is fixed
    beforehand).

    Images are written by a small pool of threads (each file atomically); ``maps`` is
    consumed and ``written`` is called in this thread, in order, so the resume journal
    lists a prefix of the images in order: an image is recorded only once its files and
    those of every image before it are on disk. At most ``2 * threads`` maps are in flight
    (bounded memory). The first error stops the pool and is raised here. The regions are
    found in the writer threads too (scipy's labelling releases the GIL), once per map:
    the same mask gives the overlay's outlines, the mask file and the regions returned.

    Args:
        out: output folder (files go to ``overlays/<name>.<overlay_format>`` and
            ``maps/<name>.npy``).
        maps: (source image, name relative to ``overlays/`` and ``maps/``, map, the
            photo's pixels as read for the map, or None to read the file again).
        preprocess (geometry.Preprocess): the model's image geometry.
        vmin, vmax: map values drawn as the coldest and the hottest colour.
        overlays: write the overlays (``overlay_format``).
        save_maps: write the raw maps.
        written: called with each source image and its regions (a list of
            :func:`~patchcore_fast.regions.regions_json` dicts; None without
            ``regions_at``) once its files are written.
        threads: writer threads (default :func:`writer_threads`).
        regions_at: the pixel threshold of the defect regions (their outlines are drawn on
            the overlays), or None for no regions.
        min_area: regions of fewer pixels are left out.
        save_masks: write each map's region mask (``masks/<name>.png``; needs
            ``regions_at``).
        overlay_format: ``png`` or ``jpg`` (the overlays' format and extension:
            ``overlays/<name>.jpg``).
    """
    def write_one(source: Path, name: str, amap: np.ndarray, photo: np.ndarray | None
                  ) -> tuple[Path, list | None]:
        found, mask = find_regions(amap, regions_at, min_area) if regions_at is not None \
            else (None, None)
        if overlays:
            write_overlay(out / "overlays" / f"{name}.{overlay_format}", source, amap,
                          preprocess, vmin, vmax, mask, photo, overlay_format)
        if save_maps:
            write_npy(out / "maps" / f"{name}.npy", amap)
        if save_masks:
            write_mask(out / "masks" / f"{name}.png", mask)
        return source, None if found is None else regions_json(found)

    threads = threads or writer_threads()
    pending: collections.deque = collections.deque()
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="writer")

    def finish_one() -> None:
        source, regions = pending.popleft().result()
        if written is not None:
            written(source, regions)

    try:
        for source, name, amap, photo in maps:
            pending.append(pool.submit(write_one, source, name, amap, photo))
            while len(pending) >= 2 * threads:
                finish_one()
        while pending:
            finish_one()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
