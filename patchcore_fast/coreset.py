"""Step 7 of the method: the greedy coreset that shrinks the memory bank.

PatchCore keeps a subset of the training patches that covers all of them as well as
possible: greedy k-center selection (start at one point, repeatedly add the point farthest
from the chosen ones), which is a 2-approximation of the minimax covering. To make each
step cheap, distances are taken on a random Gaussian projection to ``projection_dim``
(128) dimensions, which preserves pairwise distances up to a small factor
(Johnson-Lindenstrauss); the bank then keeps the *full-width* rows of the chosen patches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import ops


def coreset_size(n: int, ratio: float) -> int:
    """Number of bank rows kept from ``n`` patches at ``ratio`` (at least one)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio should be in (0, 1], got {ratio}")
    return n if ratio >= 1.0 else max(1, min(n, int(math.ceil(n * ratio))))


def gaussian_projection(dim_in: int, dim_out: int, generator: torch.Generator) -> Tensor:
    """A Johnson-Lindenstrauss map: i.i.d. N(0, 1 / dim_out) entries.

    Args:
        dim_in: input width.
        dim_out: output width.
        generator: seeded random source (the same seed gives the same map).

    Returns:
        Tensor[dim_in, dim_out] float32, so that ``x @ P`` projects rows of ``x``.
    """
    return torch.randn(dim_in, dim_out, generator=generator) / math.sqrt(dim_out)


def select_coreset(features: Tensor, ratio: float, projection_dim: int = 128,
                   seed: int = 0) -> Tensor:
    """Indices of the coreset rows.

    Args:
        features (Tensor[N, D]): all training patch embeddings.
        ratio: fraction of rows to keep, in (0, 1]; 1 keeps every row (no selection).
        projection_dim: width of the random projection the selection runs on; when D is
            not larger, the selection runs on the features themselves.
        seed: seeds the projection and the start point.

    Returns:
        Tensor[k] int64 (on ``features``' device): selected rows in selection order.
    """
    n, d = features.shape
    k = coreset_size(n, ratio)
    if k == n:
        return torch.arange(n, device=features.device)
    generator = torch.Generator().manual_seed(int(seed))
    start = int(torch.randint(n, (1,), generator=generator))
    if d > projection_dim:
        proj = gaussian_projection(d, projection_dim, generator).to(features.device)
        reduced = torch.cat([chunk.float() @ proj for chunk in features.split(65536)])
    else:
        reduced = features.float()
    return ops.greedy_coreset(reduced, k, start)
