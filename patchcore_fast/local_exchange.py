"""The distributed coreset's per-step all-gather through shared memory, for ranks on one host.

The exact distributed coreset (:func:`patchcore_fast.sharded.greedy_coreset_sharded`)
exchanges one small record per rank per step (``D + 2`` int32 words), k times. Each step's
own work is tens of microseconds on the CPU, while a gloo all-gather of a few hundred bytes
between two processes on localhost costs 0.3-0.4 ms even on a quiet machine (a TCP round
through the kernel and gloo's pair protocol): at 10 % of bottle (16,385 steps) the
exchange, not the work, set the time (bench/RESULTS.md, "Distributed fit"). Ranks that
share a host exchange their records here instead, through one shared file in
``/dev/shm`` (as NCCL's shared-memory transport does within a node), which costs a few
microseconds a step; gloo still carries every other collective.

The protocol, per step s (1, 2, ...), on every rank: write its record into its row of
buffer ``s % 2``, then store ``s`` in its sequence word of that buffer (each on a cache
line of its own); wait until every rank's word holds ``s``; the buffer's rows are then
the gathered records, read in place (no copy). Two buffers suffice: a rank can write step
s + 2 into buffer ``s % 2`` only after every rank posted step s + 1, which each does only
after its step s is done with the records. The record is stored before its sequence word
and read after it; x86-64 keeps stores in order and loads in order (TSO), which is what
makes this correct without fences, so the exchange is used on x86-64 only (elsewhere, and
when the ranks are not all on one host, gloo carries the steps as before). A waiting rank
yields its core between looks (ranks may outnumber cores) and checks every few thousand
looks (milliseconds) that its peers are alive, so a rank that died fails the others at
once instead of leaving them waiting; the group's timeout bounds the wait otherwise.
"""

from __future__ import annotations

import mmap
import os
import platform
import socket
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

#: Bytes between two slots (each starts on its own cache line).
_ALIGN = 64
#: Looks at the sequence words between two checks of the peers and of the deadline.
_CHECK_EVERY = 4096
#: Set to 1 to carry the steps over gloo even when the ranks share a host (benchmarks).
DISABLE_VARIABLE = "PATCHCORE_FAST_NO_LOCAL_EXCHANGE"


def _host_id() -> str:
    """Which machine (and boot) this process runs on: ranks with equal ids share memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class LocalExchange:
    """All-gather of one int32 record per rank through a shared ``/dev/shm`` mapping.

    Make it with :meth:`open` (collective), use :meth:`all_gather` once per step on every
    rank, then :meth:`close`. The mapping: two buffers, each ``world`` sequence words (one
    cache line apart) then the ``world x words`` records, contiguous.
    """

    def __init__(self, path: str, rank: int, world: int, words: int, pids: list[int],
                 timeout_s: float):
        self.rank, self.world, self.words, self.pids = rank, world, words, pids
        self.timeout_s = timeout_s
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, self.size(world, words))
        finally:
            os.close(fd)
        head, buffer = self._layout(world, words)
        self.seq = np.ndarray((2, world), np.int64, self.map, 0, (buffer, _ALIGN))
        self.data = np.ndarray((2, world, words), np.int32, self.map, head,
                               (buffer, 4 * words, 4))
        self.records = [torch.from_numpy(self.data[b]) for b in range(2)]  # views
        self.step = 0

    @staticmethod
    def _layout(world: int, words: int) -> tuple[int, int]:
        """(bytes of a buffer's sequence words, bytes of a buffer), cache-line aligned."""
        head = world * _ALIGN
        return head, head + -(-(4 * world * words) // _ALIGN) * _ALIGN

    @classmethod
    def size(cls, world: int, words: int) -> int:
        """Bytes of the shared file."""
        return 2 * cls._layout(world, words)[1]

    @classmethod
    def open(cls, words: int, device: torch.device, group=None,
             timeout_s: float = 1800.0) -> "LocalExchange | None":
        """The exchange for ``words``-word records, or None where gloo must carry them.

        Collective over ``group``: every rank gets an exchange, or every rank None (CUDA
        tensors, a world of one, not x86-64, ranks on several hosts, no ``/dev/shm``, or
        :data:`DISABLE_VARIABLE` set).
        """
        world = dist.get_world_size(group)
        if (device.type != "cpu" or world < 2 or os.environ.get(DISABLE_VARIABLE) == "1"
                or platform.machine().lower() not in ("x86_64", "amd64")):
            return None
        usable = os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, (_host_id(), os.getpid(), usable), group=group)
        hosts, pids, ok = zip(*everyone)
        # Ranks in other PID namespaces (containers sharing a hostname) cannot watch each
        # other: every rank must see every peer's process.
        seen = all(_alive(p) for p in pids)
        flags = torch.tensor([int(len(set(hosts)) == 1 and all(ok) and seen)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
        if not flags.item():
            return None
        rank = dist.get_rank(group)
        name = [None]
        if rank == 0:
            fd, path = tempfile.mkstemp(prefix="patchcore-fast-exchange-", dir="/dev/shm")
            os.ftruncate(fd, cls.size(world, words))  # zero-filled: every sequence word 0
            os.close(fd)
            name = [path]
        dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0) if group else 0,
                                   group=group)
        try:
            exchange = cls(name[0], rank, world, words, list(pids), timeout_s)
        finally:
            dist.barrier(group=group)  # every rank has mapped it (or failed): the name goes
            if rank == 0:
                os.unlink(name[0])
        return exchange

    def all_gather(self, record: Tensor) -> Tensor:
        """Every rank's ``record`` (int32[words]): int32[world, words] by rank, a view of
        the shared buffer valid until the next call but one (so until this rank's next
        step is done with it)."""
        self.step += 1
        s, b = self.step, self.step % 2
        self.data[b, self.rank] = record.numpy()
        self.seq[b, self.rank] = s  # after the record: a peer that sees s sees the record
        seq = self.seq[b]
        looks, deadline = 0, None
        while not (seq >= s).all():
            os.sched_yield()
            looks += 1
            if looks % _CHECK_EVERY == 0:
                self._check_peers(s, deadline := deadline or time.monotonic() + self.timeout_s)
        return self.records[b]

    def _check_peers(self, step: int, deadline: float) -> None:
        late = [r for r in range(self.world) if self.seq[step % 2, r] < step]
        dead = [r for r in late if not _alive(self.pids[r])]
        if dead:
            raise RuntimeError(f"peer rank {dead[0]} (pid {self.pids[dead[0]]}) stopped "
                               f"during the coreset's exchange (step {step})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the coreset's exchange timed out after {self.timeout_s:.0f} s "
                               f"waiting for rank {late[0]} (step {step})")

    def close(self) -> None:
        """Unmap the shared file (its name is gone since :meth:`open`)."""
        del self.seq, self.data, self.records
        self.map.close()
