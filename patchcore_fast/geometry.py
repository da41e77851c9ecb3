"""Where each photo sits in the model's input, and the way back (issue #15).

Step 1 of the method turns a photo of any size and shape into the model's input in three
moves, each described by a :class:`Placement`:

1. **resize** (``--resize``):

   * ``shorter``: the shorter side to ``image_size``, aspect kept (the paper: 256);
   * ``longer``: the longer side to ``image_size``, aspect kept, then centred on an
     ``image_size`` x ``image_size`` canvas; the padding is filled with the normalisation
     mean (0 after normalising) and is *not* part of the photo: maps and metrics leave it
     out;
   * ``stretch``: both sides to ``image_size``, aspect not kept (anomalib's ``Resize``).

2. **crop** (``--crop``): a centred ``crop`` x ``crop`` box of the canvas (the paper: 224),
   or 0 / ``none``: the whole canvas. With ``shorter`` and no crop the input keeps the
   photo's aspect, so photos of different shapes give inputs (and feature grids) of
   different shapes; the memory bank does not care, and batches are grouped by shape.

3. the way back (:meth:`Placement.to_original`): the map of the model's input is put back
   on the canvas, the canvas's photo part is cut out (undoing the padding) and resized to
   the photo's own size (bilinear, as the map's own upsampling). The part of the photo
   that the crop cut away was never seen by the model: it gets the map's *minimum*, the
   score of the most normal pixel seen, so it can raise no alarm and counts, in the pixel
   metrics, as a defect the model missed when a mask marks one there. (The map's edge
   value would smear a border defect's score over a region never looked at.)

:class:`Preprocess` makes these moves on images (bilinear, then normalised with the
backbone's mean and standard deviation) and masks (nearest-neighbor, so they stay binary).

``maps_at="crop"`` is the paper's protocol instead: the map at the model's input
resolution, cut to the pixels that show the photo (the whole input except ``longer``'s
padding), with the mask put through the same geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .images import UnreadableImage

#: ``--resize`` choices (see the module docstring).
RESIZE_MODES = ("shorter", "longer", "stretch")
#: The geometry of new models, chosen by measurement (README, "Image geometry"; the sweep
#: is bench/bench_geometry.py): the whole photo, aspect kept, its longer side at 224 pixels
#: on a padded square. Model files without geometry settings load as the paper's instead
#: (``shorter``, 256, crop 224: :meth:`PatchCoreConfig.from_json`).
DEFAULT_RESIZE, DEFAULT_IMAGE_SIZE, DEFAULT_CROP = "longer", 224, 0
#: ``evaluate --maps-at`` choices: the photo's own size, or the model's input (the paper).
MAPS_AT = ("original", "crop")
# Pixel budget of the resized image before the centre crop. Resizing the shorter side to
# image_size makes an image of image_size^2 * aspect pixels: fine for photos, but a
# 474-byte 1 x 100,000 PNG would become 256 x 25,600,000 (20 GB as RGB). Above the budget
# only the source region behind the crop is resized (same crop, crop^2 pixels of memory).
MAX_RESIZED_PIXELS = 50_000_000
# Largest model input without a crop (``--resize shorter --crop none`` keeps the photo's
# aspect): the pixels of the largest square input, 2,048 x 2,048 (65,536 patches). A
# longer photo would give proportionally more patches; it is skipped, naming the way out.
MAX_INPUT_PIXELS = 2048 * 2048

#: ImageNet normalisation (RGB), the statistics every supported backbone was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Placement:
    """One photo's geometry: photo -> resized -> canvas (padding) -> input box.

    Attributes:
        size: (width, height) of the photo.
        resized: (width, height) after resizing.
        canvas: (width, height) of the canvas the resized photo sits on.
        offset: (x, y) of the resized photo's top-left corner on the canvas.
        box: (x, y, width, height) of the model's input on the canvas.
    """

    size: tuple[int, int]
    resized: tuple[int, int]
    canvas: tuple[int, int]
    offset: tuple[int, int]
    box: tuple[int, int, int, int]

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model's input (the map's size before going back)."""
        return self.box[3], self.box[2]

    def visible(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the input pixels that show the photo (not padding)."""
        bx, by, bw, bh = self.box
        ox, oy = self.offset
        rw, rh = self.resized
        x0, y0 = max(bx, ox), max(by, oy)
        x1, y1 = min(bx + bw, ox + rw), min(by + bh, oy + rh)
        return x0 - bx, y0 - by, max(x1, x0) - bx, max(y1, y0) - by

    def to_crop(self, amap: Tensor) -> Tensor:
        """The map at input resolution without the padding (the paper's protocol).

        Args:
            amap (Tensor[H_in, W_in]): map of the model's input.

        Returns:
            Tensor[h, w]: its part that shows the photo (all of it unless ``longer`` padded).
        """
        x0, y0, x1, y1 = self.visible()
        return amap[y0:y1, x0:x1]

    def to_original(self, amap: Tensor) -> Tensor:
        """The map at the photo's own size: undo the crop, the padding and the resize.

        Args:
            amap (Tensor[H_in, W_in]): map of the model's input.

        Returns:
            Tensor[height, width] float32 (the photo's size); the part the crop cut away
            holds the map's minimum (module docstring).
        """
        bx, by, bw, bh = self.box
        ox, oy = self.offset
        rw, rh = self.resized
        full = amap.new_full((rh, rw), float(amap.min()) if amap.numel() else 0.0)
        # The input box in the resized photo's coordinates, clipped to the photo.
        x0, y0 = max(bx - ox, 0), max(by - oy, 0)
        x1, y1 = min(bx - ox + bw, rw), min(by - oy + bh, rh)
        if x1 > x0 and y1 > y0:
            full[y0:y1, x0:x1] = amap[y0 + oy - by:y1 + oy - by, x0 + ox - bx:x1 + ox - bx]
        w, h = self.size
        if (w, h) == (rw, rh):
            return full.float()
        return F.interpolate(full[None, None].float(), size=(h, w), mode="bilinear",
                             align_corners=False)[0, 0]


def place(size: tuple[int, int], resize: str, image_size: int, crop: int) -> Placement:
    """The :class:`Placement` of a photo of ``size`` (width, height).

    Args:
        size: the photo's (width, height).
        resize: one of :data:`RESIZE_MODES`.
        image_size: the target side (shorter side, longer side, or both).
        crop: side of the centred crop; 0 keeps the whole canvas.
    """
    w, h = size
    if resize == "shorter":
        scale = image_size / min(w, h)
        # At least the crop in both directions (a 1 x 100,000 sliver still fills it).
        rw, rh = max(crop, round(w * scale)), max(crop, round(h * scale))
        canvas, offset = (rw, rh), (0, 0)
    elif resize == "longer":
        scale = image_size / max(w, h)
        rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = (image_size, image_size)
        offset = ((image_size - rw) // 2, (image_size - rh) // 2)
    elif resize == "stretch":
        rw = rh = image_size
        canvas, offset = (rw, rh), (0, 0)
    else:
        raise ValueError(f"resize should be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if crop:
        # Centred, rounded as the paper's torchvision CenterCrop.
        left = int(round((canvas[0] - crop) / 2.0))
        top = int(round((canvas[1] - crop) / 2.0))
        box = (left, top, crop, crop)
    else:
        box = (0, 0, *canvas)
    return Placement((w, h), (rw, rh), canvas, offset, box)


@dataclass(frozen=True)
class Preprocess:
    """Resize, pad, crop, normalise (the module docstring describes the moves and the way
    back); the defaults are those of new models (:data:`DEFAULT_RESIZE`, ...).

    Attributes:
        image_size: target side of the resize (shorter side, longer side or both).
        crop: side of the centre crop (<= image_size); 0 keeps the whole resized image.
        mean: per-channel mean for normalisation.
        std: per-channel standard deviation.
        max_pixels: pixel budget of the resized image (:data:`MAX_RESIZED_PIXELS`).
        resize: ``shorter`` (paper), ``longer`` (padded square) or ``stretch``.
    """

    image_size: int = DEFAULT_IMAGE_SIZE
    crop: int = DEFAULT_CROP
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_pixels: int = MAX_RESIZED_PIXELS
    resize: str = DEFAULT_RESIZE

    def placement(self, size: tuple[int, int]) -> Placement:
        """Where a photo of ``size`` (width, height) lands in the model's input."""
        return place(size, self.resize, self.image_size, self.crop)

    @property
    def fixed_input(self) -> bool:
        """Whether every photo gives an input of the same shape: a crop, or a resize to a
        square (``longer``, ``stretch``). Only ``shorter`` without a crop keeps each
        photo's aspect, so its inputs (and feature grids) differ."""
        return bool(self.crop) or self.resize != "shorter"

    def oversize(self, size: tuple[int, int]) -> str | None:
        """Why an image of ``size`` (width, height) takes the bounded path, or None.

        Above :attr:`max_pixels` after resizing, :meth:`display` resizes only the region
        behind the crop; the model then sees a sliver of an extreme panorama, which the
        message says. (Only ``shorter`` can exceed the budget; without a crop such an
        image cannot be read at all: :meth:`display` raises.)
        """
        w, h = size
        p = self.placement(size)
        rw, rh = p.canvas
        if rw * rh <= self.max_pixels:
            return None
        seen = 100.0 * (self.crop / rw) * (self.crop / rh)
        return (f"{w:,} x {h:,} pixels would be {rw:,} x {rh:,} after resizing, above the "
                f"budget of {self.max_pixels:,} pixels: only the region behind the centre "
                f"crop is resized (the model sees {seen:.2g} % of the image)")

    def _geometry(self, img: Image.Image, resample: int, fill: tuple[int, ...] | int
                  ) -> Image.Image:
        p = self.placement(img.size)
        left, top, bw, bh = p.box
        if not self.crop and bw * bh > min(self.max_pixels, MAX_INPUT_PIXELS):
            w, h = img.size
            raise UnreadableImage(
                f"{w:,} x {h:,} pixels would be a {bw:,} x {bh:,} input without a crop, above "
                f"{min(self.max_pixels, MAX_INPUT_PIXELS):,} pixels; fit with --resize longer "
                f"or a --crop")
        if p.canvas[0] * p.canvas[1] > self.max_pixels:
            return self._bounded_geometry(img, resample, p.resized, left, top)
        img = img.resize(p.resized, resample)
        if p.canvas != p.resized:  # longer: centre the photo on a padded square
            canvas = Image.new(img.mode, p.canvas, fill)
            canvas.paste(img, p.offset)
            img = canvas
        if (bw, bh) != img.size:
            img = img.crop((left, top, left + bw, top + bh))
        return img

    def _bounded_geometry(self, img: Image.Image, resample: int, size: tuple[int, int],
                          left: int, top: int) -> Image.Image:
        """The crop of :meth:`_geometry` without making the resized image.

        Pillow resizes in two separable passes, horizontal then vertical, rounding to 8 bits
        in between. Output pixel (i, j) of the crop sits at source point
        ((left + i + 0.5) sx, (top + j + 0.5) sy), sx = w / size[0]; a pass over the source
        box that starts at (left sx, top sy) and spans crop pixels maps it to the same
        point, and the filter is clipped at the image's edges, not the box's. So: keep the
        source rows the vertical filter can reach (its support, ``max(sy, 1)`` rows either
        side for bilinear, plus a margin), run the horizontal pass on the crop's columns,
        then the vertical pass on the crop's rows. Memory: crop x (rows kept) pixels. The
        box coordinates are floats, so filter weights can differ in the last bit: pixels
        agree to within one 8-bit level (bilinear), nearest-neighbor picks within a pixel.
        """
        w, h = img.size
        sx, sy = w / size[0], h / size[1]
        reach = math.ceil(max(sy, 1.0)) + 2
        y0 = max(0, math.floor(top * sy) - reach)
        y1 = min(h, math.ceil((top + self.crop) * sy) + reach)
        band = img.crop((0, y0, w, y1))
        band = band.resize((self.crop, y1 - y0), resample,
                           box=(left * sx, 0, (left + self.crop) * sx, y1 - y0))
        return band.resize((self.crop, self.crop), resample,
                           box=(0, top * sy - y0, self.crop, (top + self.crop) * sy - y0))

    def display(self, img: Image.Image) -> np.ndarray:
        """The model's input as uint8 [H_in, W_in, 3] (before normalising).

        ``longer``'s padding is the normalisation mean, so it normalises to 0.
        """
        fill = tuple(int(round(255 * m)) for m in self.mean)
        return np.asarray(self._geometry(img, Image.BILINEAR, fill))

    def image(self, img: Image.Image) -> Tensor:
        """Tensor[3, H_in, W_in] float32, normalised (``crop`` x ``crop`` with a crop)."""
        x = torch.from_numpy(self.display(img).copy()).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def mask(self, img: Image.Image | None, size: tuple[int, int] | None = None) -> Tensor:
        """A mask put through the image's geometry, cut to the pixels that show the photo
        (the ground truth of :meth:`Placement.to_crop` maps).

        Args:
            img: the mask (mode L), or None: a good image, all False.
            size: (width, height) of the photo when ``img`` is None (without it: the
                crop's square, as a ``shorter`` geometry gives).

        Returns:
            Tensor[h, w] bool.
        """
        if img is None and size is None:
            if not self.crop:
                raise ValueError("an absent mask needs the photo's size when there is no crop")
            return torch.zeros(self.crop, self.crop, dtype=torch.bool)
        p = self.placement(img.size if img is not None else size)
        x0, y0, x1, y1 = p.visible()
        if img is None:
            return torch.zeros(y1 - y0, x1 - x0, dtype=torch.bool)
        m = torch.from_numpy(np.asarray(self._geometry(img, Image.NEAREST, 0)) > 0)
        return m[y0:y1, x0:x1]
