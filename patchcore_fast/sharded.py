"""PatchCore's rows across the ranks of a distributed run (issue #14): the sharded coreset
and fit, and the sharded bank of score and evaluate.

- The fit (:meth:`patchcore_fast.model.PatchCore.fit` goes through :class:`TrainingRows`):
  each rank embeds its contiguous share of the images
  (:meth:`~patchcore_fast.distributed.Launch.share`), :func:`project_shard` projects its rows
  in the one-process fit's global blocks, :func:`select_sharded` runs the coreset below,
  :func:`gather_bank` brings the chosen full-width rows to rank 0; for the calibration
  :func:`rows_to_main` brings every row there (:meth:`TrainingRows.everything`). In one
  process :class:`TrainingRows` is the :class:`~patchcore_fast.coreset.StreamingCoreset`
  itself.
- Score and evaluate with ``--bank-shards``: the bank is split across the ranks
  (:class:`ShardedBank`).

The process group itself (joining, leaving, the one exchange per phase) lives in
:mod:`patchcore_fast.distributed`.


Every rank keeps its shard of the (projected) rows and of their nearest-centre
distances; no rank ever holds the whole bank. One step, on every rank:

1. all-gather each rank's record (its farthest unselected row as a packed
   (squared distance, global index) key, and that row's float32 bits: D + 2 int32 words);
2. :func:`patchcore_fast.ops.coreset_shard_step`: the largest key is the new centre (the
   arg-max over all rows, ties to the lowest global index), its row came with it; lower
   the shard's distances with it, and make this rank's record for the next step.

So one step costs **one collective** (an all-gather of ``world x (D + 2)`` int32 words: the
key and the row travel together, instead of an all-reduce of the key followed by a
broadcast of the row from its owner, which would be two); between CPU ranks on one host
it goes through shared memory (:mod:`~patchcore_fast.local_exchange`). Setup costs one more (the shard
sizes). On CUDA (NCCL) the loop never waits for the device: the step is one kernel pair
on the current stream and the collective is enqueued on the device, so the host only
queues work.

The distances are computed with the same arithmetic as the single-process kernel of the
same device (:func:`patchcore_fast.ops.greedy_coreset`), so the selection equals it,
ties included, for any split of the rows into shards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops, reference
from .coreset import (PROJECTION_CHUNK, StreamingCoreset, coreset_size,
                      coreset_start_and_projection, project_rows)
from .distributed import Launch, collective_timeout
from .local_exchange import LocalExchange
from .errors import PatchCoreError

if TYPE_CHECKING:  # verdict's layout of the training images
    from .verdict import ImageRows


# torch 2.14 renamed all_gather_into_tensor (now a deprecated alias) to all_gather_single.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _shard_layout(shard: Tensor, group) -> tuple[list[int], int]:
    """Rows of every rank's shard and the common width (one all-gather)."""
    world = dist.get_world_size(group)
    finite = bool(torch.isfinite(shard).all()) if shard.numel() else True
    mine = torch.tensor([shard.shape[0], shard.shape[1], int(not finite)], dtype=torch.int64,
                        device=shard.device)
    every = torch.empty(world * 3, dtype=torch.int64, device=shard.device)
    _all_gather(every, mine, group=group)
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

    Cost: ``k`` all-gathers of ``world x (D + 2)`` int32 words (one per step; through
    shared memory between CPU ranks on one host) plus a few at setup. On the CPU each rank runs the single-process kernel's lazy evaluation on its
    shard (its own heap of upper bounds and its own exact subspace bound; state kept
    across steps by :func:`patchcore_fast.ops.coreset_shard_state`): per step it brings
    its own farthest row up to date and offers that, and only the offers travel. On CUDA
    each step is one plain pass over the shard (csrc/coreset_shard_step.h says why).

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

    state = ops.coreset_shard_state(shard, k)
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

    def over_gloo(mine: Tensor) -> Tensor:
        _all_gather(gathered, mine, group=group)
        return gathered.view(-1, width + 2)

    # Ranks on one host exchange the steps' records through shared memory (a few
    # microseconds against gloo's 0.3-0.4 ms a step; local_exchange.py), others over gloo.
    local = LocalExchange.open(width + 2, device, group, collective_timeout())
    exchange = local.all_gather if local is not None else over_gloo
    try:
        for step in range(k):
            candidates = exchange(record)  # the step's collective
            record = ops.coreset_shard_step(shard, candidates, offset, state, indices, step)
    finally:
        if local is not None:
            local.close()
    return indices


