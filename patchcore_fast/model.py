"""PatchCore: fit a memory bank on good images, predict scores and maps, save and load.

``PatchCore(config).fit(images)`` runs steps 1-7 (embed every training patch, keep a
greedy coreset as the memory bank, and precompute each bank row's neighbourhood for the
reweighting); ``predict(images)`` runs steps 8-10; ``save`` / ``load`` use one safetensors
file holding the bank, the neighbourhoods, the embedding matrix and, as JSON metadata, the
config and the backbone description. Loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from . import distributed
from ._version import __version__
from .backbone import Backbone, BackboneInfo, file_sha256, load_backbone
from .coreset import StreamingCoreset, coreset_size
from .data import (IMAGENET_MEAN, IMAGENET_STD, Preprocess, iterate_images, list_images,
                   read_size_again)
from .errors import PatchCoreError, first_line
from .features import PatchEmbedder
from .files import atomic_path
from .geometry import (DEFAULT_CROP, DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE, MAPS_AT,
                       RESIZE_MODES)
from .scoring import anomaly_maps, bank_neighbourhoods, image_scores, nearest_bank_rows

FORMAT = "patchcore-fast"
FORMAT_VERSION = 1
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
        patch_size: local aggregation neighbourhood p (step 3).
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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it times the work.

    CUDA kernels run asynchronously: without this, a timer stops when the launches are
    queued (a 20,071-point coreset "took" 8 ms). A no-op on the CPU.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Prediction:
    """Scores and maps of a set of images.

    Attributes:
        paths: the images that were read (unreadable ones are left out); None per frame
            when the images were in memory.
        scores (float32 array[N]): image scores.
        maps (list of float32 array[H, W]): anomaly maps, each at its photo's size
            (``maps_at="original"``) or at the model's input without padding (``crop``).
        skipped: the files that could not be read.
    """

    paths: list[Path]
    scores: np.ndarray
    maps: list[np.ndarray]
    skipped: list[str]


def _list_inputs(images: Sequence[str | os.PathLike] | str | os.PathLike,
                 skipped: list[str] | None) -> list[Path]:
    """The image files that ``images`` (files and/or folders, or one of them) name."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    return list_images(list(images), "input", skipped)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False,
                dynamic_ncols=True)


