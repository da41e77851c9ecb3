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

``maps_at="crop"`` is the paper's protocol instead: the map at the model's input
resolution, cut to the pixels that show the photo (the whole input except ``longer``'s
padding), with the mask put through the same geometry.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

#: ``--resize`` choices (see the module docstring).
RESIZE_MODES = ("shorter", "longer", "stretch")
#: The geometry of new models, chosen by measurement (README, "Image geometry"; the sweep
#: is bench/bench_geometry.py): the whole photo, aspect kept, its longer side at 224 pixels
#: on a padded square. Model files without geometry settings load as the paper's instead
#: (``shorter``, 256, crop 224: :meth:`PatchCoreConfig.from_json`).
DEFAULT_RESIZE, DEFAULT_IMAGE_SIZE, DEFAULT_CROP = "longer", 224, 0
#: ``evaluate --maps-at`` choices: the photo's own size, or the model's input (the paper).
MAPS_AT = ("original", "crop")


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


def _crop_arg(text: str) -> int:
    value = text.strip().lower()
    if value in ("none", "0"):
        return 0
    try:
        crop = int(value)
    except ValueError:
        crop = -1
    if crop < 0:
        raise argparse.ArgumentTypeError(f"expected a crop side in pixels, or none, got {text!r}")
    return crop


def add_maps_at_option(group) -> None:
    """``--maps-at`` of ``evaluate`` and ``study``."""
    group.add_argument("--maps-at", choices=MAPS_AT, default="original",
                       help="original (default): maps and pixel metrics at each photo's own "
                            "size, every pixel of its mask; crop: at the model's input, "
                            "padding left out (the paper's protocol)")


def add_geometry_options(group, maps_at: bool = False) -> None:
    """The geometry options of ``fit`` and ``study`` (saved in the model); ``maps_at``
    adds :func:`add_maps_at_option` (study)."""
    if maps_at:
        add_maps_at_option(group)
    group.add_argument("--resize", choices=RESIZE_MODES, default=DEFAULT_RESIZE,
                       help=f"longer: longer side to --image-size, on a padded square "
                            f"(padding ignored by maps and metrics); shorter: shorter side to "
                            f"--image-size, then --crop (the paper: shorter 256, crop 224); "
                            f"stretch: both sides, aspect not kept (default {DEFAULT_RESIZE})")
    group.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                       help=f"target side of --resize (default {DEFAULT_IMAGE_SIZE})")
    group.add_argument("--crop", type=_crop_arg, default=DEFAULT_CROP, metavar="PX|none",
                       help=f"centre crop side; none or 0: the whole resized image, maps "
                            f"cover the whole photo (default {DEFAULT_CROP or 'none'})")


__all__ = ["Placement", "place", "RESIZE_MODES", "MAPS_AT", "DEFAULT_RESIZE",
           "DEFAULT_IMAGE_SIZE", "DEFAULT_CROP", "add_geometry_options",
           "add_maps_at_option"]