def all_gather_ints(values: Sequence[int], device: torch.device) -> list[list[int]]:
    """Every rank's list of ``len(values)`` integers (one all-gather), by rank."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    every = torch.empty(dist.get_world_size() * len(mine), dtype=torch.int64, device=device)
    _all_gather(every, mine)
    return every.view(dist.get_world_size(), len(mine)).cpu().tolist()



# ----- fit: the projected shard and the gathered bank -------------------------------------

def project_shard(sc: StreamingCoreset, launch: Launch, dim: int, counts: Sequence[int],
                  device: torch.device) -> Tensor:
    """This rank's rows of the projected bank, bit-identical to a one-process fit's.

    One process projects the bank in blocks of :data:`~patchcore_fast.coreset.
    PROJECTION_CHUNK` rows from row 0, and a GEMM's rounding can depend on how many rows it
    is given (measured with MKL: blocks of fewer than 12 rows round differently), so here
    too every block is the same global block, projected whole. Blocks inside this rank's
    rows are read back from its feature file; a block that straddles ranks is sent by each
    of its owners to all (one broadcast per part: at most ``world - 1`` straddling blocks,
    each at most 8,192 full-width rows) and projected by each owner, which keeps its part.

    Args:
        sc: this rank's rows, added in order, not projected (``project=False``).
        launch: this rank.
        dim: the embedding width D (the same on every rank).
        counts: rows of every rank, by rank.
        device: where the rows and the collectives live.

    Returns:
        Tensor[counts[rank], C] float32: global rows ``offset .. offset + n`` projected.
    """
    _, proj = coreset_start_and_projection(None, dim, sc.projection_dim, sc.seed)
    proj = proj.to(device) if proj is not None else None
    width = proj.shape[1] if proj is not None else dim
    ends = [sum(counts[:r + 1]) for r in range(len(counts))]
    starts = [e - c for e, c in zip(ends, counts)]
    lo, hi = starts[launch.rank], ends[launch.rank]
    out = torch.empty(hi - lo, width, dtype=torch.float32, device=device)
    chunk = PROJECTION_CHUNK
    for b0 in range(0, ends[-1], chunk):
        b1 = min(b0 + chunk, ends[-1])
        owners = [r for r in range(len(counts)) if max(starts[r], b0) < min(ends[r], b1)]
        if len(owners) == 1 and owners[0] != launch.rank:
            continue
        if len(owners) == 1:  # the whole block is this rank's
            rows = sc.gather(torch.arange(b0 - lo, b1 - lo))
            out[b0 - lo:b1 - lo] = project_rows(rows.float(), proj)
            continue
        # A straddling block: every rank takes part in the broadcasts (collectives).
        block = torch.empty(b1 - b0, dim, dtype=torch.float32, device=device)
        for r in owners:
            p0, p1 = max(starts[r], b0), min(ends[r], b1)
            if r == launch.rank:
                block[p0 - b0:p1 - b0] = sc.gather(torch.arange(p0 - lo, p1 - lo)).float()
            part = block[p0 - b0:p1 - b0]  # contiguous: a run of whole rows
            dist.broadcast(part, src=r)
        if launch.rank in owners:
            p0, p1 = max(lo, b0), min(hi, b1)
            out[p0 - lo:p1 - lo] = project_rows(block, proj)[p0 - b0:p1 - b0]
    return out


def gather_bank(sc: StreamingCoreset, idx: Tensor, launch: Launch, dim: int,
                counts: Sequence[int], device: torch.device) -> Tensor | None:
    """The full-width rows of the selected bank, on rank 0 (None elsewhere).

    Every rank holds the same selection ``idx``; each reads back the rows it owns, in
    selection order, and sends them to rank 0 (one gather, padded to the largest share),
    which puts each rank's rows at the positions of ``idx`` that fall in its range.

    Args:
        sc: this rank's rows.
        idx (Tensor[k] int64): the selection (global rows), the same on every rank.
        launch, dim, counts, device: as :func:`project_shard`.

    Returns:
        Tensor[k, D] float32 on rank 0 (``bank[idx]`` of the concatenated bank), else None.
    """
    bounds = torch.tensor([0] + [sum(counts[:r + 1]) for r in range(len(counts))])
    owner = torch.bucketize(idx.cpu(), bounds[1:], right=True)  # rank holding each row
    per_rank = torch.bincount(owner, minlength=len(counts))
    mine = (owner == launch.rank).nonzero()[:, 0]
    send = torch.zeros(int(per_rank.max()), dim, dtype=torch.float32, device=device)
    if len(mine):
        send[:len(mine)] = sc.gather(idx.cpu()[mine] - int(bounds[launch.rank])).float()
    recv = [torch.empty_like(send) for _ in counts] if launch.is_main else None
    dist.gather(send, recv, dst=0)
    if not launch.is_main:
        return None
    bank = torch.empty(len(idx), dim, dtype=torch.float32, device=device)
    for r, part in enumerate(recv):
        sel = (owner == r).nonzero()[:, 0].to(device)
        bank[sel] = part[:len(sel)]
    return bank


def rows_to_main(sc: StreamingCoreset, launch: Launch, dim: int, counts: Sequence[int],
                 device: torch.device, into: StreamingCoreset | None) -> None:
    """Every rank's full-width rows, in rank order, added to ``into`` on rank 0
    (collective; ``into`` is None on the other ranks).

    Rank 0 adds its own rows, then receives each other rank's in turn, in runs of
    :data:`~patchcore_fast.coreset.PROJECTION_CHUNK` rows (one send / receive pair per
    run): one run is in flight at a time, so rank 0's memory holds one run beside what
    ``into`` keeps (with its default temporary file: the projections only). The rows
    travel once, to rank 0 only: N x D float32 in all (bottle's 163,856 rows at 224 px and
    D = 1,024: 670 MB), the other ranks' share of it over the network.

    Args:
        sc: this rank's rows, added in order.
        launch, dim, counts, device: as :func:`project_shard`.
        into: rank 0's store of every row (it projects them as they come, in the global
            blocks from row 0: the one-process projection).
    """
    chunk = PROJECTION_CHUNK
    for r, count in enumerate(counts):
        if launch.rank not in (0, r):
            continue
        for a in range(0, count, chunk):
            b = min(a + chunk, count)
            if r == launch.rank:  # rank 0 reads its own rows; rank r sends its
                part = sc.gather(torch.arange(a, b)).float().to(device)
                if into is not None:
                    into.add(part)
                else:
                    dist.send(part.contiguous(), dst=0)
            else:
                part = torch.empty(b - a, dim, dtype=torch.float32, device=device)
                dist.recv(part, src=r)
                into.add(part)


def select_sharded(shard: Tensor, n: int, ratio: float, sc: StreamingCoreset, dim: int,
                   device: torch.device) -> Tensor:
    """The coreset of the whole bank from every rank's projected shard (collective).

    The same start row and count as :meth:`StreamingCoreset.select` for ``n`` rows, so
    the selection is the one-process selection.

    Returns:
        Tensor[k] int64 on ``device``, the same on every rank.
    """
    k = coreset_size(n, ratio)
    if k == n:
        return torch.arange(n, device=device)
    start, _ = coreset_start_and_projection(n, dim, sc.projection_dim, sc.seed)
    return greedy_coreset_sharded(shard, k, start)


class TrainingRows:
    """Every rank's training rows as one bank: the fit's coreset and its chosen rows.

    One process (a world of one): the :class:`~patchcore_fast.coreset.StreamingCoreset`
    itself, which projected its rows as they came (the global blocks from row 0) and runs
    the single-process kernel. Several ranks (collective: every rank builds it and calls
    :meth:`select` and :meth:`gather` in step): one all-gather of each rank's counts, the
    projection of this rank's rows in the same global blocks (:func:`project_shard`), the
    greedy steps on the shards (:func:`select_sharded`) and the chosen full-width rows
    gathered to rank 0 (:func:`gather_bank`). Either way the selection and the bank are
    one process's on all the images.

    Args:
        sc: this rank's rows, added in order (projected only in one process).
        launch: this rank.
        images: the images this rank embedded.
        grid: the feature grid of this rank's last batch, or None.
        device: where the rows and the collectives live.

    Raises:
        PatchCoreError: no rank read any image (every rank raises it).
    """

    def __init__(self, sc: StreamingCoreset, launch: Launch, images: int,
                 grid: tuple[int, int] | None, device: torch.device):
        self.sc, self.launch, self.device = sc, launch, device
        row = [sc.n, sc.dim or 0, images, *(grid or (0, 0))]
        table = [row] if launch.world == 1 else all_gather_ints(row, device)
        self.counts = [r[0] for r in table]     # rows of every rank, by rank
        self.rank_images = [r[2] for r in table]
        self.n, self.images = sum(self.counts), sum(self.rank_images)
        if self.n == 0:
            raise PatchCoreError("none of the training images could be read")
        self.dim = max(r[1] for r in table)
        self.grid = next(tuple(r[3:5]) for r in table if r[0])  # a rank that read images
        self.shard = None if launch.world == 1 else project_shard(
            sc, launch, self.dim, self.counts, device)

    def select(self, ratio: float, keep_projections: bool) -> Tensor:
        """The coreset at ``ratio`` (Tensor[k] int64 global rows, the same on every rank);
        ``keep_projections``: one process keeps its projected rows for another ratio."""
        if self.shard is None:
            return self.sc.select(ratio, keep_projections=keep_projections)
        return select_sharded(self.shard, self.n, ratio, self.sc, self.dim, self.device)

    def gather(self, idx: Tensor) -> Tensor | None:
        """The full-width rows ``idx`` (Tensor[k, D] float32) on rank 0, None elsewhere."""
        if self.shard is None:
            return self.sc.gather(idx)
        return gather_bank(self.sc, idx, self.launch, self.dim, self.counts, self.device)

    def everything(self, layout: "ImageRows") -> "tuple[StreamingCoreset, ImageRows] | None":
        """Every rank's rows and images as one process's, on rank 0 (None elsewhere): what
        the calibration needs (:func:`~patchcore_fast.verdict.calibrate`).

        One process: its own rows and ``layout``. Several (collective): the layouts
        (one gather) and the full-width rows (:func:`rows_to_main`) come to rank 0 in
        rank order, which is the one-process image order, into a new
        :class:`~patchcore_fast.coreset.StreamingCoreset` of this one's settings (a
        temporary file of N x D floats on rank 0 unless the fit is in memory), which
        projects them as one process does: its rows, projections and layout are the
        one-process fit's, so its calibration is too. The caller closes the store.

        Args:
            layout: this rank's images, rows counted from this rank's first.
        """
        if self.shard is None:
            return self.sc, layout
        launch, sc = self.launch, self.sc
        parts = [None] * launch.world if launch.is_main else None
        dist.gather_object(layout, parts, dst=0)
        into = StreamingCoreset(sc.ratio, sc.projection_dim, sc.seed, expected_rows=self.n,
                                temp_dir=sc.temp_dir, in_memory=sc.in_memory
                                ) if launch.is_main else None
        try:
            rows_to_main(sc, launch, self.dim, self.counts, self.device, into)
        except BaseException:
            if into is not None:
                into.close()
            raise
        if into is None:
            return None
        starts = [sum(self.counts[:r]) for r in range(launch.world)]
        return into, type(layout).joined(parts, starts)

    @property
    def record(self) -> dict:
        """The run's ranks for ``fit_stats`` (nothing in one process)."""
        if self.launch.world == 1:
            return {}
        return {"world_size": self.launch.world, "rank_images": self.rank_images,
                "rank_patches": self.counts}