class PatchCore:
    """The PatchCore anomaly detector.

    Args:
        config: settings; defaults to :class:`PatchCoreConfig` ().
        **overrides: settings to change, e.g. ``PatchCore(backbone="efficientnet_lite0")``.

    Example:
        >>> model = PatchCore(PatchCoreConfig(backbone="efficientnet_lite0"))
        >>> model.fit("bottle/train/good")
        >>> pred = model.predict(["bottle/test/broken_large/000.png"])
        >>> model.save("bottle.safetensors"); same = PatchCore.load("bottle.safetensors")
    """

    def __init__(self, config: PatchCoreConfig | None = None, **overrides):
        config = dataclasses.replace(config or PatchCoreConfig(), **overrides)
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        self.bank: Tensor | None = None            # [M, D]
        self.neighbourhoods: Tensor | None = None  # [M, b]
        self.grid: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None  # (H_in, W_in) of the last batch
        self.backbone_info: BackboneInfo | None = None
        self.fit_stats: dict = {}
        self._embedder: PatchEmbedder | None = None
        self._projection: Tensor | None = None     # [D, C], set when loading

    # ----- steps 1-5: images -> patch embeddings -------------------------------------

    @property
    def preprocess(self) -> Preprocess:
        """Image geometry and normalisation of this model."""
        c = self.config
        return Preprocess(c.image_size, c.crop, tuple(c.mean), tuple(c.std),
                          resize=c.resize)

    def _build_backbone(self) -> Backbone:
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)  # random backbones (pretrained=False) are reproducible
            return load_backbone(c.backbone, c.layers, c.weights, c.pretrained)

    @property
    def embedder(self) -> PatchEmbedder:
        """The frozen backbone plus feature aggregation (built on first use)."""
        if self._embedder is None:
            backbone = self._build_backbone()
            if self.backbone_info is not None and backbone.info != self.backbone_info:
                raise PatchCoreError(
                    f"the backbone built now ({backbone.info.weights}, layers "
                    f"{backbone.info.layers}) differs from the one the model was fitted "
                    f"with ({self.backbone_info.weights}, layers {self.backbone_info.layers})")
            c = self.config
            self._embedder = PatchEmbedder(backbone, c.pretrain_embed_dim, c.target_embed_dim,
                                           c.patch_size, c.compact, self._projection,
                                           precision=c.precision)
            self._embedder.to(self.device)
            self.backbone_info = backbone.info
        return self._embedder

    def embed_batches(self, images: Sequence[str | os.PathLike] | str | os.PathLike,
                      skipped: list[str] | None = None, progress: bool = False,
                      desc: str = "features") -> Iterator[tuple[list[Path], Tensor]]:
        """Patch embeddings, batch by batch (bounded memory).

        Args:
            images: image files and/or folders.
            skipped: list collecting unreadable files.
            progress: show a progress bar.
            desc: progress-bar label.

        Yields:
            (paths of the batch, Tensor[B, h * w, D] on the model's device).
        """
        yield from self._embed_paths(_list_inputs(images, skipped), skipped, progress, desc)

    def _embed_paths(self, paths: list[Path], skipped: list[str] | None, progress: bool,
                     desc: str) -> Iterator[tuple[list[Path], Tensor]]:
        """:meth:`embed_batches` on image files already listed."""
        embedder = self.embedder
        with _progress(len(paths), desc, progress) as bar, torch.inference_mode():
            cuda = self.device.type == "cuda"
            for idx, batch in iterate_images(paths, self.preprocess, self.config.batch_size,
                                             self.config.num_workers, skipped, bar.update,
                                             pin_memory=cuda):
                patches, grid = embedder(batch.to(self.device, non_blocking=cuda))
                self.grid = grid
                self.input_size = tuple(batch.shape[-2:])
                yield [paths[i] for i in idx], patches

    # ----- steps 6-7: memory bank and coreset ---------------------------------------

    def fit(self, images: Sequence[str | os.PathLike] | str | os.PathLike,
            skipped: list[str] | None = None, progress: bool = False,
            streaming: bool = True, temp_dir: str | os.PathLike | None = None
            ) -> "PatchCore":
        """Fit the memory bank on good images (steps 1-7, then the neighbourhoods).

        Args:
            images: good image files and/or folders.
            skipped: list collecting unreadable files.
            progress: show progress bars (one per pass).
            streaming: bounded memory (default): keep only the 128-d projection of each
                training patch in memory and the full-width rows in a temporary file, read
                back for the chosen rows (:class:`~patchcore_fast.coreset.StreamingCoreset`).
                False holds every patch in memory (N x D floats) as the reference does.
                Both run the same selection and give the bit-identical bank.
            temp_dir: folder of the temporary feature file (default: $TMPDIR); it needs
                N x D x 4 bytes (3.2 GB per 1,000 images at 224 px and D = 1,024).

        Returns:
            self.
        """
        for _ in self._fit(images, [self.config.coreset_ratio], skipped, progress,
                           streaming, temp_dir):
            pass
        return self

    def fit_each_ratio(self, images: Sequence[str | os.PathLike] | str | os.PathLike,
                       ratios: Sequence[float], skipped: list[str] | None = None,
                       progress: bool = False, temp_dir: str | os.PathLike | None = None
                       ) -> Iterator[float]:
        """Fit at several coreset ratios, extracting the training features once.

        The bounded-memory fit of :meth:`fit` whose first pass (features -> temporary file
        and projections) is shared: for each ratio the selection runs on the kept
        projections and the chosen rows are read back. Each bank is the one :meth:`fit`
        gives at that ratio.

        Args:
            images: good image files and/or folders.
            ratios: coreset ratios, in (0, 1].
            skipped, progress, temp_dir: as :meth:`fit`.

        Yields:
            each ratio, once the model holds its bank (``config`` is then a copy of the
            model's settings with that ``coreset_ratio``, so that :meth:`save` describes
            the bank; ``fit_stats`` has its times).
        """
        yield from self._fit(images, ratios, skipped, progress, True, temp_dir)

    def _fit(self, images: Sequence[str | os.PathLike] | str | os.PathLike,
             ratios: Sequence[float], skipped: list[str] | None, progress: bool,
             streaming: bool, temp_dir: str | os.PathLike | None) -> Iterator[float]:
        """The one fit path: embed every training image once, then per ratio select the
        coreset, gather its rows and precompute their neighbourhoods."""
        from tqdm.auto import tqdm

        for r in ratios:
            coreset_size(1, r)  # validates every ratio before any work
        paths = _list_inputs(images, skipped)
        # Under torch.distributed each rank embeds its contiguous share of the images and
        # the coreset runs on the shards (distributed.py); rank 0 ends with the bank.
        launch = distributed.current()
        if launch is not None:
            paths = launch.share(paths)
            progress = progress and launch.is_main
        c = self.config
        t0 = time.perf_counter()
        n_images = 0
        fixed = self.preprocess.fixed_input
        with StreamingCoreset(ratios[0], c.projection_dim, c.seed, temp_dir=temp_dir,
                              in_memory=not streaming, project=launch is None) as sc:
            # Pass 1: features -> temporary file (or memory) + projections in memory.
            for batch, patches in self._embed_paths(paths, skipped, progress,
                                                    "fit: features"):
                if fixed and sc.expected_rows is None:
                    # A fixed input shape gives every image the first one's grid, so this
                    # bounds N (skipped files only lower it) and the projected bank is
                    # allocated once. Without it (shorter, no crop) grids follow each
                    # photo's aspect: an elongated first photo would over-allocate, a
                    # square one under-allocate, so the bank grows block by block.
                    sc.expected_rows = len(paths) * patches.shape[1]
                sc.add(patches.reshape(-1, patches.shape[-1]))
                n_images += len(batch)
            if launch is not None:
                yield from self._fit_sharded(sc, launch, ratios, n_images, t0, progress)
                return
            if sc.n == 0:
                raise PatchCoreError("none of the training images could be read")
            synchronize(self.device)
            feature_seconds = time.perf_counter() - t0
            # Pass 2, per ratio: the greedy selection on the projections (kept for the
            # next ratio unless this is the last), then the chosen rows.
            for j, ratio in enumerate(ratios):
                last = j == len(ratios) - 1
                t1 = time.perf_counter()
                with torch.inference_mode(), tqdm(total=2, desc="fit: coreset and gather",
                                                  disable=not progress, leave=False) as bar:
                    idx = sc.select(ratio, keep_projections=not last)
                    bar.update()
                    bank = sc.gather(idx).contiguous()
                    bar.update()
                synchronize(self.device)  # CUDA work is asynchronous: time it finished
                t2 = time.perf_counter()
                if ratio != self.config.coreset_ratio:
                    self.config = dataclasses.replace(self.config, coreset_ratio=ratio)
                self._set_bank(bank, progress)
                self.fit_stats.update(patches=sc.n, images=n_images,
                                      feature_seconds=feature_seconds,
                                      coreset_seconds=t2 - t1, streaming=streaming)
                self.fit_stats["fit_seconds"] = feature_seconds + time.perf_counter() - t1
                yield ratio

    def _fit_sharded(self, sc: StreamingCoreset, launch: "distributed.Launch",
                     ratios: Sequence[float], n_images: int, t0: float, progress: bool
                     ) -> Iterator[float]:
        """Pass 2 of :meth:`_fit` across the ranks of a distributed run (collective).

        The same selection and bank as one process on all the images: the projection in
        the same global blocks, the greedy steps on the shards (one all-gather each), the
        chosen full-width rows gathered to rank 0, which alone holds the bank and computes
        its neighbourhoods (over the whole bank). Other ranks end with ``bank`` None.
        """
        device = self.device
        grid = list(self.grid) if self.grid else [0, 0]
        table = distributed.all_gather_ints([sc.n, sc.dim or 0, n_images, *grid], device)
        counts, n = [row[0] for row in table], sum(row[0] for row in table)
        if n == 0:
            raise PatchCoreError("none of the training images could be read")
        dim = max(row[1] for row in table)
        self.grid = next(tuple(row[3:5]) for row in table if row[0])
        shard = distributed.project_shard(sc, launch, dim, counts, device)
        feature_seconds = time.perf_counter() - t0
        for j, ratio in enumerate(ratios):
            t1 = time.perf_counter()
            with torch.inference_mode():
                idx = distributed.select_sharded(shard, n, ratio, sc, dim, device)
                bank = distributed.gather_bank(sc, idx, launch, dim, counts, device)
            t2 = time.perf_counter()
            if ratio != self.config.coreset_ratio:
                self.config = dataclasses.replace(self.config, coreset_ratio=ratio)
            if launch.is_main:
                self._set_bank(bank.contiguous(), progress)
            self.fit_stats.update(patches=n, images=sum(row[2] for row in table),
                                  feature_seconds=feature_seconds, coreset_seconds=t2 - t1,
                                  streaming=sc.in_memory is False, world_size=launch.world,
                                  rank_images=[row[2] for row in table],
                                  rank_patches=counts)
            self.fit_stats["fit_seconds"] = feature_seconds + time.perf_counter() - t1
            yield ratio

    def _set_bank(self, bank: Tensor, progress: bool = False) -> None:
        """Keep ``bank`` (Tensor[M, D]) and precompute its reweighting neighbourhoods."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        with torch.inference_mode(), tqdm(total=1, desc="fit: neighbourhoods",
                                          disable=not progress, leave=False) as bar:
            self.bank = bank
            self.neighbourhoods = (bank_neighbourhoods(self.bank, self.config.num_neighbors)
                                   if self.config.num_neighbors > 0 else None)
            bar.update()
        synchronize(self.device)
        self.fit_stats.update(bank_rows=int(self.bank.shape[0]),
                              embed_dim=int(self.bank.shape[1]),
                              neighbour_seconds=time.perf_counter() - t0)

    # ----- steps 8-10: scores and maps ------------------------------------------------

    def _check_fitted(self) -> None:
        if self.bank is None:
            raise PatchCoreError("the model is not fitted: call fit() or PatchCore.load()")

    def score_embeddings(self, patches: Tensor, grid: tuple[int, int],
                         size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Steps 8-10 on embeddings.

        Args:
            patches (Tensor[B, h * w, D]): test embeddings.
            grid: (h, w).
            size: (H_in, W_in) of the images they come from; default: the size of the last
                batch embedded, else the crop (else the grid times the first stride).

        Returns:
            (Tensor[B] image scores, Tensor[B, H_in, W_in] anomaly maps of the model's
            input), on the CPU.
        """
        self._check_fitted()
        b, p, d = patches.shape
        bank = self.bank.to(patches.device)
        dist, idx = nearest_bank_rows(patches.reshape(-1, d), bank)
        dist, idx = dist.view(b, p), idx.view(b, p)
        hood = None if self.neighbourhoods is None else self.neighbourhoods.to(patches.device)
        scores = image_scores(patches, dist, idx, bank, hood)
        if size is None:
            size = self.input_size or (self.config.crop, self.config.crop)
        if not size[0]:
            stride = self.backbone_info.strides[0] if self.backbone_info else 8
            size = (grid[0] * stride, grid[1] * stride)
        maps = anomaly_maps(dist, grid, tuple(size), self.config.blur_sigma)
        if maps.device.type != "cuda":
            return scores.cpu(), maps.cpu()
        # Maps are upsampled and blurred on the GPU; both results then go to page-locked
        # host memory with asynchronous copies and one wait for the batch (two .cpu()
        # calls would wait twice).
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (scores, maps)]
        for h, t in zip(host, (scores, maps)):
            h.copy_(t, non_blocking=True)
        torch.cuda.current_stream(maps.device).synchronize()
        return host[0], host[1]

    def maps_back(self, paths: Sequence[Path], maps: Tensor, maps_at: str = "original"
                  ) -> list[np.ndarray]:
        """Input-sized maps -> each photo's geometry (:mod:`~patchcore_fast.geometry`).

        Args:
            paths: the photos (their headers give their sizes; one that cannot be read
                again raises :class:`PatchCoreError`).
            maps (Tensor[B, H_in, W_in]): maps of the model's input.
            maps_at: ``original`` (the photo's size: crop, padding and resize undone) or
                ``crop`` (the input's resolution, padding cut off: the paper's protocol).

        Returns:
            list of float32 array[H, W], one per photo.
        """
        if maps_at not in MAPS_AT:
            raise PatchCoreError(f"maps_at should be one of {', '.join(MAPS_AT)}, got "
                                 f"{maps_at!r}")
        pre = self.preprocess
        out = []
        for path, amap in zip(paths, maps):
            p = pre.placement(read_size_again(path))
            back = p.to_original(amap) if maps_at == "original" else p.to_crop(amap)
            out.append(np.ascontiguousarray(back.numpy(), dtype=np.float32))
        return out

    def predict_batches(self, images: Sequence[str | os.PathLike] | str | os.PathLike,
                        skipped: list[str] | None = None, progress: bool = False,
                        maps_at: str = "original"
                        ) -> Iterator[tuple[list[Path], np.ndarray, list[np.ndarray]]]:
        """Scores and maps batch by batch (for large sets).

        Yields:
            (paths, float32 array[B] scores, B float32 arrays[H, W]: the maps, see
            :meth:`maps_back`).
        """
        self._check_fitted()
        with torch.inference_mode():
            for paths, patches in self.embed_batches(images, skipped, progress, "score"):
                scores, maps = self.score_embeddings(patches, self.grid, self.input_size)
                yield paths, scores.numpy(), self.maps_back(paths, maps, maps_at)

    def predict(self, images, progress: bool = False, maps_at: str = "original"
                ) -> Prediction:
        """Image scores and anomaly maps, of files or of pictures in memory.

        Args:
            images: image files and/or folders; or in-memory pictures, one or a list: numpy
                arrays (H x W [x 1|3|4], uint8, uint16 or floats in [0, 1]), tensors
                ([B x] C x H x W, uint8 or floats in [0, 1]), PIL images or encoded image
                bytes (:mod:`~patchcore_fast.frames`: the same scores and maps as the same
                picture read from a file).
            progress: show a progress bar.
            maps_at: ``original`` (each photo's own size) or ``crop`` (:meth:`maps_back`).

        Returns:
            :class:`Prediction` (unreadable files are skipped with a warning and listed;
            for frames ``paths`` holds None per frame).

        Raises:
            frames.FrameError: a frame that cannot be scored (wrong dtype, no pixels, NaN,
                5 channels, ...), named by its position.
        """
        from . import frames

        if frames.is_frames(images):
            return frames.predict(self, images, progress, maps_at)
        skipped: list[str] = []
        paths, scores, maps = [], [], []
        for p, s, m in self.predict_batches(images, skipped, progress, maps_at):
            paths += p
            scores.append(s)
            maps += m
        if not paths:
            raise PatchCoreError("none of the images could be read")
        return Prediction(paths, np.concatenate(scores), maps, skipped)

    # ----- model file -----------------------------------------------------------------

    def _embedding_matrix(self) -> Tensor:
        if self._embedder is not None:
            return self._embedder.projection
        if self._projection is not None:
            return self._projection
        return self.embedder.projection

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as one safetensors file (atomically).

        Tensors: ``bank`` [M, D] float32, ``neighbourhoods`` [M, b] int64 (when the
        reweighting is on), ``projection`` [D, C] float32 (the embedding matrix). Metadata:
        ``format``, ``format_version``, ``config`` (JSON), ``backbone`` (JSON), ``grid``,
        ``fit_stats`` and the writing version.
        """
        from safetensors.torch import save_file

        self._check_fitted()
        tensors = {"bank": self.bank.detach().float().cpu().contiguous(),
                   "projection": self._embedding_matrix().detach().cpu().contiguous()}
        if self.neighbourhoods is not None:
            tensors["neighbourhoods"] = self.neighbourhoods.cpu().contiguous()
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "config": self.config.to_json(),
                "backbone": json.dumps(dataclasses.asdict(self.backbone_info)),
                "grid": json.dumps(list(self.grid) if self.grid else None),
                "fit_stats": json.dumps(self.fit_stats), "writer": f"patchcore-fast {__version__}"}
        with atomic_path(path) as tmp:
            try:
                save_file(tensors, str(tmp), metadata=meta)
            except Exception as exc:  # SafetensorError wraps the OS error (disk full, ...)
                raise OSError(_os_error_text(exc)) from None

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None,
             weights: str | None = None, batch_size: int | None = None,
             num_workers: int | None = None, precision: str | None = None,
             bank_shards: bool = False) -> "PatchCore":
        """Read a model file written by :meth:`save`, with this run's runtime settings.

        The runtime settings are set before the model is built, so the model chooses its
        device once and nothing changes its settings afterwards.

        Args:
            path: the ``.safetensors`` model file.
            device: ``auto``, ``cpu`` or ``cuda``; None: the saved setting (``auto``
                unless the model was fitted with another).
            weights: the local backbone weights file, when the model was fitted with one
                and it moved (checked against the SHA-256 stored at fit time).
            batch_size: images per batch; None: the saved setting.
            num_workers: image-reading worker processes; None: the saved setting.
            precision: the backbone's arithmetic, ``fp32`` or ``bf16``; None: the saved
                setting (``fp32`` for files written before the setting existed).
            bank_shards: under torchrun, keep only this rank's share of the bank on the
                device (:class:`~patchcore_fast.distributed.ShardedBank`; scoring is then
                collective); ignored in one process.

        Returns:
            The fitted :class:`PatchCore`.
        """
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            raise PatchCoreError(f"model file {path} is a folder; give the .safetensors file "
                                 f"that fit wrote")
        if not path.is_file():
            raise PatchCoreError(f"model file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise PatchCoreError(f"{path} is not a patchcore-fast model file")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except PatchCoreError:
            raise
        except Exception as exc:
            raise PatchCoreError(f"{path} is not a patchcore-fast model file, or it is "
                                 f"truncated ({first_line(exc)})"
                                 ) from None
        config, info, grid, fit_stats = _validate_loaded(path, meta, tensors)
        bank, projection, hood = (tensors["bank"], tensors["projection"],
                                  tensors.get("neighbourhoods"))
        if weights is not None:
            config.weights = str(weights)
        if info.weights.startswith("file:"):
            if not config.weights or not Path(config.weights).is_file():
                raise PatchCoreError(f"{path} was fitted with the backbone weights file "
                                     f"{config.weights}, which is not there; pass --weights FILE")
            if f"file:{file_sha256(config.weights)}" != info.weights:
                raise PatchCoreError(f"backbone weights {config.weights} differ from the ones "
                                     f"{path} was fitted with (SHA-256 mismatch)")
        runtime = {"device": device, "batch_size": batch_size, "num_workers": num_workers,
                   "precision": precision}
        model = cls(config, **{k: v for k, v in runtime.items() if v is not None})
        model.backbone_info = info
        model._projection = projection
        launch = distributed.current() if bank_shards else None
        model.bank = bank.to(model.device) if launch is None else distributed.ShardedBank(
            bank, launch.rank, launch.world, model.device)
        model.neighbourhoods = hood.to(model.device) if hood is not None else None
        model.grid = tuple(grid) if grid else None
        model.fit_stats = fit_stats
        return model


def _os_error_text(exc: BaseException) -> str:
    """The OS's words inside a safetensors error, e.g. ``No space left on device``."""
    import re

    text = str(exc)
    found = re.search(r'message: "([^"]+)"', text)
    if found:
        return found.group(1)
    return first_line(exc)[:200]


