"""Step 7 of the method: the greedy coreset that shrinks the memory bank.

PatchCore keeps a subset of the training patches that covers all of them as well as
possible: greedy k-center selection (start at one point, repeatedly add the point farthest
from the chosen ones), which is a 2-approximation of the minimax covering. To make each
step cheap, distances are taken on a random Gaussian projection to ``projection_dim``
(128) dimensions, which preserves pairwise distances up to a small factor
(Johnson-Lindenstrauss); the bank then keeps the *full-width* rows of the chosen patches.

The selection streams (:class:`StreamingCoreset`): the full bank (N x D floats: 3.2 GB for
1,000 images at D = 1,024) need never be in memory at once; :func:`select_coreset` is the
same code given the whole bank.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from . import ops
from .files import ArraySpool


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
#: rounding can depend on the block it is given, so the bank is always projected in these
#: row blocks, in order, however its rows arrive (a seed always selects the same rows).
PROJECTION_CHUNK = 8192

#: The start draw consumes the same random words for every N below this (measured; torch
#: draws more for larger ranges), so the projection drawn after it does not depend on N
#: and the selection can draw it before N is known, with the very values that drawing it
#: after the start of range N gives (how models were fitted before the selection
#: streamed: their seeds still select the same rows). 2**28 patches are 342,000 images of
#: 784 patches; above it the projection is still a valid, seeded Johnson-Lindenstrauss map.
START_DRAW_LIMIT = 2 ** 28


def coreset_start_and_projection(n: int | None, dim_in: int, projection_dim: int,
                                 seed: int) -> tuple[int | None, Tensor | None]:
    """The seeded start row and Gaussian projection of the selection.

    The generator draws the start index first, then the projection. For N < 2**31 the
    start draw consumes a fixed number of random words, so the projection is the same for
    every N below :data:`START_DRAW_LIMIT`: :class:`StreamingCoreset` calls this with
    ``n=None`` before it knows N, and with N for the start once every row is in.

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
    """Indices of the coreset rows of a bank held in memory.

    The streaming selection (:class:`StreamingCoreset`) given the whole bank as one batch:
    there is one selection code path, so a seed selects the same rows in memory and
    streamed.

    Args:
        features (Tensor[N, D]): all training patch embeddings.
        ratio: fraction of rows to keep, in (0, 1]; 1 keeps every row (no selection).
        projection_dim: width of the random projection the selection runs on; when D is
            not larger, the selection runs on the features themselves.
        seed: seeds the projection and the start point.

    Returns:
        Tensor[k] int64 (on ``features``' device): selected rows in selection order.
    """
    with StreamingCoreset(ratio, projection_dim, seed, in_memory=True) as sc:
        sc.add(features)
        return sc.select()


def continue_coreset(chosen: Tensor, new: Tensor, k: int, start: Tensor | None = None
                     ) -> Tensor:
    """Greedy k-center selection continued over new points, the chosen rows kept.

    The rows of ``chosen`` are centres already selected (a fitted model's bank, in the
    selection's projection). Every new point starts at its squared distance to its
    nearest chosen centre, exactly where the greedy loop would stand had the new points
    been there all along with those centres chosen; the selection then goes on among the
    new points only: take the farthest, lower every new point's distance with it, k times.
    Each step is one :func:`patchcore_fast.ops.coreset_shard_step` over the new points
    (the distributed coreset's step, here with one rank), its state started at those
    distances (``coreset_shard_state(start=)``): on the CPU its lazy evaluation, which
    computes a point's distance to a new centre only when the point could be the farthest
    (the plain pass, every distance of every step, on CUDA). So the cost is one k-NN pass
    of the new points against the chosen rows plus the k steps over the new points: it
    grows with the new points, and only through that first pass with the bank.

    Args:
        chosen (Tensor[M, C]): the centres already selected (M >= 1).
        new (Tensor[N, C]): the new points, same width and device.
        k: number of new centres, 0 <= k <= N.
        start (Tensor[N] | None): each new point's squared distance to its nearest chosen
            centre, if already known (:func:`distance_to_chosen`): several continuations
            over subsets of the same new points (the folds of an update's calibration)
            then share that first pass.

    Returns:
        Tensor[k] int64: rows of ``new`` in selection order.
    """
    from .reference import pack_keys

    new = new.float().contiguous()
    k = int(k)
    if not 0 <= k <= new.shape[0]:
        raise ValueError(f"k should be between 0 and the number of new rows {new.shape[0]}, "
                         f"got {k}")
    indices = torch.empty(k, dtype=torch.int64, device=new.device)
    if k == 0:
        return indices
    # Read only (the state below gets a copy).
    min_d = distance_to_chosen(chosen, new) if start is None else start.float().contiguous()
    state = ops.coreset_shard_state(new, k, start=min_d)
    # Step 0's record names the farthest new point (the lowest index on ties, as the
    # kernel's packed keys order them).
    first = int(torch.argmax(min_d))
    record = torch.zeros(new.shape[1] + 2, dtype=torch.int32, device=new.device)
    record[:2] = pack_keys(min_d[first:first + 1], torch.tensor([first], device=new.device)
                           ).view(torch.int32)
    record[2:] = new[first].view(torch.int32)
    for step in range(k):
        record = ops.coreset_shard_step(new, record.view(1, -1), 0, state, indices, step)
    return indices


