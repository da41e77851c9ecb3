"""Pictures already in memory -> the decoded image the file reader produces (issue #22).

A camera on a line hands over frames, not files. This module turns each kind of in-memory
picture into what :func:`~patchcore_fast.data.read_image` makes of a file, an upright 8-bit
RGB Pillow image, by the same conversions, so that scoring it gives exactly the scores and
maps of the same picture read from a file (bit for bit where the pixels decode the same):

* numpy arrays ``H x W`` or ``H x W x C`` (channels last, C = 1, 3 or 4):

  * ``uint8``: as stored (C = 4 drops the alpha channel, as for an RGBA PNG);
  * ``uint16``: grey (C = 1 or none) maps [0, 65535] linearly to [0, 255], ``round(v /
    257)``, as Pillow's 16-bit grey; colour keeps the high byte, ``v >> 8``, as Pillow reads
    a 16-bit RGB(A) PNG or TIFF;
  * floating point in [0, 1]: ``round(255 v)`` (as a float image file).

* tensors ``C x H x W`` or ``B x C x H x W`` (channels first, C = 1, 3 or 4), ``uint8`` or
  floating point in [0, 1], on any device: as the array of the same values;
* Pillow images of any mode: turned upright by their EXIF orientation and converted as a
  file of that mode is;
* ``bytes`` (or ``bytearray`` / ``memoryview``): an encoded PNG, JPEG, BMP or TIFF file,
  decoded as the file reader decodes it (the HTTP service's bodies).

Anything else (another dtype, no pixels, NaN, values outside [0, 1], 2 or 5 channels, an
unreadable encoded file) raises :class:`FrameError`, one line naming the frame and what to
do. The pixel budget is the file reader's (:data:`MAX_FRAME_PIXELS`).

:func:`predict` scores frames with a fitted model (``PatchCore.predict`` delegates here
when given frames); :func:`score_inputs` is the batch step it shares with the service.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from .images import IMAGE_FORMATS, UnreadableImage, _to_8bit_rgb
from .errors import PatchCoreError, first_line

#: Largest frame, in pixels: the file reader's limit (Pillow's decompression-bomb error
#: threshold, twice ``Image.MAX_IMAGE_PIXELS``), so a frame is refused where its file would be.
MAX_FRAME_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
_CHANNELS = (1, 3, 4)
_ENCODED = (bytes, bytearray, memoryview)


class FrameError(PatchCoreError, ValueError):
    """An in-memory picture that cannot be scored (the message says which and why)."""


class FrameTooLarge(FrameError):
    """A picture above the pixel budget (:data:`MAX_FRAME_PIXELS`)."""


def is_frames(images: Any) -> bool:
    """Whether ``images`` is one in-memory picture or a list of them (not paths)."""
    if isinstance(images, (list, tuple)):
        kinds = [_is_frame(x) for x in images]
        if any(kinds) and not all(kinds):
            raise FrameError("a list that mixes in-memory frames with file paths; score "
                             "them in two calls")
        return bool(kinds) and all(kinds)
    return _is_frame(images)


def _is_frame(x: Any) -> bool:
    return isinstance(x, (np.ndarray, Tensor, Image.Image, *_ENCODED))


def as_list(frames: Any) -> list:
    """One frame, a list of frames or a ``B x C x H x W`` tensor -> a list of frames."""
    items = list(frames) if isinstance(frames, (list, tuple)) else [frames]
    out = []
    for x in items:
        if isinstance(x, Tensor) and x.dim() == 4:
            out.extend(x.unbind(0))
        else:
            out.append(x)
    if not out:
        raise FrameError("no frames given (an empty list or a batch of 0 images)")
    return out


def to_image(frame: Any, name: str = "frame") -> Image.Image:
    """One in-memory picture as the file reader's upright 8-bit RGB image.

    Args:
        frame: numpy array, tensor (``C x H x W``), Pillow image or encoded file bytes
            (module docstring).
        name: what to call it in messages (e.g. ``frame 3``).

    Returns:
        PIL image in mode ``RGB``.

    Raises:
        FrameError: one line naming ``name`` and the problem.
    """
    if isinstance(frame, _ENCODED):
        return decode_bytes(bytes(frame), name)
    if isinstance(frame, Image.Image):
        return _from_pil(frame, name)
    if isinstance(frame, Tensor):
        return _from_array(_tensor_to_hwc(frame, name), name)
    if isinstance(frame, np.ndarray):
        return _from_array(frame, name)
    raise FrameError(f"{name} is a {type(frame).__name__}; give a numpy array, a tensor, a "
                     f"PIL image or encoded image bytes (or a file path, not mixed with "
                     f"frames)")


def _tensor_to_hwc(t: Tensor, name: str) -> np.ndarray:
    """A ``C x H x W`` tensor (or ``H x W``) -> the numpy array ``H x W x C`` of its values."""
    if t.dim() not in (2, 3):
        raise FrameError(f"{name} is a tensor of shape {tuple(t.shape)}; give C x H x W or "
                         f"B x C x H x W (channels first)")
    if t.dim() == 3 and t.shape[0] not in _CHANNELS:
        raise FrameError(f"{name} is a tensor of shape {tuple(t.shape)}: {t.shape[0]} "
                         f"channels; tensors are C x H x W with C = 1, 3 or 4 (channels "
                         f"first)")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        t = t.float()
    t = t.detach().cpu()
    return (t.permute(1, 2, 0) if t.dim() == 3 else t).numpy()


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    """The checks and conversions of the module docstring for an ``H x W [x C]`` array."""
    if a.ndim not in (2, 3):
        hint = "; several frames: pass a list" if a.ndim == 4 else ""
        raise FrameError(f"{name} is an array of shape {a.shape}; give H x W or H x W x C "
                         f"(channels last){hint}")
    channels = 1 if a.ndim == 2 else a.shape[2]
    if channels not in _CHANNELS:
        raise FrameError(f"{name} is an array of shape {a.shape}: {channels} channels; arrays "
                         f"are H x W x C with C = 1, 3 or 4 (channels last; tensors are "
                         f"channels first)")
    h, w = a.shape[:2]
    if h == 0 or w == 0:
        raise FrameError(f"{name} has no pixels (shape {a.shape})")
    if h * w > MAX_FRAME_PIXELS:
        raise FrameTooLarge(f"{name} has {h * w:,} pixels, more than {MAX_FRAME_PIXELS:,} (the "
                         f"file reader's limit)")
    if a.ndim == 3 and channels == 1:
        a = a[:, :, 0]
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        # Pillow reads 16-bit grey as I;16 and maps it by round(v / 257) (data._to_8bit_rgb);
        # 16-bit colour PNG / TIFF samples are unpacked to their high byte.
        a = (np.rint(a / 257.0) if a.ndim == 2 else a >> 8).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        a = _unit_floats_to_uint8(a, name)
    else:
        raise FrameError(f"{name} has dtype {a.dtype}; give uint8, uint16 or floating point "
                         f"in [0, 1] (e.g. .astype(np.uint8))")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    img = Image.fromarray(np.ascontiguousarray(a), mode)
    return img if mode == "RGB" else img.convert("RGB")


def _unit_floats_to_uint8(a: np.ndarray, name: str) -> np.ndarray:
    """Floats in [0, 1] -> uint8 by ``round(255 v)`` (a float image file's conversion)."""
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise FrameError(f"{name} holds {int((~np.isfinite(a)).sum()):,} NaN or infinite "
                         f"values")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise FrameError(f"{name} holds floats from {lo:.4g} to {hi:.4g}; floating-point "
                         f"frames should be in [0, 1] (or give uint8)")
    return np.rint(a * 255.0).astype(np.uint8)


def _from_pil(img: Image.Image, name: str) -> Image.Image:
    """A Pillow image as :func:`~patchcore_fast.data.read_image` converts a file's."""
    w, h = img.size
    if w == 0 or h == 0:
        raise FrameError(f"{name} has no pixels ({w} x {h})")
    if w * h > MAX_FRAME_PIXELS:
        raise FrameTooLarge(f"{name} has {w * h:,} pixels, more than {MAX_FRAME_PIXELS:,} (the "
                         f"file reader's limit)")
    try:
        img.load()  # an image opened lazily from a truncated file fails here
        return _to_8bit_rgb(ImageOps.exif_transpose(img))
    except Exception as exc:  # Pillow raises many types for broken data
        raise FrameError(f"{name}: cannot convert the PIL image ({first_line(exc)})") from None


def decode_bytes(data: bytes, name: str = "image") -> Image.Image:
    """Decode an encoded image file held in memory as the file reader decodes a file.

    PNG, JPEG, BMP and TIFF (the file reader's formats: other formats are named as
    unsupported); the image is turned upright by its EXIF orientation and converted to 8-bit
    RGB. Plain 8-bit RGB PNGs are decoded with torchvision.io (libpng), the file reader's
    fast path, which gives Pillow's pixels (tests/test_decode.py).

    Raises:
        FrameError: empty, truncated, not an image, an unsupported format, or above
            :data:`MAX_FRAME_PIXELS`.
    """
    if not data:
        raise FrameError(f"{name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Warning above Image.MAX_IMAGE_PIXELS, error above twice that: the file
            # reader's limits (data.read_image).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            except Image.UnidentifiedImageError:
                raise UnreadableImage(_unidentified(data)) from None
            with img:
                fast = _decode_png_bytes(data, img)
                if fast is not None:
                    return fast
                img.load()
                return _to_8bit_rgb(ImageOps.exif_transpose(img))
    except UnreadableImage as exc:
        raise FrameError(f"{name}: {exc}") from None
    except Image.DecompressionBombError:
        raise FrameTooLarge(f"{name}: more than {MAX_FRAME_PIXELS:,} pixels (the file "
                            f"reader's limit)") from None
    except Exception as exc:  # Pillow raises many types for broken data
        raise FrameError(f"{name}: cannot decode the image ({first_line(exc)})") from None


def _unidentified(data: bytes) -> str:
    """Why Pillow's readers of the supported formats refused ``data``."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            fmt = other.format
    except Exception:
        return "not an image (PNG, JPEG, BMP or TIFF)"
    return f"unsupported image format {fmt} (read: PNG, JPEG, BMP, TIFF); convert it to PNG"


def _decode_png_bytes(data: bytes, img: Image.Image) -> Image.Image | None:
    """:func:`~patchcore_fast.data._decode_png` for bytes: plain 8-bit RGB PNGs without an
    EXIF chunk through libpng, or None (Pillow then decodes)."""
    if (img.format != "PNG" or img.mode != "RGB" or "transparency" in img.info
            or not img.tile or img.tile[0][3] != "RGB" or b"eXIf" in data):
        return None
    try:
        import torchvision.io as tio

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # as data._decode_png
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            x = tio.decode_png(buf, mode=tio.ImageReadMode.RGB)
    except Exception:  # libpng's refusal: Pillow decodes it or says why it cannot
        return None
    return Image.fromarray(x.permute(1, 2, 0).numpy())


# ----- scoring ----------------------------------------------------------------------------

def score_inputs(model, inputs: Sequence[Tensor]) -> tuple[np.ndarray, list[Tensor]]:
    """Steps 2-10 on preprocessed images, as one batch (one per input shape).

    The file path's batch step (``PatchCore.predict_batches``) on inputs already in memory:
    images of the same shape go through the backbone together (the grouping of
    ``data._collate``), so a list scored here in batches of the model's batch size meets
    the same arithmetic as the same files.

    Args:
        model (PatchCore): a fitted model.
        inputs: Tensor[3, H_in, W_in] per image (``model.preprocess.image``).

    Returns:
        (float32 array[N] scores, N Tensor[H_in, W_in] maps of the model's input, CPU), in
        the order of ``inputs``.
    """
    model._check_fitted()
    scores = np.zeros(len(inputs), dtype=np.float32)
    maps: list[Tensor | None] = [None] * len(inputs)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault(tuple(x.shape), []).append(i)
    cuda = model.device.type == "cuda"
    with torch.inference_mode():
        for idx in groups.values():
            batch = torch.stack([inputs[i] for i in idx])
            if cuda:
                batch = batch.pin_memory()
            patches, grid = model.embed(batch.to(model.device, non_blocking=cuda))
            s, m = model.score_embeddings(patches, grid, tuple(batch.shape[-2:]))
            scores[idx] = s.numpy()
            for j, i in enumerate(idx):
                maps[i] = m[j]
    return scores, maps


def map_back(model, size: tuple[int, int], amap: Tensor, maps_at: str = "original"
             ) -> np.ndarray:
    """A map of the model's input -> the photo's geometry (``PatchCore.maps_back`` for a
    photo of known ``size``, width x height)."""
    p = model.preprocess.placement(size)
    back = p.to_original(amap) if maps_at == "original" else p.to_crop(amap)
    return np.ascontiguousarray(back.numpy(), dtype=np.float32)


@dataclass
class Verdict:
    """The line's view of scored images (the verdict contract, HELPERS.md / issue #21).

    Attributes:
        normalised: per image, the score mapped to (0, 1) with 0.5 at the threshold, or
            None (the model has no calibration).
        labels: per image, ``defective`` or ``good``, or None (no calibration).
        regions: per image, a list of dicts (area, bbox [x0, y0, x1, y1], centroid [x, y],
            peak, mean); empty without calibration.
        threshold: the raw image-score threshold, or None.
    """

    normalised: list
    labels: list
    regions: list
    threshold: float | None


def decide(model, scores: np.ndarray, maps: Sequence[np.ndarray]) -> Verdict:
    """Labels, normalised scores and regions of scored images (None / empty when the model
    has no calibration): :meth:`PatchCore.verdict` in the service's words.

    Args:
        model (PatchCore): the model that scored them.
        scores (float32 array[N]): raw image scores.
        maps: N float32 arrays[H, W], each at its photo's size.
    """
    from .calibration import LABELS

    n = len(scores)
    cal = getattr(model, "calibration", None)
    if cal is None:
        return Verdict([None] * n, [None] * n, [[] for _ in range(n)], None)
    normalised, labels, regions, _ = model.verdict(np.asarray(scores), maps)
    return Verdict([float(v) for v in normalised], [LABELS[bool(b)] for b in labels],
                   regions, float(cal.image_threshold))


def colour_scale(model, amap: np.ndarray) -> tuple[float, float, str]:
    """(vmin, vmax, where from) of an overlay: the model's fixed scale when calibrated,
    else this map's 1st and 99.9th percentiles (the score CLI takes them over a run)."""
    cal = getattr(model, "calibration", None)
    if cal is not None:
        return float(cal.colour_min), float(cal.colour_max), "model"
    if not amap.size:
        return 0.0, 1.0, "image"
    lo, hi = np.percentile(amap, [1.0, 99.9])
    return float(lo), float(hi), "image"


def predict(model, frames: Any, progress: bool = False, maps_at: str = "original"):
    """Scores and maps of in-memory pictures (``PatchCore.predict`` given frames).

    Every frame is checked and converted first (:func:`to_image`), so a bad one raises
    before any work; the frames are then scored in batches of the model's batch size, in
    order, as the same files would be.

    Args:
        model (PatchCore): a fitted model.
        frames: one frame or a list (module docstring); a ``B x C x H x W`` tensor is B
            frames.
        progress: show a progress bar.
        maps_at: ``original`` (each frame's own size) or ``crop`` (the model's input,
            padding cut off).

    Returns:
        ``Prediction`` with ``paths`` None per frame and ``skipped`` empty.

    Raises:
        FrameError: a frame that cannot be scored, named by its position.
    """
    from tqdm.auto import tqdm

    from .geometry import MAPS_AT
    from .model import Prediction

    if maps_at not in MAPS_AT:
        raise PatchCoreError(f"maps_at should be one of {', '.join(MAPS_AT)}, got {maps_at!r}")
    items = as_list(frames)
    many = len(items) > 1
    images = [to_image(x, f"frame {i}" if many else "the frame") for i, x in enumerate(items)]
    pre = model.preprocess
    size = model.config.batch_size
    scores, maps = [], []
    with tqdm(total=len(images), desc="score", unit="img", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(images), size):
            chunk = images[start:start + size]
            inputs = []
            for i, img in enumerate(chunk, start):
                try:
                    inputs.append(pre.image(img))
                except UnreadableImage as exc:  # too large for the model without a crop
                    raise FrameError(f"frame {i}: {exc}" if many else str(exc)) from None
            s, m = score_inputs(model, inputs)
            scores.append(s)
            maps += [map_back(model, img.size, amap, maps_at) for img, amap in zip(chunk, m)]
            bar.update(len(chunk))
    return Prediction([None] * len(images), np.concatenate(scores), maps, [])


__all__ = ["FrameError", "FrameTooLarge", "MAX_FRAME_PIXELS", "as_list", "decode_bytes", "is_frames",
           "map_back", "predict", "score_inputs", "to_image"]