# ----- checking a loaded model file --------------------------------------------------------

# Python types each config annotation admits (JSON has no tuples; ints pass as floats).
_FIELD_TYPES = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
    "str | None": (str, type(None)), "list[str] | None": (list, type(None)),
    "list[float]": (list,),
}
_ITEM_TYPES = {"list[str] | None": (str,), "list[float]": (int, float)}


def _check_config_types(data: dict) -> None:
    """Raise ValueError naming the first setting whose JSON value has the wrong type."""
    for f in dataclasses.fields(PatchCoreConfig):
        if f.name not in data:
            continue
        value, allowed = data[f.name], _FIELD_TYPES[f.type]
        # bool is an int in Python, but true is not a number of pixels.
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if ok and isinstance(value, list):
            ok = all(isinstance(v, _ITEM_TYPES[f.type]) and not isinstance(v, bool)
                     for v in value)
        if not ok:
            raise ValueError(f"setting {f.name} should be {f.type}, got {json.dumps(value)}"[:200])


def _tensor_problem(tensors: dict[str, Tensor], config: PatchCoreConfig,
                    info: BackboneInfo) -> str | None:
    """What is wrong with the tensors of a model file, or None.

    Expected: ``bank`` float32 [M, D] (M >= 1, finite), ``projection`` float32 [D, C] with
    C = sum(info.channels) and D <= target_embed_dim (== when not compact; finite), and
    ``neighbourhoods`` int64 [M, min(b, M)] with values in [0, M) exactly when b > 0.
    """
    unknown = sorted(set(tensors) - {"bank", "projection", "neighbourhoods"})
    if unknown:
        return f"unknown tensor {unknown[0]!r}"
    for name in ("bank", "projection"):
        if name not in tensors:
            return f"no {name} tensor"
        t = tensors[name]
        if t.dtype != torch.float32:
            return f"{name} is {str(t.dtype).removeprefix('torch.')}, should be float32"
        if t.dim() != 2:
            return f"{name} has shape {tuple(t.shape)}, should be 2-D"
    bank, projection = tensors["bank"], tensors["projection"]
    m, d = bank.shape
    if m == 0 or d == 0:
        return f"the bank is empty (shape {tuple(bank.shape)})"
    c = sum(info.channels)
    if projection.shape[1] != c:
        return (f"projection has shape {tuple(projection.shape)}, should have {c} columns "
                f"(the channels of {info.name} layers {', '.join(info.layers)})")
    if projection.shape[0] != d:
        return f"bank {tuple(bank.shape)} and projection {tuple(projection.shape)} disagree"
    if d > config.target_embed_dim or (not config.compact and d != config.target_embed_dim):
        return (f"embedding width {d} does not fit the setting target_embed_dim "
                f"{config.target_embed_dim}")
    for name in ("bank", "projection"):
        bad = int((~torch.isfinite(tensors[name])).sum())
        if bad:
            return f"{name} holds {bad:,} NaN or infinite values"
    hood = tensors.get("neighbourhoods")
    b = min(config.num_neighbors, m)
    if hood is None:
        return "no neighbourhoods tensor, but num_neighbors is {}".format(b) if b else None
    if not b:
        return "a neighbourhoods tensor, but num_neighbors is 0"
    if hood.dtype != torch.int64:
        return f"neighbourhoods is {str(hood.dtype).removeprefix('torch.')}, should be int64"
    if tuple(hood.shape) != (m, b):
        return f"neighbourhoods has shape {tuple(hood.shape)}, should be ({m}, {b})"
    if int(hood.min()) < 0 or int(hood.max()) >= m:
        return (f"neighbourhoods hold row numbers {int(hood.min())}..{int(hood.max())}, "
                f"outside the bank's 0..{m - 1}")
    return None


