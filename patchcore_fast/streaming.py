"""Steps 6-7 in bounded memory: the coreset of a bank that is never held in memory.

The in-memory fit concatenates every training patch (N x D floats: 3.2 GB for 1,000
images at D = 1,024) before the coreset picks k of them. The selection itself only needs
the 128-d projection of each row (N x 128 floats, an eighth of that at D = 1,024), and the
bank needs the full-width rows of the k chosen patches only. :class:`StreamingCoreset`
therefore takes the patches batch by batch and

1. appends the full-width rows, as raw bytes, to an anonymous temporary file (unlinked
   from the start, so the operating system removes it even when the run is killed; it is
   read back with ``pread``, not mapped, so its pages count as page cache, not as the
   process's resident memory);
2. keeps the projection of each row: rows are gathered into blocks of
   :data:`~patchcore_fast.coreset.PROJECTION_CHUNK`, the same blocks and the same matrix
   product as :func:`~patchcore_fast.coreset.select_coreset`, so the projected bank, and
   with it the selection, is bit-identical to the in-memory path;
3. runs the greedy selection on the projections and reads back the chosen rows.

Peak memory: the projected bank (N x 128 float32, 400 MB per 1,000 images at 224 px),
one block of 8,192 full-width rows (32 MB at D = 1,024) and the backbone; it does not grow
with N x D. The temporary file needs N x D x 4 bytes of disk.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from . import ops
from .coreset import (PROJECTION_CHUNK, coreset_size, coreset_start_and_projection,
                      project_rows)
from .files import ArraySpool


class StreamingCoreset:
    """Greedy coreset over patches that arrive batch by batch.

    Args:
        ratio: fraction of rows kept, in (0, 1].
        projection_dim: width of the projection the selection runs on.
        seed: seeds the projection and the start row (as :func:`select_coreset`).
        expected_rows: an upper bound on N, if known (preallocates the projected bank so it
            is never copied while growing); more rows than this are still accepted.
        temp_dir: folder of the temporary feature file (default: the system's, $TMPDIR).

    Example:
        >>> with StreamingCoreset(0.01, 128, seed=0) as sc:
        ...     for patches in batches:          # Tensor[B, h * w, D]
        ...         sc.add(patches.reshape(-1, patches.shape[-1]))
        ...     bank = sc.bank()                  # Tensor[k, D]
    """

    def __init__(self, ratio: float, projection_dim: int = 128, seed: int = 0,
                 expected_rows: int | None = None, temp_dir: str | os.PathLike | None = None):
        coreset_size(1, ratio)  # validates the ratio
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.expected_rows = expected_rows
        self.temp_dir = temp_dir
        self.n = 0                              # rows added
        self.dim: int | None = None
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self._spool: ArraySpool | None = None   # the full-width rows, in bank order
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
        self._spool = ArraySpool((self.dim,), torch.empty(0, dtype=self.dtype).numpy().dtype,
                                 self.temp_dir, what="feature file")
        _, proj = coreset_start_and_projection(None, self.dim, self.projection_dim,
                                               self.seed)
        self._proj = proj.to(self.device) if proj is not None else None
        self._block = torch.empty(PROJECTION_CHUNK, self.dim, dtype=self.dtype,
                                  device=self.device)

    def add(self, rows: Tensor) -> None:
        """Take the next rows of the bank (in bank order).

        Args:
            rows (Tensor[n, D]): patch embeddings.
        """
        if rows.dim() != 2:
            raise ValueError(f"rows should be a 2d tensor [n, D], got {tuple(rows.shape)}")
        if self._spool is None:
            self._open(rows)
        if rows.shape[1] != self.dim or rows.dtype != self.dtype:
            raise ValueError(f"rows should be [n, {self.dim}] {self.dtype}, got "
                             f"{tuple(rows.shape)} {rows.dtype}")
        self._spool.append(rows.detach().to("cpu").contiguous().numpy())
        self.n += int(rows.shape[0])
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
        """Indices of the coreset rows, as :func:`select_coreset` gives on the whole bank.

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
        """Full-width rows of the bank, read back from the temporary file.

        Args:
            idx (Tensor[k] int64): row indices (any order, repeats allowed).

        Returns:
            Tensor[k, D] on the rows' device, ``rows[idx]`` of the concatenated bank.
        """
        idx_np = idx.detach().to("cpu").numpy().astype(np.int64)
        if idx_np.size and (idx_np.min() < 0 or idx_np.max() >= self.n):
            raise IndexError(f"row index out of range [0, {self.n})")
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
        self._extra = []

    def __enter__(self) -> "StreamingCoreset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
