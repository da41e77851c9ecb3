"""Steps 8-10 of the method: patch scores, the image score and the anomaly map.

8. A test patch is as anomalous as it is far from the memory bank: its score is the
   Euclidean distance to the nearest bank row.
9. The image score is the largest patch score s*, reweighted (paper Eq. 7): with m_test the
   most anomalous patch, m* its nearest bank row and N_b(m*) the b nearest bank rows of m*
   (m* itself included),

       s = (1 - exp(||m_test - m*||) / sum_{m in N_b(m*)} exp(||m_test - m||)) * s*.

   If m* sits in a sparse part of the bank (its neighbors are far from m_test too) the
   softmax weight of m* is small and s stays close to s*; if m* is surrounded by close
   neighbors, the test patch is probably normal but rare and s is lowered.

   A neighbourhood of m* alone (b = 1, or a bank of one row) says nothing about density,
   and the formula would give 1 - 1 = 0 for every image. It is defined as the limit of
   Eq. 7 when the other neighbours recede to infinity (the sparsest neighbourhood there
   is): the weight of m* tends to 0 and s = s*. ``num_neighbors = 1`` itself is refused
   (config.py); a one-row bank is scored so, with a warning at fit time.
10. The map: patch scores on the feature grid, upsampled bilinearly to the image and
    smoothed with a Gaussian (sigma = 4 pixels).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops


def nearest_bank_rows(patches: Tensor, bank: Tensor, prepared: list[Tensor] | None = None
                      ) -> tuple[Tensor, Tensor]:
    """Step 8: each patch's distance to, and index of, its nearest bank row.

    Args:
        patches (Tensor[Q, D]): test embeddings.
        bank (Tensor[M, D]): memory bank, or a
            :class:`~patchcore_fast.sharded.ShardedBank` (same answer, collective).
        prepared: :func:`~patchcore_fast.ops.knn_bank` of ``bank`` (the same answer).

    Returns:
        (Tensor[Q] float32, Tensor[Q] int64): Euclidean distances and bank rows.
    """
    dist, idx = ops.knn(patches, bank, 1, prepared) if isinstance(bank, Tensor) \
        else bank.knn(patches, 1)
    return dist[:, 0], idx[:, 0]


def bank_neighbors(bank: Tensor, num_neighbors: int) -> Tensor:
    """The b nearest bank rows of every bank row, computed once at fit time.

    Args:
        bank (Tensor[M, D]): memory bank.
        num_neighbors: b; clamped to M.

    Returns:
        Tensor[M, min(b, M)] int64: neighbors by increasing distance; the row itself is
        among them (distance 0).
    """
    b = min(int(num_neighbors), bank.shape[0])
    return ops.knn(bank, bank, b)[1]


class NeighborsOnDemand:
    """:func:`bank_neighbors` of a bank, each row's computed when it is read.

    Scoring reads the neighbors of one bank row per image (m*, the nearest row of its
    most anomalous patch), so for a bank that scores a few images and is dropped (a
    calibration fold's), the rows read cost a k-NN pass of a few rows each instead of
    the whole bank against itself (M^2 D). Indexing gives what indexing
    :func:`bank_neighbors` gives: the same k-NN op per row, whose answer for a query row
    does not depend on the other query rows.

    Args:
        bank (Tensor[M, D]): memory bank.
        num_neighbors: b; clamped to M.
    """

    def __init__(self, bank: Tensor, num_neighbors: int):
        self.bank = bank
        self.shape = (bank.shape[0], min(int(num_neighbors), bank.shape[0]))

    def __getitem__(self, rows: Tensor) -> Tensor:
        """Tensor[len(rows), b] int64: the neighbors of bank rows ``rows`` (1-D)."""
        rows = rows.to(self.bank.device)
        return ops.knn(self.bank[rows].contiguous(), self.bank, self.shape[1])[1]


def update_neighbors(bank: Tensor, neighbors: Tensor, added: int, num_neighbors: int) -> Tensor:
    """:func:`bank_neighbors` of a bank whose last ``added`` rows are new.

    An old row's b nearest rows change only where a new row is nearer than one of them:
    its new list is the b nearest among its old list and its b nearest new rows. So only
    the new rows are searched (old rows against the new ones, new rows against the whole
    bank), and the cost grows with the new rows rather than with the square of the bank.
    Equal distances keep the lower row first, as :func:`bank_neighbors` orders them.

    Args:
        bank (Tensor[M + A, D]): the bank, its last ``added`` rows new.
        neighbors (Tensor[M, min(b, M)]): :func:`bank_neighbors` of the first M
            rows.
        added: A, the number of new rows (>= 0).
        num_neighbors: b.

    Returns:
        Tensor[M + A, min(b, M + A)] int64.
    """
    total, added = bank.shape[0], int(added)
    m, b = total - added, min(int(num_neighbors), total)
    if added == 0:
        return neighbors
    if neighbors.shape[1] < b:  # the old bank had fewer than b rows: redo (tiny)
        return bank_neighbors(bank, num_neighbors)
    old, new = bank[:m], bank[m:]
    # The old rows' distances to their lists, by direct differences (as the kernel's), a
    # block of rows at a time (a block's differences are rows x b x D floats).
    d_old = torch.cat([torch.linalg.vector_norm(
        old[r:r + 2048, None, :].float() - bank[neighbors[r:r + 2048]].float(), dim=-1)
        for r in range(0, m, 2048)]) if m else bank.new_empty((0, b))
    d_new, i_new = ops.knn(old, new, min(b, added))
    dist = torch.cat([d_old, d_new], dim=1)
    rows = torch.cat([neighbors, i_new + m], dim=1)
    # Order by (distance, row): sort by row, then stably by distance.
    by_row = torch.argsort(rows, dim=1, stable=True)
    dist, rows = dist.gather(1, by_row), rows.gather(1, by_row)
    merged = rows.gather(1, torch.argsort(dist, dim=1, stable=True)[:, :b])
    return torch.cat([merged, ops.knn(new, bank, b)[1]])


def reweighting_factor(test_patch: Tensor, nearest_dist: Tensor, neighbors: Tensor
                       ) -> Tensor:
    """The factor ``1 - exp(s*) / sum_j exp(d_j)`` of Eq. 7, computed stably.

    Subtracting the largest exponent ``c = max(s*, max_j d_j)`` from every exponent leaves
    the ratio unchanged and keeps ``exp`` finite whatever the distance scale.

    Args:
        test_patch (Tensor[B, D]): the most anomalous patch m_test of each image.
        nearest_dist (Tensor[B]): s* = ||m_test - m*||.
        neighbors (Tensor[B, b, D]): the bank rows N_b(m*) of each image.

    Returns:
        Tensor[B]: the factor in [0, 1]; 1 when ``b`` is 1 (m* alone: the module's
        docstring).
    """
    if neighbors.shape[1] < 2:
        return torch.ones_like(nearest_dist, dtype=torch.float32)
    d = torch.linalg.vector_norm(neighbors.float() - test_patch.float()[:, None, :], dim=-1)
    c = torch.maximum(d.max(dim=1).values, nearest_dist)
    ratio = torch.exp(nearest_dist - c) / torch.exp(d - c[:, None]).sum(dim=1)
    return (1.0 - ratio).clamp_(0.0, 1.0)


def image_scores(patches: Tensor, patch_dist: Tensor, patch_idx: Tensor, bank: Tensor,
                 neighbors: Tensor | None) -> Tensor:
    """Step 9: the image score of each image, reweighted when neighbors are given.

    Args:
        patches (Tensor[B, P, D]): test embeddings per image.
        patch_dist (Tensor[B, P]): patch scores.
        patch_idx (Tensor[B, P]): nearest bank row of each patch.
        bank (Tensor[M, D]): memory bank (or a sharded one: indexing it gathers rows).
        neighbors (Tensor[M, b] or None): from :func:`bank_neighbors` (or a
            :class:`NeighborsOnDemand`); None turns the reweighting off (score = s*, as
            the official code).

    Returns:
        Tensor[B] float32.
    """
    s_star, where = patch_dist.max(dim=1)
    if neighbors is None or neighbors.shape[1] < 2:  # off, or m* alone: s = s*
        return s_star
    rows = torch.arange(patches.shape[0], device=patches.device)
    m_test = patches[rows, where]                               # [B, D]
    m_star = patch_idx[rows, where]                             # [B]
    support = bank[neighbors[m_star].to(bank.device)]      # [B, b, D]
    return reweighting_factor(m_test, s_star, support) * s_star


def score_patches(patches: Tensor, bank: Tensor, neighbors: Tensor | None,
                  grid: tuple[int, int], size: tuple[int, int], sigma: float,
                  prepared: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Steps 8-10 on embeddings against a bank: image scores and input-sized maps.

    Args:
        patches (Tensor[B, h * w, D]): test embeddings.
        bank (Tensor[M, D]): memory bank (or a sharded one).
        neighbors (Tensor[M, b] | None): :func:`bank_neighbors` (None: no reweighting).
        grid: (h, w).
        size: (H_in, W_in) of the input images.
        sigma: the maps' Gaussian blur.
        prepared: :func:`~patchcore_fast.ops.knn_bank` of ``bank`` (the same answer).

    Returns:
        (Tensor[B] image scores, Tensor[B, H_in, W_in] maps), on the patches' device.
    """
    b, p, d = patches.shape
    dist, idx = nearest_bank_rows(patches.reshape(-1, d), bank, prepared)
    dist, idx = dist.view(b, p), idx.view(b, p)
    scores = image_scores(patches, dist, idx, bank, neighbors)
    return scores, anomaly_maps(dist, grid, tuple(size), sigma)


def gaussian_kernel1d(sigma: float) -> Tensor:
    """Normalised 1-D Gaussian of size ``2 * round(4 sigma) + 1`` (4 sigma each side)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


@functools.lru_cache(maxsize=16)
def _blur_kernel(sigma: float, device: torch.device) -> Tensor:
    """:func:`gaussian_kernel1d` on ``device``, made once per (sigma, device): a copy to a
    GPU on every batch would wait for the device (a host synchronisation). Made outside
    inference mode, so that a later call with autograd on may use it too."""
    with torch.inference_mode(False):
        return gaussian_kernel1d(sigma).to(device)


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Blur maps with a separable Gaussian (a 2-D Gaussian is the product of two 1-D ones).

    Borders are reflected, as torchvision's ``gaussian_blur``.

    Args:
        maps (Tensor[B, H, W]): maps.
        sigma: standard deviation in pixels; <= 0 returns the maps unchanged.

    Returns:
        Tensor[B, H, W].
    """
    if sigma <= 0:
        return maps
    k = _blur_kernel(float(sigma), maps.device)
    r = k.numel() // 2
    x = maps[:, None].float()
    mode = "reflect" if r < min(x.shape[-2:]) else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    return x[:, 0]


def anomaly_maps(patch_dist: Tensor, grid: tuple[int, int], size: tuple[int, int],
                 sigma: float = 4.0) -> Tensor:
    """Step 10: patch scores -> image-sized, smoothed anomaly maps.

    Args:
        patch_dist (Tensor[B, h * w]): patch scores in row-major grid order.
        grid: (h, w) of the feature grid.
        size: (H, W) of the (cropped) input image.
        sigma: Gaussian blur in pixels.

    Returns:
        Tensor[B, H, W] float32.
    """
    b = patch_dist.shape[0]
    m = patch_dist.float().view(b, 1, *grid)
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(m, sigma)


def blur_kernel_size(sigma: float) -> int:
    """Kernel size used for ``sigma`` (for documentation and tests)."""
    return 2 * int(4.0 * sigma + 0.5) + 1 if sigma > 0 else 1


__all__ = ["nearest_bank_rows", "bank_neighbors", "NeighborsOnDemand", "update_neighbors",
           "reweighting_factor", "image_scores", "score_patches", "gaussian_blur",
           "anomaly_maps", "gaussian_kernel1d", "blur_kernel_size"]
