"""PatchCore: fit a memory bank on good images, predict scores and maps, save and load.

``PatchCore(config).fit(images)`` runs steps 1-7 (embed every training patch, keep a
greedy coreset as the memory bank, and precompute each bank row's nearest neighbors for
the reweighting); ``predict(images)`` runs steps 8-10; ``save`` / ``load`` use one
safetensors file (:mod:`~patchcore_fast.model_file`). The settings are
:class:`~patchcore_fast.config.PatchCoreConfig`'s.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import calibration, distributed, fitting, frames, model_file, ops, verdict
from .backbone import Backbone, BackboneInfo, load_backbone
from .calibration import Calibration
from .config import PatchCoreConfig, resolve_device
from .datasets import iterate_images, list_images
from .fitting import synchronize
from .errors import PatchCoreError
from .features import PatchEmbedder
from .geometry import MAPS_AT, Preprocess
from .graphs import GraphedForward
from .images import read_size_again
from .model_file import ModelFile
from .regions import DEFAULT_MIN_REGION_AREA, check_min_area
from .scoring import bank_neighbors, score_patches
from .sharded import ShardedBank

__all__ = ["PatchCore", "PatchCoreConfig", "Prediction"]


@dataclass
class Prediction:
    """Scores and maps of a set of images.

    Attributes:
        paths: the images that were read (unreadable ones are left out).
        scores (float32 array[N]): image scores.
        maps (list of float32 array[H, W]): anomaly maps, each at its photo's size
            (``maps_at="original"``) or at the model's input without padding (``crop``).
        skipped: the files that could not be read.
        normalised (float64 array[N] | None): normalised scores in (0, 1), 0.5 at the
            model's threshold (:func:`~patchcore_fast.calibration.normalise`); None when
            the model has no calibration.
        labels (bool array[N] | None): True = defective (score above the threshold).
        regions (list of lists of dict): each image's defect regions at the pixel
            threshold (:func:`~patchcore_fast.regions.find_regions`: area, bbox,
            centroid, peak, mean); empty lists when the model has no calibration.
    """

    paths: list[Path]
    scores: np.ndarray
    maps: list[np.ndarray]
    skipped: list[str]
    normalised: np.ndarray | None = None
    labels: np.ndarray | None = None
    regions: list[list[dict]] = field(default_factory=list)


def _list_inputs(images: Sequence[str | os.PathLike] | str | os.PathLike,
                 skipped: list[str] | None) -> list[Path]:
    """The image files that ``images`` (files and/or folders, or one of them) name."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    return list_images(list(images), "input", skipped)


