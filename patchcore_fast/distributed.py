"""Exact greedy k-center coreset over ``torch.distributed``: each rank holds a shard.

Every rank keeps its shard of the (projected) rows and of their nearest-centre
distances; no rank ever holds the whole bank. One step, on every rank:

1. all-gather each rank's record (its farthest unselected row as a packed
   (squared distance, global index) key, and that row's float32 bits: D + 2 int32 words);
2. :func:`patchcore_fast.ops.coreset_shard_step`: the largest key is the new centre (the
   arg-max over all rows, ties to the lowest global index), its row came with it; lower
   the shard's distances with it, and make this rank's record for the next step.

So one step costs **one collective** (an all-gather of ``world x (D + 2)`` int32 words: the
key and the row travel together, instead of an all-reduce of the key followed by a
broadcast of the row from its owner, which would be two). Setup costs one more (the shard
sizes). On CUDA (NCCL) the loop never waits for the device: the step is one kernel pair
on the current stream and the collective is enqueued on the device, so the host only
queues work.

The distances are computed with the same arithmetic as the single-process kernel of the
same device (:func:`patchcore_fast.ops.greedy_coreset`), so the selection equals it,
ties included, for any split of the rows into shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops, reference


def _shard_layout(shard: Tensor, group) -> tuple[list[int], int]:
    """Rows of every rank's shard and the common width (one all-gather)."""
    world = dist.get_world_size(group)
    finite = bool(torch.isfinite(shard).all()) if shard.numel() else True
    mine = torch.tensor([shard.shape[0], shard.shape[1], int(not finite)], dtype=torch.int64,
                        device=shard.device)
    every = torch.empty(world * 3, dtype=torch.int64, device=shard.device)
    dist.all_gather_into_tensor(every, mine, group=group)
    rows, widths, bad = every.view(world, 3).cpu().T.tolist()
    # Every rank sees the same table, so every rank raises the same error.
    if len(set(widths)) != 1:
        raise ValueError(f"every rank's shard should have the same width, got widths {widths} "
                         "(by rank)")
    if any(bad):
        raise ValueError(f"shard contains NaN or Inf values on rank(s) "
                         f"{[r for r, b in enumerate(bad) if b]}")
    return rows, widths[0]


def greedy_coreset_sharded(shard: Tensor, k: int, start: int = 0, group=None) -> Tensor:
    """Exact greedy k-center selection over the rows of all ranks' shards.

    Collective: every rank of ``group`` calls it with its own shard and the same ``k``
    and ``start``. Rank r's shard holds the global rows after those of ranks 0 .. r-1 (the
    concatenation in rank order is the bank); shards may differ in size, and may be empty.
    The result is :func:`patchcore_fast.ops.greedy_coreset` on that concatenation.

    Cost: ``k`` all-gathers of ``world x (D + 2)`` int32 words (one per step) plus one at
    setup; each step also makes one pass over the shard (the plain loop: the lazy
    evaluation of the single-process kernel needs the whole heap in one place).

    Args:
        shard (Tensor[N_r, D]): this rank's rows (converted to float32); CPU with gloo,
            CUDA with NCCL.
        k (int): number of centres, 1 <= k <= total rows.
        start (int): global index of the first centre.
        group: the process group (default: the world).

    Returns:
        Tensor[k] int64 on the shard's device, the same on every rank: the selected global
        row indices, in selection order.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("greedy_coreset_sharded needs torch.distributed: call "
                           "torch.distributed.init_process_group first (or use "
                           "patchcore_fast.greedy_coreset in one process)")
    if not isinstance(shard, Tensor) or shard.dim() != 2 or shard.shape[1] == 0:
        raise ValueError(f"shard should be a 2-D tensor [rows, dim] with dim >= 1, got "
                         f"{tuple(shard.shape) if isinstance(shard, Tensor) else type(shard)}")
    shard = shard.float().contiguous()
    rows, width = _shard_layout(shard, group)
    n = sum(rows)
    k, start = int(k), int(start)
    if not 1 <= k <= n:
        raise ValueError(f"k should be between 1 and the number of rows {n} (all ranks), got {k}")
    if not 0 <= start < n:
        raise ValueError(f"start should be a row index in [0, {n}), got {start}")
    rank = dist.get_rank(group)
    offset = sum(rows[:rank])
    device = shard.device

    min_d = torch.full((rows[rank],), float("inf"), dtype=torch.float32, device=device)
    indices = torch.empty(k, dtype=torch.int64, device=device)
    # Step 0's candidates: only the owner of `start` offers it (any non-zero key will do).
    record = torch.zeros(width + 2, dtype=torch.int32, device=device)
    if offset <= start < offset + rows[rank]:
        key = reference.pack_keys(torch.tensor([float("inf")]), torch.tensor([start]))
        record[:2] = key.view(torch.int32).to(device)
        record[2:] = shard[start - offset].view(torch.int32)
    # Gathered flat (gloo wants the output as one run of per-rank chunks), read [R, D + 2].
    gathered = torch.empty(dist.get_world_size(group) * (width + 2), dtype=torch.int32,
                           device=device)
    candidates = gathered.view(-1, width + 2)
    for step in range(k):
        dist.all_gather_into_tensor(gathered, record, group=group)  # the step's collective
        record = ops.coreset_shard_step(shard, candidates, offset, min_d, indices, step)
    return indices
