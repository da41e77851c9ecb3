"""Pure-torch twins of the compiled operators.

They are the oracle of the tests and the fallback of :mod:`patchcore_fast.ops` when the
compiled extension is missing. They favour being obviously right over being fast, but stay
usable on real data (the k-NN twin works in query chunks so its memory stays bounded).
"""

from __future__ import annotations

import torch
from torch import Tensor


def greedy_coreset(features: Tensor, k: int, start: int = 0) -> Tensor:
    """Greedy k-center (farthest-point) selection, the plain loop of the paper.

    Start with ``start``; at every step take the point whose squared Euclidean distance
    to its nearest selected centre is largest (ties: lowest index), then lower every
    point's nearest-centre distance with its distance to the new centre. Selected points
    are never chosen again, so ``k == N`` gives a permutation.

    Args:
        features (Tensor[N, D]): float32 points.
        k (int): number of centres, 1 <= k <= N.
        start (int): index of the first centre.

    Returns:
        Tensor[k] int64: the selected row indices, in selection order.
    """
    x = features.float()
    n = x.shape[0]
    min_d = torch.full((n,), float("inf"), dtype=torch.float32, device=x.device)
    out = torch.empty(k, dtype=torch.int64, device=x.device)
    cur = int(start)
    for t in range(k):
        out[t] = cur
        # Direct differences (cdist's non-matmul mode): the accurate fp32 form of
        # ||x - c||, fused, without an N x D temporary. The loop tracks Euclidean
        # distances; their order is that of the squared ones.
        d = torch.cdist(x, x[cur:cur + 1], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]
        min_d = torch.minimum(min_d, d)
        min_d[cur] = -1.0  # selected: never the arg-max again
        if t + 1 < k:
            cur = int(torch.argmax(min_d))  # first maximal index = lowest index on ties
    return out


def greedy_coreset_matvec(features: Tensor, k: int, start: int = 0) -> Tensor:
    """The same selection through the norm expansion ``||x||^2 + ||c||^2 - 2 x.c``.

    This is the form of the official implementation and the fastest plain-torch loop (one
    matrix-vector product per step). It differs from :func:`greedy_coreset` only through
    floating-point rounding, which can reorder near-ties late in the selection.

    Args:
        features (Tensor[N, D]): float32 points.
        k (int): number of centres, 1 <= k <= N.
        start (int): index of the first centre.

    Returns:
        Tensor[k] int64: the selected row indices, in selection order.
    """
    x = features.float()
    n = x.shape[0]
    sq = x.pow(2).sum(1)
    min_d = torch.full((n,), float("inf"), dtype=torch.float32, device=x.device)
    out = torch.empty(k, dtype=torch.int64, device=x.device)
    cur = int(start)
    for t in range(k):
        out[t] = cur
        d = (sq + sq[cur] - 2.0 * (x @ x[cur])).clamp_min_(0.0)
        min_d = torch.minimum(min_d, d)
        min_d[cur] = -1.0
        if t + 1 < k:
            cur = int(torch.argmax(min_d))
    return out


def covering_radii(features: Tensor, *selections: Tensor) -> list[Tensor]:
    """Covering radius after each step of one or more selections (tie-tolerant checks).

    Entry ``t`` is the largest squared distance from any point to its nearest centre among
    ``indices[:t + 1]``, in float64. Two selections that part only through near-ties have
    the same radii step by step, up to rounding. Selections that share a prefix share the
    work of that prefix (a 1,638-step selection of 163,856 points costs one pass per step).

    Args:
        features (Tensor[N, D]): points.
        *selections (Tensor[k]): selections, in order.

    Returns:
        list of Tensor[k] float64: squared covering radii after each step, one per
        selection.
    """
    x = features.double()
    n = x.shape[0]

    def dist(i: int) -> Tensor:
        return torch.cdist(x, x[i:i + 1], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]

    seqs = [s.tolist() for s in selections]
    radii = [torch.empty(len(s), dtype=torch.float64) for s in seqs]
    # One running min-distance per group of selections that agree so far.
    groups = [(list(range(len(seqs))), torch.full((n,), float("inf"), dtype=torch.float64,
                                                  device=x.device))]
    for t in range(max((len(s) for s in seqs), default=0)):
        next_groups = []
        for members, min_d in groups:
            by_index: dict[int, list[int]] = {}
            for m in members:
                if t < len(seqs[m]):
                    by_index.setdefault(seqs[m][t], []).append(m)
            for i, same in by_index.items():
                d = torch.minimum(min_d, dist(i))
                r = float(d.max()) ** 2
                for m in same:
                    radii[m][t] = r
                next_groups.append((same, d))
        groups = next_groups
    return radii


def knn(query: Tensor, bank: Tensor, k: int, chunk: int = 1024, exact: bool = True
        ) -> tuple[Tensor, Tensor]:
    """Exact k nearest bank rows of each query row.

    Args:
        query (Tensor[Q, D]): float32 query rows.
        bank (Tensor[M, D]): float32 bank rows.
        k (int): neighbours per query, 1 <= k <= M.
        chunk (int): queries per step (bounds the Q x M distance matrix).
        exact (bool): direct differences (slow, exact up to fp32 rounding) when True; the
            matrix-multiply form of ``torch.cdist`` (fast, loses accuracy on distances
            much smaller than the norms) when False.

    Returns:
        (Tensor[Q, k] float32, Tensor[Q, k] int64): Euclidean (not squared) distances in
        ascending order and the bank row index of each.
    """
    q, b = query.float(), bank.float()
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist"
    dists, idx = [], []
    for s in range(0, q.shape[0], chunk):
        d = torch.cdist(q[s:s + chunk], b, compute_mode=mode)
        v, i = torch.topk(d, k, dim=1, largest=False, sorted=True)
        dists.append(v)
        idx.append(i)
    if not dists:
        return (torch.empty(0, k, dtype=torch.float32, device=q.device),
                torch.empty(0, k, dtype=torch.int64, device=q.device))
    return torch.cat(dists), torch.cat(idx)