def _progress(total: int, desc: str, enabled: bool):
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
        self.neighbors: Tensor | None = None       # [M, b]
        self.grid: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None  # (H_in, W_in) of the last batch
        self.backbone_info: BackboneInfo | None = None
        self.fit_stats: dict = {}
        #: thresholds, normalised score and colour scale (None: not calibrated)
        self.calibration: Calibration | None = None
        self._embedder: PatchEmbedder | None = None
        self._projection: Tensor | None = None     # [D, C], set when loading
        # (weak reference to the bank, ops.knn_bank of it): see _knn_operands
        self._operands: tuple | None = None
        #: replay the embedder from CUDA graphs on a CUDA device (:meth:`embed`; off until
        #: measured on a GPU, issue #24)
        self.cuda_graphs = False
        self._graphed: GraphedForward | None = None

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
                      desc: str = "features", with_sizes: bool = False
                      ) -> Iterator[tuple[list[Path], Tensor]]:
        """Patch embeddings, batch by batch (bounded memory).

        Args:
            images: image files and/or folders.
            skipped: list collecting unreadable files.
            progress: show a progress bar.
            desc: progress-bar label.
            with_sizes: also yield each photo's (width, height) upright, as it was read
                (what :meth:`maps_back` puts a map back to).

        Yields:
            (paths of the batch, Tensor[B, h * w, D] on the model's device), and the
            photos' sizes with ``with_sizes``.
        """
        for paths, patches, sizes in self._embed_paths(_list_inputs(images, skipped),
                                                       skipped, progress, desc):
            yield (paths, patches, sizes) if with_sizes else (paths, patches)

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Steps 2-5 on a batch of preprocessed images on the model's device: the
        embedder's forward, replayed from a CUDA graph per input shape when
        :attr:`cuda_graphs` is on and the device is CUDA
        (:class:`~patchcore_fast.graphs.GraphedForward`; the same result).

        Returns:
            (Tensor[B, h * w, D], (h, w)): embeddings in row-major grid order, the grid.
        """
        embedder = self.embedder
        if not (self.cuda_graphs and images.device.type == "cuda"):
            return embedder(images)
        if self._graphed is None:
            self._graphed = GraphedForward(embedder)
        return self._graphed(images)

    def _embed_paths(self, paths: list[Path], skipped: list[str] | None, progress: bool,
                     desc: str, photos: bool = False) -> Iterator[tuple]:
        """:meth:`embed_batches` (with sizes) on image files already listed; with
        ``photos`` each batch's pixels as read too
        (:func:`~patchcore_fast.datasets.iterate_images`)."""
        self.embedder  # built (and checked against the model file) before reading
        with _progress(len(paths), desc, progress) as bar, torch.inference_mode():
            cuda = self.device.type == "cuda"
            for idx, batch, sizes, *pixels in iterate_images(
                    paths, self.preprocess, self.config.batch_size, self.config.num_workers,
                    skipped, bar.update, pin_memory=cuda, photos=photos):
                patches, grid = self.embed(batch.to(self.device, non_blocking=cuda))
                self.grid = grid
                self.input_size = tuple(batch.shape[-2:])
                yield [paths[i] for i in idx], patches, sizes, *pixels

    # ----- steps 6-7: memory bank and coreset ---------------------------------------

    def fit(self, images: Sequence[str | os.PathLike] | str | os.PathLike,
            skipped: list[str] | None = None, progress: bool = False,
            streaming: bool = True, temp_dir: str | os.PathLike | None = None,
            false_reject_rate: float | None = calibration.DEFAULT_FALSE_REJECT_RATE
            ) -> "PatchCore":
        """Fit the memory bank on good images (steps 1-7, then the neighbors).

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
            false_reject_rate: calibrate the thresholds at this target false-reject rate
                of good images, in (0, 0.5] (:mod:`~patchcore_fast.calibration`: the good
                images are also scored out of sample, by 5-fold cross-fitting); None
                skips the calibration (the model then labels nothing).

        Returns:
            self.
        """
        if false_reject_rate is not None:
            try:
                calibration.check_rate(false_reject_rate)
            except ValueError as exc:
                raise PatchCoreError(str(exc)) from None
        for _ in fitting.fit_ratios(self, _list_inputs(images, skipped),
                                    [self.config.coreset_ratio], skipped, progress,
                                    streaming, temp_dir, false_reject_rate):
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
        yield from fitting.fit_ratios(self, _list_inputs(images, skipped), ratios, skipped,
                                      progress, True, temp_dir)

    def update(self, images: Sequence[str | os.PathLike] | str | os.PathLike,
               skipped: list[str] | None = None, progress: bool = False) -> "PatchCore":
        """Add good images (files and/or folders) to the fitted model without refitting it
        (:func:`~patchcore_fast.verdict.update`); returns self."""
        return verdict.update(self, _list_inputs(images, skipped), skipped, progress)

    def _set_bank(self, bank: Tensor, progress: bool = False) -> None:
        """Keep ``bank`` (Tensor[M, D]) and precompute its reweighting neighbors."""
        t0 = time.perf_counter()
        with torch.inference_mode(), tqdm(total=1, desc="fit: neighbors",
                                          disable=not progress, leave=False) as bar:
            self.bank = bank
            self.neighbors = (bank_neighbors(self.bank, self.config.num_neighbors)
                              if self.config.num_neighbors > 0 else None)
            bar.update()
        if self.neighbors is not None and self.bank.shape[0] == 1:
            warnings.warn("the memory bank has one row: the reweighting (Eq. 7) has no "
                          "neighbour to compare with, so each image scores its nearest "
                          "distance s* (fit more images or a larger --coreset-ratio)",
                          stacklevel=3)
        synchronize(self.device)
        self.fit_stats.update(bank_rows=int(self.bank.shape[0]),
                              embed_dim=int(self.bank.shape[1]),
                              neighbor_seconds=time.perf_counter() - t0)

    # ----- steps 8-10: scores and maps ------------------------------------------------

    def _check_fitted(self) -> None:
        if self.bank is None:
            raise PatchCoreError("the model is not fitted: call fit() or PatchCore.load()")

    def _knn_operands(self, bank) -> list[Tensor] | None:
        """:func:`~patchcore_fast.ops.knn_bank` of the bank ``bank`` (the model's, on the
        scoring device), made on first use and kept while the model's bank is the same
        tensor: a bank is replaced (fit, update, load), never changed in place. None for a
        sharded bank."""
        if not isinstance(bank, Tensor):
            return None
        kept = self._operands
        if kept is None or kept[0]() is not bank:
            self._operands = kept = (weakref.ref(bank), ops.knn_bank(bank))
        return kept[1]

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
        bank = self.bank.to(patches.device)
        hood = None if self.neighbors is None else self.neighbors.to(patches.device)
        if size is None:
            size = self.input_size or (self.config.crop, self.config.crop)
        if not size[0]:
            stride = self.backbone_info.strides[0] if self.backbone_info else 8
            size = (grid[0] * stride, grid[1] * stride)
        scores, maps = score_patches(patches, bank, hood, grid, size, self.config.blur_sigma,
                                     self._knn_operands(bank))
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

    def maps_back(self, paths: Sequence[Path], maps: Tensor, maps_at: str = "original",
                  sizes: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]:
        """Input-sized maps -> each photo's geometry (:mod:`~patchcore_fast.geometry`).

        Args:
            paths: the photos.
            maps (Tensor[B, H_in, W_in]): maps of the model's input.
            maps_at: ``original`` (the photo's size: crop, padding and resize undone) or
                ``crop`` (the input's resolution, padding cut off: the paper's protocol).
            sizes: each photo's (width, height) as it was read for the maps
                (:meth:`embed_batches` ``with_sizes``); None: from the files' headers (one
                that cannot be read again raises :class:`PatchCoreError`).

        Returns:
            list of float32 array[H, W], one per photo.
        """
        if maps_at not in MAPS_AT:
            raise PatchCoreError(f"maps_at should be one of {', '.join(MAPS_AT)}, got "
                                 f"{maps_at!r}")
        pre = self.preprocess
        sizes = sizes if sizes is not None else [read_size_again(p) for p in paths]
        out = []
        for size, amap in zip(sizes, maps):
            p = pre.placement(size)
            back = p.to_original(amap) if maps_at == "original" else p.to_crop(amap)
            out.append(np.ascontiguousarray(back.numpy(), dtype=np.float32))
        return out

    def predict_batches(self, images: Sequence[str | os.PathLike] | str | os.PathLike,
                        skipped: list[str] | None = None, progress: bool = False,
                        maps_at: str = "original", photos: bool = False
                        ) -> Iterator[tuple]:
        """Scores and maps batch by batch (for large sets).

        Args:
            photos: also yield the photos' pixels as they were read for the maps (to draw
                on without reading the files again).

        Yields:
            (paths, float32 array[B] scores, B float32 arrays[H, W]: the maps, see
            :meth:`maps_back`), with ``photos`` and B uint8 arrays[H, W, 3] (upright).
        """
        self._check_fitted()
        with torch.inference_mode():
            for paths, patches, sizes, *pixels in self._embed_paths(
                    _list_inputs(images, skipped), skipped, progress, "score", photos):
                scores, maps = self.score_embeddings(patches, self.grid, self.input_size)
                yield paths, scores.numpy(), self.maps_back(paths, maps, maps_at, sizes), \
                    *pixels

    def predict(self, images, progress: bool = False, maps_at: str = "original",
                min_region_area: int = DEFAULT_MIN_REGION_AREA) -> Prediction:
        """Image scores, anomaly maps and, when the model is calibrated, the verdict, of files
        or of pictures in memory.

        Args:
            images: image files and/or folders; or in-memory pictures, one or a list: numpy
                arrays (H x W [x 1|3|4], uint8, uint16 or floats in [0, 1]), tensors
                ([B x] C x H x W, uint8 or floats in [0, 1]), PIL images or encoded image
                bytes (:mod:`~patchcore_fast.frames`: the same scores and maps as the same
                picture read from a file).
            progress: show a progress bar.
            maps_at: ``original`` (each photo's own size) or ``crop`` (:meth:`maps_back`).
            min_region_area: defect regions of fewer pixels are left out.

        Returns:
            :class:`Prediction` (unreadable files are skipped with a warning and listed;
            for frames ``paths`` holds None per frame).

        Raises:
            frames.FrameError: a frame that cannot be scored (wrong dtype, no pixels, NaN,
                5 channels, ...), named by its position.
        """
        try:
            min_region_area = check_min_area(min_region_area, "min_region_area")
        except ValueError as exc:
            raise PatchCoreError(str(exc)) from None
        if frames.is_frames(images):
            pred = frames.predict(self, images, progress, maps_at)
        else:
            skipped: list[str] = []
            paths, scores, maps = [], [], []
            for p, s, m in self.predict_batches(images, skipped, progress, maps_at):
                paths += p
                scores.append(s)
                maps += m
            if not paths:
                raise PatchCoreError("none of the images could be read")
            pred = Prediction(paths, np.concatenate(scores), maps, skipped)
        if self.calibration is not None:
            pred.normalised, pred.labels, pred.regions, _ = self.verdict(
                pred.scores, pred.maps, min_region_area)
        return pred

    def verdict(self, scores: np.ndarray, maps: Sequence[np.ndarray],
                min_region_area: int = DEFAULT_MIN_REGION_AREA
                ) -> tuple[np.ndarray, np.ndarray, list[list[dict]], list[np.ndarray]]:
        """The calibrated verdict on scored images (:func:`~patchcore_fast.verdict.verdict`:
        normalised scores, labels, regions and region masks per image)."""
        return verdict.verdict(self, scores, maps, min_region_area)


    def _embedding_matrix(self) -> Tensor:
        if self._embedder is not None:
            return self._embedder.projection
        if self._projection is not None:
            return self._projection
        return self.embedder.projection

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as one safetensors file, atomically (:mod:`~patchcore_fast.
        model_file`: the bank, the neighbors, the embedding matrix, the settings)."""
        self._check_fitted()
        model_file.write(path, ModelFile(self.config, self.backbone_info, self.bank,
                                         self._embedding_matrix(), self.neighbors, self.grid,
                                         self.fit_stats, self.calibration))

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
                device (:class:`~patchcore_fast.sharded.ShardedBank`; scoring is then
                collective); ignored in one process.

        Returns:
            The fitted :class:`PatchCore`.
        """
        saved = model_file.read(path, weights)
        runtime = {"device": device, "batch_size": batch_size, "num_workers": num_workers,
                   "precision": precision}
        model = cls(saved.config, **{k: v for k, v in runtime.items() if v is not None})
        model.backbone_info = saved.backbone
        model._projection = saved.projection
        launch = distributed.current()
        model.bank = (ShardedBank(saved.bank, launch.rank, launch.world, model.device)
                      if bank_shards and launch.world > 1 else saved.bank.to(model.device))
        model.neighbors = (saved.neighbors.to(model.device) if saved.neighbors is not None
                           else None)
        model.grid = saved.grid
        model.fit_stats = saved.fit_stats
        model.calibration = saved.calibration
        return model
