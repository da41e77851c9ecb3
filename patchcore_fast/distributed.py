"""PatchCore over ``torch.distributed`` (issue #14): the launch, the sharded coreset, the fit.

- Launch: :func:`launch_from_environment` reads what ``torchrun`` sets, :func:`init` joins
  the group (NCCL on CUDA, gloo on the CPU, a timeout on every collective).
- The fit (:meth:`patchcore_fast.model.PatchCore._fit` calls these): each rank embeds its
  contiguous share of the images (:meth:`Launch.share`), :func:`project_shard` projects its
  rows in the one-process fit's global blocks, :func:`select_sharded` runs the coreset
  below, :func:`gather_bank` brings the chosen full-width rows to rank 0.
- Score and evaluate (:mod:`patchcore_fast.evaluation` calls these): each rank scores its
  contiguous share of the images and writes their overlays; each phase ends with one
  :func:`exchange` (answers or errors of every rank), after which rank 0 writes the merged
  files. With ``--bank-shards`` the bank is split instead (:class:`ShardedBank`).

Exact greedy k-center coreset: each rank holds a shard.

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

import datetime
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops, reference
from .errors import PatchCoreError, first_line, os_error_text
from .coreset import (PROJECTION_CHUNK, StreamingCoreset, coreset_size,
                      coreset_start_and_projection, project_rows)


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

    Cost: ``k`` all-gathers of ``world x (D + 2)`` int32 words (one per step) plus one at
    setup. On the CPU each rank runs the single-process kernel's lazy evaluation on its
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
    candidates = gathered.view(-1, width + 2)
    for step in range(k):
        _all_gather(gathered, record, group=group)  # the step's collective
        record = ops.coreset_shard_step(shard, candidates, offset, state, indices, step)
    return indices


# ----- launch: the torchrun environment ---------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """This process's place in a distributed run (``torchrun`` sets the variables).

    Attributes:
        rank: global rank, 0 .. world - 1 (rank 0 prints and writes the summary outputs).
        world: number of processes.
        local_rank: rank on this machine (the GPU it uses).
    """

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence) -> list:
        """This rank's contiguous share of ``items`` (rank order = item order).

        Contiguous blocks, sizes differing by at most one, so the concatenation of the
        shares in rank order is ``items``: rank r's patches are the rows of the bank after
        those of ranks 0 .. r-1, as :func:`greedy_coreset_sharded` expects.
        """
        n = len(items)
        return list(items[self.rank * n // self.world:(self.rank + 1) * n // self.world])


#: Variables torchrun (and ``torch.distributed.run``) sets in every process it starts.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_from_environment(environ=os.environ) -> Launch | None:
    """The torchrun environment, or None when this process was started on its own.

    Raises:
        ValueError: some of the variables are set but not all, or they are not integers.
    """
    present = [v for v in LAUNCH_VARIABLES if v in environ]
    if not present:
        return None
    missing = [v for v in LAUNCH_VARIABLES if v not in environ]
    if missing:
        raise ValueError(f"the distributed launch variables are incomplete: {', '.join(present)} "
                         f"set but not {', '.join(missing)} (start the run with torchrun)")
    try:
        rank, world, local = (int(environ[v]) for v in LAUNCH_VARIABLES[:3])
    except ValueError:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK should be integers, got "
                         f"{environ['RANK']!r}, {environ['WORLD_SIZE']!r}, "
                         f"{environ['LOCAL_RANK']!r}") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise ValueError(f"RANK {rank} should be in [0, WORLD_SIZE {world})")
    return Launch(rank, world, local)


def init(launch: Launch, device: torch.device, timeout_s: float) -> None:
    """Join the process group: NCCL when the model runs on CUDA, gloo on the CPU.

    On CUDA each process takes the GPU of its local rank (``torch.cuda.set_device``), so
    ``cuda`` in the model's settings means that GPU and the saved settings stay the same
    as a one-process run's. Every collective then fails after ``timeout_s`` instead of
    waiting forever for a rank that hangs.
    """
    if device.type == "cuda":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            rank=launch.rank, world_size=launch.world,
                            timeout=datetime.timedelta(seconds=timeout_s))


#: What a failed collective raises: DistError (NCCL, timeouts) or, from gloo, a plain
#: RuntimeError ("Connection closed by peer" when a rank died).
DistError = (dist.DistError, RuntimeError)
_PEER_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")


def describe_failure(exc: BaseException) -> str:
    """One line for an error of a distributed run: which kind, and torch's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if text.startswith("[") and "] " in text:  # gloo's "[.../pair.cc:561] " source prefix
        text = text.split("] ", 1)[1]
    text = text.split(". This is typically", 1)[0][:240]
    if isinstance(exc, dist.DistError) or any(w in text.lower() for w in _PEER_WORDS):
        return f"the distributed run failed: another process stopped or a collective timed " \
               f"out ({text})"
    return f"the distributed run failed: {type(exc).__name__}: {text}"


