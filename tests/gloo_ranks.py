"""What the distributed tests share: a free local port, gloo ranks run as processes, and
the command line run as torchrun's ranks would run it.

Each test's worker is ``worker(rank, world, port, *args, out_dir)``: it joins a gloo group
on ``tcp://127.0.0.1:port`` and saves its results to ``out_dir/rank{rank}.pt``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from child import child_env


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


# ----- the command line as torchrun ranks (the environment torchrun would set) ----------

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def cli_env(**extra) -> dict:
    """This process's environment without any launch variable of its own, one thread per
    process (two ranks on two cores), plus ``extra``."""
    env = child_env({k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES})
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def start_cli_ranks(argv: list[str], world: int, cwd: Path,
                    stderr=subprocess.PIPE) -> list[subprocess.Popen]:
    """``python -m patchcore_fast.cli argv`` as ``world`` ranks of one run on 127.0.0.1."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "patchcore_fast.cli", *argv],
                             env=cli_env(RANK=str(r), WORLD_SIZE=str(world),
                                         LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                         MASTER_PORT=port),
                             stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=cwd)
            for r in range(world)]


def wait_ranks(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(exit code, stderr) of each rank; past ``timeout`` all are killed and the test fails."""
    out, deadline = [], time.monotonic() + timeout
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"the distributed run did not end within {timeout:.0f} s")
        out.append((p.returncode, err))
    return out
