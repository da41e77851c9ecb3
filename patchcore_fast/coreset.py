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


#: Rows projected per matrix product. Part of the definition of the selection: a GEMM's
#: rounding can depend on the block it is given, so the in-memory and the streaming fit
#: both project exactly these row blocks of the bank in order (bit-identical selections).
PROJECTION_CHUNK = 8192

#: The start draw consumes the same random words for every N below this (measured; torch
#: draws more for larger ranges), so the projection drawn after it does not depend on N
#: and the streaming fit can draw it before N is known. 2**28 patches are 342,000 images
#: of 784 patches; above it the streaming projection is still a valid, seeded
#: Johnson-Lindenstrauss map, only not the one the in-memory path (1 TB of RAM) would draw.
START_DRAW_LIMIT = 2 ** 28


def coreset_start_and_projection(n: int | None, dim_in: int, projection_dim: int,
                                 seed: int) -> tuple[int | None, Tensor | None]:
    """The seeded start row and Gaussian projection of the selection.

    The generator draws the start index first, then the projection. For N < 2**31 the
    start draw consumes a fixed number of random words, so the projection is the same for
    every N below :data:`START_DRAW_LIMIT`: the streaming fit calls this with ``n=None``
    before it knows N.

    Args:
        n: number of patches, or None (start not drawn; projection only).
        dim_in: embedding width D.
        projection_dim: projection width; no projection when D is not larger.
        seed: the model's seed.

    Returns:
        (start index or None, Tensor[D, projection_dim] float32 or None).
    """
    generator = torch.Generator().manual_seed(int(seed))
    start = int(torch.randint(n if n is not None else 2, (1,), generator=generator))
    proj = gaussian_projection(dim_in, projection_dim, generator) \
        if dim_in > projection_dim else None
    return (start if n is not None else None), proj


def project_rows(rows: Tensor, proj: Tensor | None) -> Tensor:
    """Rows in the selection's space: ``rows @ proj`` in float32 (or the rows, as float32).

    Args:
        rows (Tensor[n, D]): at most :data:`PROJECTION_CHUNK` rows (one block of the bank).
        proj (Tensor[D, C] | None): the projection, on ``rows``' device.

    Returns:
        Tensor[n, C] float32 (C = D without a projection).
    """
    return rows.float() @ proj if proj is not None else rows.float()


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
    start, proj = coreset_start_and_projection(n, d, projection_dim, seed)
    if proj is not None:
        proj = proj.to(features.device)
        reduced = torch.cat([project_rows(c, proj) for c in features.split(PROJECTION_CHUNK)])
    else:
        reduced = project_rows(features, None)
    return ops.greedy_coreset(reduced, k, start)
