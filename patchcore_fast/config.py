"""The settings of a PatchCore model (one dataclass, saved inside the model file) and
their limits.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch

from ._version import __version__
from .errors import PatchCoreError
from .geometry import (DEFAULT_CROP, DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE, IMAGENET_MEAN,
                       IMAGENET_STD, RESIZE_MODES)

# Largest image size (the target side of the resize) and crop: a 2,048-pixel crop gives a 256 x 256 grid of
# stride-8 patches per image, 65,536 embeddings of D floats (256 MB at D = 1,024).
MAX_IMAGE_SIZE = 2048
# Widest embedding: the official setting is 1,024; 65,536 floats is already 256 KB per
# patch (a bottle bank of 163,856 patches at that width would need 43 GB).
MAX_EMBED_DIM = 65536
#: Arithmetic of the backbone (:attr:`PatchCoreConfig.precision`).
PRECISIONS = ("fp32", "bf16")


@dataclass
class PatchCoreConfig:
    """Every setting of a PatchCore model; saved inside the model file.

    Attributes:
        backbone: ``wide_resnet50_2`` (paper), ``resnet18``, ``efficientnet_lite0`` or any
            timm model name.
        layers: layers whose maps are used (ResNets: ``layer2 layer3``; timm: stage
            indices); None for the stride-8 and stride-16 pair.
        weights: local state-dict file for the backbone, or None.
        pretrained: ImageNet weights (True) or random weights (False: speed and memory
            tests only; never accurate).
        resize: ``longer`` (the longer side to ``image_size``, padded to a square whose
            padding maps and metrics ignore: the default), ``shorter`` (the shorter side:
            the paper, with 256 and crop 224) or ``stretch`` (both sides; aspect not kept).
            Model files written before this setting existed load as ``shorter``. See
            :mod:`~patchcore_fast.geometry`; the default is chosen by measurement (README,
            "Image geometry").
        image_size: target side of the resize (default 224).
        crop: side of the centre crop the model sees; 0 (the default): the whole resized
            image.
        mean: normalisation mean (RGB).
        std: normalisation standard deviation (RGB).
        patch_size: local aggregation neighborhood p (step 3).
        pretrain_embed_dim: per-layer pooled width (step 5).
        target_embed_dim: embedding width (step 5).
        compact: keep embeddings in an isometric basis when narrower than
            ``target_embed_dim`` (same distances, less memory and time).
        coreset_ratio: fraction of training patches kept in the bank (1.0 keeps all).
        projection_dim: width of the random projection the coreset selection runs on.
        num_neighbors: b of the reweighting (Eq. 7); 0 turns the reweighting off.
        blur_sigma: Gaussian blur of the anomaly maps, in pixels.
        seed: seeds the projection, the coreset start point and random backbones.
        batch_size: images per batch (a runtime setting: :meth:`PatchCore.load` can
            change it).
        num_workers: DataLoader worker processes for image reading (runtime, as
            ``batch_size``).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda`` (runtime, as
            ``batch_size``).
        precision: ``fp32`` or ``bf16``: the backbone's arithmetic (bf16 autocast with
            channels-last activations; the aggregation, the embeddings, the bank and the
            k-NN stay float32). Model files written before this setting existed load as
            ``fp32``. fp32 is the default: on a CPU without AVX512-BF16 / AMX bf16 is
            emulated and slower (bench/RESULTS.md, "End to end"); on a GPU with tensor
            cores bf16 is the fast choice, with the same AUROC on bottle
            (tests/test_precision.py).
    """

    backbone: str = "wide_resnet50_2"
    layers: list[str] | None = None
    weights: str | None = None
    pretrained: bool = True
    resize: str = DEFAULT_RESIZE
    image_size: int = DEFAULT_IMAGE_SIZE
    crop: int = DEFAULT_CROP
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    patch_size: int = 3
    pretrain_embed_dim: int = 1024
    target_embed_dim: int = 1024
    compact: bool = True
    coreset_ratio: float = 0.1
    projection_dim: int = 128
    num_neighbors: int = 9
    blur_sigma: float = 4.0
    seed: int = 0
    batch_size: int = 8
    num_workers: int = 0
    device: str = "auto"
    precision: str = "fp32"

    def validate(self) -> None:
        """Raise :class:`PatchCoreError` naming the first invalid setting."""
        if not 16 <= self.image_size <= MAX_IMAGE_SIZE:
            raise PatchCoreError(
                f"image size should be between 16 and {MAX_IMAGE_SIZE:,} (a {MAX_IMAGE_SIZE:,}"
                f"-pixel crop already gives {(MAX_IMAGE_SIZE // 8) ** 2:,} patch embeddings "
                f"per image), got {self.image_size:,}")
        if self.crop != 0 and not 16 <= self.crop <= self.image_size:
            raise PatchCoreError(f"crop should be between 16 and the image size "
                                 f"{self.image_size}, or 0 (none), got {self.crop}")
        if self.resize not in RESIZE_MODES:
            raise PatchCoreError(f"resize should be one of {', '.join(RESIZE_MODES)}, got "
                                 f"{self.resize!r}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise PatchCoreError(f"coreset ratio should be in (0, 1], got {self.coreset_ratio}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise PatchCoreError(f"patch size should be odd and positive, got {self.patch_size}")
        if self.num_neighbors < 0:
            raise PatchCoreError(f"num_neighbors should be >= 0, got {self.num_neighbors}")
        for name in ("pretrain_embed_dim", "target_embed_dim", "projection_dim", "batch_size"):
            if getattr(self, name) < 1:
                raise PatchCoreError(f"{name} should be positive, got {getattr(self, name)}")
        for name in ("pretrain_embed_dim", "target_embed_dim"):
            if getattr(self, name) > MAX_EMBED_DIM:
                raise PatchCoreError(f"{name} (--embed-dim) should be at most "
                                     f"{MAX_EMBED_DIM:,}, got {getattr(self, name):,}")
        if self.num_workers < 0:
            raise PatchCoreError(f"num_workers should be >= 0, got {self.num_workers}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise PatchCoreError(f"device should be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise PatchCoreError(f"precision should be one of {', '.join(PRECISIONS)}, got "
                                 f"{self.precision!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise PatchCoreError("mean and std should hold three values, std positive")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std, self.blur_sigma)):
            raise PatchCoreError(f"mean, std and blur_sigma should be finite, got mean "
                                 f"{self.mean}, std {self.std}, blur_sigma {self.blur_sigma}")
        if self.blur_sigma < 0:
            raise PatchCoreError(f"blur_sigma should be >= 0, got {self.blur_sigma}")

    def to_json(self) -> str:
        """The settings as JSON (the model file's metadata)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PatchCoreConfig":
        """Settings from :meth:`to_json`; unknown keys are an error (newer file)."""
        data = json.loads(text)
        # Files written before the geometry settings (issue #15) were all the paper's.
        data.setdefault("resize", "shorter")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise PatchCoreError(f"model settings {', '.join(unknown)} are unknown to this "
                                 f"version of patchcore-fast ({__version__}); upgrade it")
        return cls(**data)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PatchCoreError("--device cuda was asked for, but no CUDA GPU is available "
                             "(torch.cuda.is_available() is False); use --device cpu or auto")
    return torch.device(name)