def _validate_loaded(path: Path, meta: dict[str, str], tensors: dict[str, Tensor]
                     ) -> tuple[PatchCoreConfig, BackboneInfo, list[int] | None, dict]:
    """Parse and check everything inside a model file before any of it is used.

    A file that loads but holds the wrong thing (a NaN bank, an int32 bank, a config with a
    string where a number goes, an image size that would allocate tens of GB) would fail
    later with a traceback, or worse, score silently wrong: every field is checked here.

    Args:
        path: the model file (for messages).
        meta: its safetensors metadata.
        tensors: its tensors.

    Returns:
        (config, backbone info, grid or None, fit_stats).

    Raises:
        PatchCoreError: one line naming the file and the first problem.
    """
    version = meta.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise PatchCoreError(f"{path} has model format version {version}; this version of "
                             f"patchcore-fast ({__version__}) reads version {FORMAT_VERSION}")

    def damaged(why: str) -> PatchCoreError:
        return PatchCoreError(f"{path} is a damaged patchcore-fast model file ({why})")

    entry = "config"  # the metadata entry being parsed, for the message
    try:
        if "config" not in meta or "backbone" not in meta:
            raise ValueError("no config or backbone entry")
        data = json.loads(meta["config"])
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        _check_config_types(data)
        config = PatchCoreConfig.from_json(meta["config"])
        config.validate()
        entry = "backbone"
        raw = json.loads(meta["backbone"])
        names = [f.name for f in dataclasses.fields(BackboneInfo)]
        if not isinstance(raw, dict) or sorted(raw) != sorted(names):
            raise ValueError(f"should be an object with {', '.join(names)}")
        if not (isinstance(raw["name"], str) and isinstance(raw["weights"], str)
                and all(isinstance(raw[k], list) and raw[k] for k in names[1:4])
                and all(isinstance(v, str) for v in raw["layers"])
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                        for k in ("channels", "strides") for v in raw[k])
                and len(raw["layers"]) == len(raw["channels"]) == len(raw["strides"])):
            raise ValueError("wrong types or lengths")
        info = BackboneInfo(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in raw.items()})
        entry = "grid"
        grid = json.loads(meta.get("grid", "null"))
        if grid is not None and not (
                isinstance(grid, list) and len(grid) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                        for v in grid)):
            raise ValueError(f"should be two positive integers, got {meta['grid'][:40]}")
        entry = "fit_stats"
        fit_stats = json.loads(meta.get("fit_stats", "{}"))
        if not isinstance(fit_stats, dict):
            raise ValueError("not a JSON object")
    except PatchCoreError as exc:  # a setting out of range, or unknown to this version
        raise PatchCoreError(f"{path}: {exc}") from None
    except (ValueError, TypeError, RecursionError) as exc:
        why = first_line(exc)
        raise damaged(f"{entry}: {why[:200]}") from None
    if info.name != config.backbone:
        raise damaged(f"backbone {info.name!r} differs from the setting {config.backbone!r}")
    problem = _tensor_problem(tensors, config, info)
    if problem:
        raise damaged(problem)
    return config, info, grid, fit_stats