def distance_to_chosen(chosen: Tensor, new: Tensor) -> Tensor:
    """Tensor[N]: each new point's squared distance to its nearest chosen centre (the
    starting state of :func:`continue_coreset`)."""
    return ops.knn(new.float().contiguous(), chosen.float(), 1)[0][:, 0].square().contiguous()


class StreamingCoreset:
    """Greedy coreset over patches that arrive batch by batch: the one selection path.

    The selection only needs the 128-d projection of each row (N x 128 floats, an eighth of
    the bank at D = 1,024); the bank needs the full-width rows of the k chosen patches only.
    So the rows are taken batch by batch and

    1. kept as they are: in an anonymous temporary file (default; unlinked from the start,
       so the operating system removes it even when the run is killed, and read back with
       ``pread``, so its pages are page cache, not the process's resident memory), or in
       memory (``in_memory=True``, the reference's N x D floats);
    2. gathered into blocks of :data:`PROJECTION_CHUNK` rows, each projected with one matrix
       product (so the projected bank does not depend on how the rows were batched);
    3. the greedy selection runs on the projections (:meth:`select`) and the chosen rows are
       read back (:meth:`gather`). :func:`select_coreset` is this class with one batch.

    Peak memory when streaming: the projected bank (N x 128 float32, 400 MB per 1,000
    images at 224 px), one block of 8,192 full-width rows (32 MB at D = 1,024) and the
    backbone; it does not grow with N x D. The temporary file needs N x D x 4 bytes of disk.

    Args:
        ratio: fraction of rows kept, in (0, 1].
        projection_dim: width of the projection the selection runs on.
        seed: seeds the projection and the start row.
        expected_rows: an upper bound on N, if known (preallocates the projected bank so it
            is never copied while growing); more rows than this are still accepted.
        temp_dir: folder of the temporary feature file (default: the system's, $TMPDIR).
        in_memory: keep the full-width rows in memory (on their device) instead of a file.
        project: project the rows as they arrive (default); False only keeps them, for a
            caller that projects them itself (the distributed fit, whose blocks are the
            global bank's: :func:`patchcore_fast.sharded.project_shard`).

    Example:
        >>> with StreamingCoreset(0.01, 128, seed=0) as sc:
        ...     for patches in batches:          # Tensor[B, h * w, D]
        ...         sc.add(patches.reshape(-1, patches.shape[-1]))
        ...     bank, idx = sc.bank()            # Tensor[k, D], Tensor[k]
    """

    def __init__(self, ratio: float, projection_dim: int = 128, seed: int = 0,
                 expected_rows: int | None = None, temp_dir: str | os.PathLike | None = None,
                 in_memory: bool = False, project: bool = True):
        coreset_size(1, ratio)  # validates the ratio
        self.project = project
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.expected_rows = expected_rows
        self.temp_dir = temp_dir
        self.in_memory = in_memory
        self.n = 0                              # rows added
        self.dim: int | None = None
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self._spool: ArraySpool | None = None   # the full-width rows, in bank order (file)
        self._rows: list[Tensor] = []           # ... or in memory
        self._proj: Tensor | None = None        # [D, C] on the device
        self._block: Tensor | None = None       # [PROJECTION_CHUNK, D] rows awaiting projection
        self._fill = 0
        self._reduced: Tensor | None = None     # [capacity, C] float32 projected rows
        self._reduced_rows = 0
        self._extra: list[Tensor] = []          # projected blocks beyond the capacity
        self._freed = False                     # select() has dropped the projections

    # ----- pass 1 -------------------------------------------------------------------

    def _open(self, rows: Tensor) -> None:
        self.dim, self.dtype, self.device = int(rows.shape[1]), rows.dtype, rows.device
        if not self.in_memory:
            self._spool = ArraySpool((self.dim,), torch.empty(0, dtype=self.dtype).numpy().dtype,
                                     self.temp_dir, what="feature file")
        _, proj = coreset_start_and_projection(None, self.dim, self.projection_dim,
                                               self.seed)
        self._proj = proj.to(self.device) if proj is not None else None
        self._block = torch.empty(PROJECTION_CHUNK, self.dim, dtype=self.dtype,
                                  device=self.device) if self.project else None

    def add(self, rows: Tensor) -> None:
        """Take the next rows of the bank (in bank order).

        Args:
            rows (Tensor[n, D]): patch embeddings (kept by reference when ``in_memory``).
        """
        if rows.dim() != 2:
            raise ValueError(f"rows should be a 2d tensor [n, D], got {tuple(rows.shape)}")
        if self.dim is None:
            self._open(rows)
        if rows.shape[1] != self.dim or rows.dtype != self.dtype:
            raise ValueError(f"rows should be [n, {self.dim}] {self.dtype}, got "
                             f"{tuple(rows.shape)} {rows.dtype}")
        if self.in_memory:
            self._rows.append(rows.detach())
        else:
            self._spool.append(rows.detach().to("cpu").contiguous().numpy())
        self.n += int(rows.shape[0])
        if not self.project:
            return
        done = 0
        while done < rows.shape[0]:
            take = min(PROJECTION_CHUNK - self._fill, rows.shape[0] - done)
            self._block[self._fill:self._fill + take].copy_(rows[done:done + take])
            self._fill += take
            done += take
            if self._fill == PROJECTION_CHUNK:
                self._project_block()

    def _project_block(self) -> None:
        if self._fill == 0:
            return
        reduced = project_rows(self._block[:self._fill], self._proj)
        if self._proj is None and self.dtype == torch.float32:
            reduced = reduced.clone()  # .float() was a view of the block, reused next
        self._fill = 0
        if self._reduced is None and self.expected_rows:
            self._reduced = torch.empty(self.expected_rows, reduced.shape[1],
                                        dtype=torch.float32, device=self.device)
        if self._reduced is not None and self._reduced_rows + len(reduced) <= len(self._reduced):
            self._reduced[self._reduced_rows:self._reduced_rows + len(reduced)] = reduced
            self._reduced_rows += len(reduced)
        else:
            self._extra.append(reduced)

    # ----- selection and gathering ------------------------------------------------------

    def projected(self) -> Tensor:
        """The projected bank, Tensor[N, C] float32 (after the last :meth:`add`)."""
        if self._freed:
            raise RuntimeError("the projections were freed by select(); select with "
                               "keep_projections=True to select again")
        self._project_block()
        self._block = None  # the last block is projected; free its memory
        parts = [] if self._reduced is None else [self._reduced[:self._reduced_rows]]
        parts += self._extra
        if len(parts) == 1:
            return parts[0]
        out = torch.cat(parts)
        self._reduced, self._reduced_rows, self._extra = out, len(out), []
        return out

    def select(self, ratio: float | None = None, keep_projections: bool = False) -> Tensor:
        """Indices of the coreset rows of everything added so far.

        Args:
            ratio: fraction kept (default: the one given at construction).
            keep_projections: keep the projected bank for another selection (at another
                ratio); by default it is freed, as the rows are about to be read back.

        Returns:
            Tensor[k] int64 on the rows' device, in selection order.
        """
        if self.n == 0:
            raise ValueError("no rows were added")
        k = coreset_size(self.n, self.ratio if ratio is None else ratio)
        if k == self.n:
            idx = torch.arange(self.n, device=self.device)
        else:
            start, _ = coreset_start_and_projection(self.n, self.dim, self.projection_dim,
                                                    self.seed)
            idx = ops.greedy_coreset(self.projected(), k, start)
        if not keep_projections:
            self._reduced, self._extra, self._freed = None, [], True
        return idx

    def gather(self, idx: Tensor) -> Tensor:
        """Full-width rows of the bank, from memory or read back from the temporary file.

        Args:
            idx (Tensor[k] int64): row indices (any order, repeats allowed).

        Returns:
            Tensor[k, D] on the rows' device, ``rows[idx]`` of the concatenated bank.
        """
        idx_np = idx.detach().to("cpu").numpy().astype(np.int64)
        if idx_np.size and (idx_np.min() < 0 or idx_np.max() >= self.n):
            raise IndexError(f"row index out of range [0, {self.n})")
        if self.in_memory:
            # The reference's way: the whole bank, then its rows (as before the one path;
            # tests/test_memory.py compares the streaming peak with this one).
            return torch.cat(self._rows)[idx.to(self.device, torch.int64)]
        uniq, inverse = np.unique(idx_np, return_inverse=True)
        rows = np.empty((len(uniq), self.dim), dtype=self._spool.dtype)
        # Read runs of consecutive rows with one pread each (all rows: one sequential read).
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(uniq)]):
            self._spool.read(int(uniq[lo]), int(uniq[hi - 1]) + 1, out=rows[lo:hi])
        out = torch.from_numpy(rows)[torch.from_numpy(inverse.reshape(-1))]
        return out.to(self.device)

    def bank(self) -> tuple[Tensor, Tensor]:
        """Select the coreset and gather its rows.

        Returns:
            (Tensor[k, D] bank rows in selection order, Tensor[k] int64 their indices).
        """
        idx = self.select()
        return self.gather(idx).contiguous(), idx

    # ----- clean-up -------------------------------------------------------------------

    def close(self) -> None:
        """Remove the temporary file and free the buffers (idempotent)."""
        if self._spool is not None:
            self._spool.close()
        self._block = self._reduced = None
        self._extra, self._rows = [], []

    def __enter__(self) -> "StreamingCoreset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
