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
    # Direct differences (cdist's non-matmul mode): the accurate fp32 form of ||x - c||,
    # fused, without an N x D temporary. The loop tracks Euclidean distances; their order
    # is that of the squared ones.
    return _greedy_loop(x, k, start, lambda c: torch.cdist(
        x, x[c:c + 1], compute_mode="donot_use_mm_for_euclid_dist")[:, 0])


def _greedy_loop(x: Tensor, k: int, start: int, distance_to) -> Tensor:
    """The farthest-point loop over ``distance_to(c) -> Tensor[N]`` (any monotone distance)."""
    min_d = torch.full((x.shape[0],), float("inf"), dtype=torch.float32, device=x.device)
    out = torch.empty(k, dtype=torch.int64, device=x.device)
    cur = int(start)
    for t in range(k):
        out[t] = cur
        min_d = torch.minimum(min_d, distance_to(cur))
        min_d[cur] = -1.0  # selected: never the arg-max again
        if t + 1 < k:
            cur = int(torch.argmax(min_d))  # first maximal index = lowest index on ties
    return out


def pack_keys(dist2: Tensor, index: Tensor) -> Tensor:
    """Packed arg-max keys of the coreset kernels, as int64.

    ``(float32 bits of dist2) << 32 | (2^32 - 1 - index)``: for ``dist2 >= 0`` a larger key
    is a larger distance, then a lower index, so one integer max (an all-reduce MAX, say)
    is an arg-max with the lowest-index tie rule. The sign bit of a non-negative float is
    0, so keys are non-negative int64 values.

    Args:
        dist2 (Tensor[N]): float32 squared distances, >= 0.
        index (Tensor[N]): int64 indices in [0, 2^31 - 1).

    Returns:
        Tensor[N] int64 keys.
    """
    bits = dist2.float().contiguous().view(torch.int32).to(torch.int64)
    return (bits << 32) | (0xFFFFFFFF - index.to(torch.int64))


def key_index(key: Tensor) -> Tensor:
    """The index held in packed keys (see :func:`pack_keys`)."""
    return 0xFFFFFFFF - (key & 0xFFFFFFFF)


def coreset_shard_state(shard: Tensor, k: int, lazy: bool = True,
                        start: Tensor | None = None) -> list[Tensor]:
    """The state of one rank's shard (pure-torch twin of the op): ``[min_d]``, each row's
    squared distance to its nearest centre, before the first step a copy of ``start`` (its
    distance to centres chosen before the run) or +inf (the plain pass's state, whatever
    ``lazy`` asks: the twin has no lazy evaluation)."""
    if start is not None:
        return [start.float().clone()]
    return [torch.full((shard.shape[0],), float("inf"), dtype=torch.float32,
                       device=shard.device)]


def coreset_shard_step(shard: Tensor, candidates: Tensor, offset: int, state: list[Tensor],
                       indices: Tensor, step: int) -> Tensor:
    """One step of the distributed coreset on one rank's shard (pure-torch twin of the op).

    The candidate records (one per rank) name the new centre: the record with the largest
    packed key. Every row's ``min_d`` (``state[0]``) is lowered with its squared distance
    to that centre (direct differences; selected rows hold -1 and stay there): the plain
    pass, one read of the shard per step. The centre is marked -1 if this shard owns it,
    ``indices[step]`` is set to its global index, and this shard's record for the next step
    is returned.

    Args:
        shard (Tensor[N_r, D]): float32 rows, global indices ``offset .. offset + N_r - 1``.
        candidates (Tensor[R, D + 2]): int32 records: words 0-1 a packed key (int64 bits,
            0 = no point), then the float32 bits of the row.
        offset (int): global index of the shard's first row.
        state (list[Tensor]): from :func:`coreset_shard_state`; updated in place.
        indices (Tensor[k]): int64, ``indices[step]`` is written.
        step (int): the step.

    Returns:
        Tensor[D + 2] int32: the record of this shard's farthest unselected row (key 0
        and a zero row when none is left).
    """
    min_d = state[0]
    n, d = shard.shape
    keys = candidates[:, :2].contiguous().view(torch.int64)[:, 0]
    owner = int(torch.argmax(keys))
    chosen = int(key_index(keys[owner]))
    centre = candidates[owner, 2:].contiguous().view(torch.float32)
    dist2 = (shard.float() - centre).pow(2).sum(1)
    new = torch.where(min_d >= 0, torch.minimum(min_d, dist2), min_d)
    if 0 <= chosen - offset < n:
        new[chosen - offset] = -1.0
    min_d.copy_(new)
    indices[step] = chosen
    record = torch.zeros(d + 2, dtype=torch.int32, device=shard.device)
    live = new >= 0
    if bool(live.any()):
        rows = torch.arange(n, device=shard.device)
        key = pack_keys(new.clamp_min(0), rows + offset).masked_fill(~live, 0)
        best = int(torch.argmax(key))
        record[:2] = key[best:best + 1].view(torch.int32)
        record[2:] = shard[best].float().contiguous().view(torch.int32)
    return record


def greedy_coreset_matvec(features: Tensor, k: int, start: int = 0) -> Tensor:
    """The same selection through the norm expansion ``||x||^2 + ||c||^2 - 2 x.c``.

    This is the form of the official implementation and the fastest plain-torch loop (one
    matrix-vector product per step). It differs from :func:`greedy_coreset` only through
    floating-point rounding, which can reorder near-ties late in the selection. Arguments
    and result as :func:`greedy_coreset`.
    """
    x = features.float()
    sq = x.pow(2).sum(1)
    return _greedy_loop(x, k, start,
                        lambda c: (sq + sq[c] - 2.0 * (x @ x[c])).clamp_min_(0.0))


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


def knn_bank(bank: Tensor) -> tuple[Tensor, Tensor, float]:
    """The bank's side of the CPU k-NN kernel's expansion (csrc/cpu/knn.cpp, ``bank_side``;
    the first three of ``ops.knn_bank``'s operands).

    Returns:
        (mean: Tensor[D] float32, accumulated in float64 and rounded once; norms:
        Tensor[M] float32, each centred row's ``||fl(b - mu)||^2`` in float64 rounded once;
        their largest value before rounding).
    """
    b = bank.float()
    mean = b.double().mean(0).float()
    sq = (b - mean).double().square().sum(1)  # fl(b - mu) in float32, squared in float64
    return mean, sq.float(), float(sq.max())


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
