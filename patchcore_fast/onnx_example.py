#!/usr/bin/env python3
"""Score photos with a patchcore-fast ONNX export, using only onnxruntime, numpy and Pillow.

    pip install onnxruntime numpy Pillow
    python onnx_example.py bottle.onnx photo.png more/*.jpg --maps maps/

Prints ``photo,score`` per photo (plus ``,normalised,label`` when the graph has those
outputs: a calibrated model) and, with ``--maps DIR``, writes each anomaly map at the
photo's own size as ``DIR/<name>.npy`` (float32, rows x columns = photo height x width; a
second photo of the same name: ``<name>-2.npy``).

This file imports nothing from patchcore_fast: copy it next to the ``.onnx`` file and it
runs. The graph needs the photo prepared exactly as the package prepares it; the steps
below are the whole recipe, in an order another language can follow (README, "Export to
ONNX"). The settings come from the file's own metadata (``resize``, ``image_size``,
``crop``, ``mean``, ``std``, ``pad_fill``).

1. Read the photo as 8-bit RGB, turned upright by its EXIF orientation.
2. Placement (:func:`placement`): resize (``longer``: the longer side to ``image_size``,
   aspect kept, centred on an ``image_size`` square; ``shorter``: the shorter side, at
   least ``crop``; ``stretch``: both sides), then a centred ``crop`` (0: none). Sizes are
   ``round(side * scale)`` and the crop's corner ``round((canvas - crop) / 2)``, both
   rounding halves to even (Python's ``round``).
3. Resize with Pillow's BILINEAR filter (a triangle filter, widened by the scale factor
   when shrinking, so it antialiases), paste on a canvas filled with ``pad_fill`` (the
   mean as 8-bit RGB), cut the crop.
4. ``(pixel / 255 - mean) / std`` per channel in float32, channels first: [3, H, W].
5. Run the graph on a batch [N, 3, H, W]: ``score`` [N], ``map`` [N, H, W] (and
   ``normalised`` [N], ``label`` [N], when calibrated).
6. The map back to the photo (:func:`map_to_photo`): a canvas of the resized photo's size
   filled with the map's minimum (what the crop cut away was never seen: it raises no
   alarm), the map pasted where the crop sits, the padding left out, then a bilinear
   resize to the photo's size with half-pixel centres and no antialiasing
   (source = (destination + 0.5) * in / out - 0.5, clamped at 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def placement(width: int, height: int, meta: dict):
    """Where a photo of width x height lands: resized (w, h), canvas (w, h), offset (x, y)
    of the resized photo on the canvas, and box (x, y, w, h) of the input on the canvas."""
    mode, size, crop = meta["resize"], int(meta["image_size"]), int(meta["crop"])
    if mode == "shorter":
        s = size / min(width, height)
        rw, rh = max(crop, round(width * s)), max(crop, round(height * s))
        canvas, offset = (rw, rh), (0, 0)
    elif mode == "longer":
        s = size / max(width, height)
        rw, rh = max(1, round(width * s)), max(1, round(height * s))
        canvas, offset = (size, size), ((size - rw) // 2, (size - rh) // 2)
    else:  # stretch
        rw = rh = size
        canvas, offset = (size, size), (0, 0)
    if crop:
        box = (round((canvas[0] - crop) / 2), round((canvas[1] - crop) / 2), crop, crop)
    else:
        box = (0, 0, *canvas)
    return (rw, rh), canvas, offset, box


def prepare(photo: Image.Image, meta: dict) -> np.ndarray:
    """Steps 2-4: a photo -> the graph's input for it, float32 [3, H, W]."""
    resized, canvas, offset, (x, y, w, h) = placement(*photo.size, meta)
    img = photo.resize(resized, Image.BILINEAR)
    if canvas != resized:
        padded = Image.new("RGB", canvas, tuple(json.loads(meta["pad_fill"])))
        padded.paste(img, offset)
        img = padded
    img = img.crop((x, y, x + w, y + h))
    mean = np.array(json.loads(meta["mean"]), np.float32)
    std = np.array(json.loads(meta["std"]), np.float32)
    a = (np.asarray(img, np.float32) / 255 - mean) / std
    return a.transpose(2, 0, 1)


def resize_bilinear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and no antialiasing."""
    def taps(n_out: int, n_in: int):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(src.astype(np.int64), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    y0, y1, ty = taps(height, a.shape[0])
    x0, x1, tx = taps(width, a.shape[1])
    rows = a[y0] * (1 - ty)[:, None] + a[y1] * ty[:, None]
    return rows[:, x0] * (1 - tx) + rows[:, x1] * tx


def map_to_photo(amap: np.ndarray, width: int, height: int, meta: dict) -> np.ndarray:
    """Step 6: the map of the graph's input -> float32 [height, width] of the photo."""
    (rw, rh), _, (ox, oy), (bx, by, bw, bh) = placement(width, height, meta)
    full = np.full((rh, rw), amap.min(), np.float32)
    x0, y0 = max(bx - ox, 0), max(by - oy, 0)  # the input box, clipped to the photo
    x1, y1 = min(bx - ox + bw, rw), min(by - oy + bh, rh)
    if x1 > x0 and y1 > y0:
        full[y0:y1, x0:x1] = amap[y0 + oy - by:y1 + oy - by, x0 + ox - bx:x1 + ox - bx]
    if (rw, rh) == (width, height):
        return full
    return resize_bilinear(full, height, width).astype(np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the .onnx file written by patchcore-fast export")
    parser.add_argument("photos", nargs="+", help="image files")
    parser.add_argument("--maps", metavar="DIR", help="write each map as DIR/<name>.npy")
    parser.add_argument("--batch-size", type=int, default=8, help="photos per run")
    args = parser.parse_args(argv)

    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    outputs = [o.name for o in session.get_outputs()]
    seen: dict[str, int] = {}
    if args.maps:
        Path(args.maps).mkdir(parents=True, exist_ok=True)
    for lo in range(0, len(args.photos), args.batch_size):
        paths = args.photos[lo:lo + args.batch_size]
        photos = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths]
        batch = np.stack([prepare(photo, meta) for photo in photos])
        result = dict(zip(outputs, session.run(None, {"images": batch})))
        for i, (path, photo) in enumerate(zip(paths, photos)):
            row = [path, f"{result['score'][i]:.9g}"]
            if "normalised" in result:
                row += [f"{result['normalised'][i]:.9g}",
                        "defective" if result["label"][i] else "good"]
            print(",".join(row))
            if args.maps:  # <name>.npy; photos of the same name: <name>-2.npy, ...
                stem = Path(path).stem
                seen[stem] = seen.get(stem, 0) + 1
                name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
                amap = map_to_photo(result["map"][i], *photo.size, meta)
                np.save(Path(args.maps) / f"{name}.npy", amap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
