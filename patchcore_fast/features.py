"""Steps 3-5 of the method: locally aware patch features of fixed width.

For every position of the stride-8 grid PatchCore builds one vector:

3. *local aggregation*: each layer map is averaged over a p x p neighborhood (p = 3,
   stride 1, zero padding 1), so a feature sees its neighbors without losing resolution;
4. *alignment*: the deeper (stride-16) map is upsampled bilinearly onto the stride-8 grid
   and the layers are concatenated per position;
5. *width*: as in the official code, each layer's channels are adaptive-average-pooled to
   ``pretrain_embed_dim`` (which gives every layer the same weight whatever its channel
   count), then the stacked layers are pooled to ``target_embed_dim``.

Every operation of step 5 is linear in the channels, so it is one matrix ``W`` of shape
``[target_embed_dim, sum_l C_l]`` applied at each position. When the layers have fewer
channels than ``target_embed_dim`` (efficientnet_lite0: 40 + 112 = 152 < 1024), the
embeddings ``W x`` live in a subspace of dimension rank(W); with ``compact=True`` the model
stores them in an orthonormal basis of that subspace instead (``R x`` with
``R^T R = W^T W``). Euclidean distances, and so every PatchCore score, are unchanged, while
memory and nearest-neighbor time shrink by ``target_embed_dim / rank(W)``.

Extraction works batch by batch (:meth:`PatchEmbedder.forward`), so a caller can stream.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Backbone


def channel_pool_matrix(c_in: int, c_out: int) -> Tensor:
    """The linear map of ``adaptive_avg_pool1d`` from ``c_in`` to ``c_out`` entries.

    Output ``i`` is the mean of inputs ``floor(i c_in / c_out)`` .. ``ceil((i + 1) c_in /
    c_out) - 1``; with ``c_out > c_in`` the bins hold one or two inputs (replication).

    Args:
        c_in: input length.
        c_out: output length.

    Returns:
        Tensor[c_out, c_in] float64 whose rows sum to one.
    """
    m = torch.zeros(c_out, c_in, dtype=torch.float64)
    for i in range(c_out):
        lo = (i * c_in) // c_out
        hi = -((-(i + 1) * c_in) // c_out)  # ceil division
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def reduction_matrix(channels: Sequence[int], pretrain_embed_dim: int,
                     target_embed_dim: int) -> Tensor:
    """Step 5 as one matrix: per-layer pooling, then pooling of the stack.

    Args:
        channels: channels ``C_l`` of each layer, in concatenation order.
        pretrain_embed_dim: width each layer is pooled to.
        target_embed_dim: width of the final embedding.

    Returns:
        Tensor[target_embed_dim, sum(channels)] float64 ``W``.
    """
    per_layer = torch.block_diag(*[channel_pool_matrix(c, pretrain_embed_dim)
                                   for c in channels])
    stack = channel_pool_matrix(len(channels) * pretrain_embed_dim, target_embed_dim)
    return stack @ per_layer


def isometric_basis(w: Tensor, rtol: float = 1e-10) -> Tensor:
    """A matrix ``R`` with ``||R x|| = ||W x||`` for every ``x`` and as few rows as possible.

    From the eigen-decomposition ``W^T W = V diag(lam) V^T``: ``R = diag(sqrt(lam)) V^T``
    restricted to the non-zero eigenvalues, so ``R^T R = W^T W`` and ``R`` has rank(W) rows.

    Args:
        w (Tensor[D, C]): a linear map (float64 for accuracy).

    Returns:
        Tensor[r, C] float64, r = rank(W).
    """
    lam, vec = torch.linalg.eigh(w.T @ w)
    keep = lam > rtol * lam.max()
    lam, vec = lam[keep].flip(0), vec[:, keep].flip(1)  # largest first
    return lam.sqrt()[:, None] * vec.T


def aggregate(maps: Sequence[Tensor], patch_size: int = 3) -> Tensor:
    """Steps 3 and 4: local averaging, upsampling to the first layer's grid, concatenation.

    Args:
        maps: list of Tensor[B, C_l, H_l, W_l]; the first sets the grid.
        patch_size: neighborhood p (odd); 1 disables the averaging.

    Returns:
        Tensor[B, sum C_l, H_0, W_0].
    """
    grid = maps[0].shape[-2:]
    out = []
    for m in maps:
        if patch_size > 1:
            # Mean over the p x p neighborhood, zeros outside the map (as the official
            # unfold with padding followed by a mean).
            m = F.avg_pool2d(m, patch_size, stride=1, padding=patch_size // 2)
        if m.shape[-2:] != grid:
            m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
        out.append(m)
    return torch.cat(out, dim=1)


class PatchEmbedder(nn.Module):
    """Images -> one embedding per position of the stride-8 grid (steps 2-5).

    Args:
        backbone: the frozen network.
        pretrain_embed_dim: per-layer pooled width.
        target_embed_dim: final width ``D`` of the PatchCore embedding.
        patch_size: local neighborhood p.
        compact: store embeddings in an isometric basis when it is narrower (see module
            docstring); distances are unchanged.
        projection (Tensor[D', C] or None): the embedding matrix to use, e.g. the one saved
            in a model file; computed from the settings when None.
        precision: ``fp32``, or ``bf16``: the backbone runs under bf16 autocast; its maps
            are cast back to float32 before the aggregation, so steps 3-5 and everything
            after them are float32 whatever the backbone's arithmetic. Either way the
            backbone runs on channels-last (NHWC) activations, the layout oneDNN's and
            cuDNN's fastest convolutions use (fp32 on a 2-core AVX2 CPU: 11 % faster for
            WideResNet-50; the same arithmetic, another summation order).
    """

    def __init__(self, backbone: Backbone, pretrain_embed_dim: int = 1024,
                 target_embed_dim: int = 1024, patch_size: int = 3, compact: bool = True,
                 projection: Tensor | None = None, precision: str = "fp32"):
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision should be fp32 or bf16, got {precision!r}")
        self.backbone = backbone
        self.patch_size = patch_size
        self.precision = precision
        self.backbone.to(memory_format=torch.channels_last)
        if projection is None:
            w = reduction_matrix(backbone.info.channels, pretrain_embed_dim, target_embed_dim)
            if compact:
                r = isometric_basis(w)
                if r.shape[0] < w.shape[0]:
                    w = r
            projection = w
        expected = sum(backbone.info.channels)
        if projection.dim() != 2 or projection.shape[1] != expected:
            raise ValueError(f"projection should be [D, {expected}], got "
                             f"{tuple(projection.shape)}")
        self.register_buffer("projection", projection.float().contiguous())

    @property
    def dim(self) -> int:
        """Width of the stored embeddings."""
        return int(self.projection.shape[0])

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Embed a batch.

        Args:
            images (Tensor[B, 3, H, W]): normalised images.

        Returns:
            (Tensor[B, h * w, D], (h, w)): embeddings in row-major grid order and the grid.
        """
        images = images.contiguous(memory_format=torch.channels_last)
        # No weight-cast cache: each weight is read once per forward, and a cache would
        # outlive a CUDA graph's capture (patchcore_fast.graphs).
        with torch.autocast(images.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16", cache_enabled=False):
            maps = self.backbone(images)
        x = aggregate([m.float() for m in maps], self.patch_size)  # [B, C, h, w]
        b, c, h, w = x.shape
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        return x @ self.projection.T, (h, w)
