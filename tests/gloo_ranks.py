"""What the distributed tests share: a free local port, and gloo ranks run as processes.

Each test's worker is ``worker(rank, world, port, *args, out_dir)``: it joins a gloo group
on ``tcp://127.0.0.1:port`` and saves its results to ``out_dir/rank{rank}.pt``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable

import pytest
import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the rendezvous of a test)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable, world: int, out_dir: Path, *args, timeout_s: float,
                what: str) -> list:
    """Run ``world`` ranks of ``worker`` (spawned processes) and load what each saved.

    A run past ``timeout_s`` kills the ranks and fails the test naming ``what``: a hung
    collective must not hang the suite.
    """
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(world, free_port(), *args, str(out_dir)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish within {timeout_s:.0f} s")
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