# ----- score and evaluate: a sharded bank ---------------------------------------------------

class ShardedBank:
    """A memory bank split across the ranks (``--bank-shards``): each holds 1/world of it.

    Rank r keeps the contiguous rows ``[r M / R, (r + 1) M / R)``. Every rank calls
    :meth:`knn` and :meth:`__getitem__` (``bank[index]``) with the same arguments (the ranks
    score the same images in lockstep), so the collectives below match up.

    k nearest: each rank finds the k nearest rows of its shard with the kernel (exact
    distances, ascending, ties to the lower row), one all-gather brings every rank's list
    to every rank, and a stable sort of the concatenation by distance picks the k best.
    Why this equals :func:`patchcore_fast.ops.knn` on the whole bank: the kernel's
    distances are the direct-difference float32 distances, which do not depend on which
    other rows share the bank; the k nearest of the whole bank are among the union of
    each shard's k nearest; and the concatenation lists the ranks in row order, each
    sorted by (distance, row), so a stable sort by distance orders equal distances by the
    lower global row, the kernel's tie rule. Shards with fewer than k rows pad with
    (inf, M), which sort last.

    Args:
        bank (Tensor[M, D]): the whole bank (read from the model file on the host).
        rank, world: this rank and the number of ranks.
        device: where this rank's rows live.
    """

    def __init__(self, bank: Tensor, rank: int, world: int, device: torch.device):
        m = bank.shape[0]
        self.lo, self.hi = rank * m // world, (rank + 1) * m // world
        self.local = bank[self.lo:self.hi].float().to(device).contiguous()
        self.shape = torch.Size((m, bank.shape[1]))
        self.device = torch.device(device)

    def to(self, device) -> "ShardedBank":
        """The bank stays where its shard is (scoring moves the queries to it)."""
        return self

    def knn(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k nearest rows of the whole bank (collective: one all-gather of two tensors).

        Args:
            query (Tensor[Q, D]): the same rows on every rank.
            k: 1 <= k <= M.

        Returns:
            (Tensor[Q, k] float32, Tensor[Q, k] int64): as :func:`patchcore_fast.ops.knn`
            on the whole bank.
        """
        m = self.shape[0]
        if not 1 <= k <= m:
            raise ValueError(f"k should be between 1 and the bank size {m}, got {k}")
        query = query.float().to(self.device)
        q, world = query.shape[0], dist.get_world_size()
        d = torch.full((q, k), float("inf"), device=self.device)
        i = torch.full((q, k), m, dtype=torch.int64, device=self.device)
        kk = min(k, self.hi - self.lo)
        if kk and q:
            d[:, :kk], i[:, :kk] = ops.knn(query, self.local, kk)
            i[:, :kk] += self.lo
        all_d = torch.empty(world * q * k, device=self.device)
        all_i = torch.empty(world * q * k, dtype=torch.int64, device=self.device)
        _all_gather(all_d, d.reshape(-1))
        _all_gather(all_i, i.reshape(-1))
        # [R, Q, k] -> [Q, R k]: rank order is row order.
        all_d = all_d.view(world, q, k).permute(1, 0, 2).reshape(q, world * k)
        all_i = all_i.view(world, q, k).permute(1, 0, 2).reshape(q, world * k)
        order = torch.sort(all_d, dim=1, stable=True).indices[:, :k]
        return all_d.gather(1, order), all_i.gather(1, order)

    def __getitem__(self, index: Tensor) -> Tensor:
        """Bank rows by global index, on every rank (collective: one all-reduce).

        Each rank fills the rows it holds and leaves zeros elsewhere; the sum over ranks
        is exact (every row has exactly one non-zero contribution, and x + 0 = x).

        Args:
            index (Tensor[...] int64): global rows (the same on every rank).

        Returns:
            Tensor[..., D] float32.
        """
        index = index.to(self.device)
        out = torch.zeros(*index.shape, self.shape[1], device=self.device)
        mine = (index >= self.lo) & (index < self.hi)
        out[mine] = self.local[index[mine] - self.lo]
        dist.all_reduce(out)
        return out