def finish() -> None:
    """Leave the process group (when in one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch_for(verb: str, environ=os.environ) -> Launch | None:
    """The launch a command runs under: None for one process (no torchrun, a world of one,
    or ``demo-data``, which every rank would write alike). Raises ValueError as
    :func:`launch_from_environment`."""
    launch = launch_from_environment(environ)
    return None if launch is None or launch.world == 1 or verb == "demo-data" else launch


def run(launch: Launch | None, verb: str, device, timeout_s: float, call):
    """``call()`` on its own, or as one rank of ``launch`` inside its process group.

    Args:
        launch: from :func:`launch_for`; None runs ``call`` as it is.
        verb: the command (``fit``, ``score`` and ``evaluate`` run distributed; ``study``
            is refused with one line: its fits at several ratios would need the test
            features of every rank at every ratio).
        device: a callable giving the model's device, which picks NCCL or gloo.
        timeout_s: seconds a collective waits before the run fails (positive: the command
            line checks ``--dist-timeout``).
        call: the command itself.
    """
    if launch is None:
        return call()
    if verb not in ("fit", "score", "evaluate"):
        raise PatchCoreError(f"{verb} does not run under torchrun yet; run it as one process")
    init(launch, device(), timeout_s)
    try:
        return call()
    finally:
        finish()


def current() -> Launch | None:
    """The running process group as a :class:`Launch`, or None outside one (or world 1)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return Launch(dist.get_rank(), dist.get_world_size(),
                  int(os.environ.get("LOCAL_RANK", dist.get_rank())))


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


# ----- score and evaluate: one exchange per phase, a sharded bank ----------------------------

def is_main() -> bool:
    """True outside a distributed run and on its rank 0 (the rank that writes the merged
    outputs)."""
    launch = current()
    return launch is None or launch.is_main


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return os_error_text(exc)
    text = first_line(exc)
    # --on-error fail raises the skip warning itself ("skipping FILE: why").
    return "cannot use " + text.removeprefix("skipping ") if isinstance(exc, Warning) else text


def exchange(work) -> list:
    """``work()`` on every rank, then every rank's answer on every rank (one collective).

    The phases of a distributed score or evaluate end here, so a rank that fails still
    takes part in the collective: it sends its error instead of its answer, raises its own
    exception, and every other rank raises one line naming it. No rank waits for a
    collective that a failed rank will never join, and no merged file is written after a
    failure (the merged files are written after the last exchange). A rank that dies
    instead (killed) makes the collective fail on the others (:data:`DistError`).

    Args:
        work: this rank's part of the phase; its answer must pickle.

    Returns:
        the answers of every rank, by rank.
    """
    try:
        mine, error = work(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the exchange
        mine, error = None, exc
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, (mine, None if error is None else _one_line(error)))
    if error is not None:
        raise error
    failed = [(r, why) for r, (_, why) in enumerate(every) if why is not None]
    if failed:
        r, why = failed[0]
        raise PatchCoreError(f"rank {r} of {len(every)} failed ({why}); nothing was merged")
    return [answer for answer, _ in every]


#: ``--bank-shards`` (score, evaluate) in the command's help.
BANK_SHARDS_HELP = ("under torchrun: split the memory bank across the processes (each holds "
                    "1/N of it on its device and every process embeds every image; for banks "
                    "that do not fit one device; same scores)")


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
