"""The distributed coreset's shared-memory exchange (patchcore_fast/local_exchange.py):
the same records as gloo's all-gather, the same selection either way, and a peer that
dies fails the others at once instead of leaving them waiting."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from gloo_ranks import spawn_ranks

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not os.path.isdir("/dev/shm"),
    reason="the shared-memory exchange runs on x86-64 Linux only")


def _join(rank: int, world: int, port: int):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    return dist


def _records(rank: int, world: int, port: int, steps: int, out_dir: str) -> None:
    """Every step's gathered records through the exchange and through gloo, and the
    selection of the sharded coreset with each."""
    dist = _join(rank, world, port)
    from patchcore_fast.local_exchange import DISABLE_VARIABLE, LocalExchange
    from patchcore_fast.sharded import greedy_coreset_sharded

    try:
        words = 7
        local = LocalExchange.open(words, torch.device("cpu"))
        assert local is not None, "the ranks share this host: the exchange should open"
        got, want = [], []
        for s in range(steps):
            # Each rank's record differs per rank and per step (and steps alternate
            # buffers): any mix-up of slots or steps shows.
            record = torch.arange(words, dtype=torch.int32) * 1000 + rank * 100 + s
            a = local.all_gather(record).clone()
            b = torch.empty(world * words, dtype=torch.int32)
            dist.all_gather_into_tensor(b, record)
            got.append(a.view(-1))
            want.append(b)
        local.close()
        g = torch.Generator().manual_seed(3)
        x = torch.randn(3000, 128, generator=g)
        bounds = [0, 1300, 3000][rank:rank + 2]
        shm = greedy_coreset_sharded(x[bounds[0]:bounds[1]], 400, 17)
        os.environ[DISABLE_VARIABLE] = "1"
        over_gloo = greedy_coreset_sharded(x[bounds[0]:bounds[1]], 400, 17)
        torch.save((got, want, shm, over_gloo), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_exchange_equals_gloo_all_gather_and_the_selection(tmp_path):
    import patchcore_fast

    results = spawn_ranks(_records, 2, tmp_path, 50, timeout_s=240,
                          what="shared-memory exchange")
    for got, want, shm, over_gloo in results:
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(shm, over_gloo)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(3000, 128, generator=g)
        assert torch.equal(shm, patchcore_fast.greedy_coreset(x, 400, 17))
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("patchcore-fast-exchange-")]


def _one_dies(rank: int, world: int, port: int, out_dir: str) -> None:
    import time

    _join(rank, world, port)
    from patchcore_fast.local_exchange import LocalExchange

    local = LocalExchange.open(3, torch.device("cpu"), timeout_s=120)
    local.all_gather(torch.zeros(3, dtype=torch.int32))
    if rank == 1:
        os._exit(3)  # dies between two steps, as a killed rank would
    t0 = time.monotonic()
    try:
        local.all_gather(torch.zeros(3, dtype=torch.int32))
        message = "no error"
    except RuntimeError as exc:
        message = str(exc)
    torch.save((message, time.monotonic() - t0), f"{out_dir}/rank{rank}.pt")
    os._exit(0)


def test_a_dead_peer_fails_the_others_at_once(tmp_path):
    import torch.multiprocessing as mp

    from gloo_ranks import free_port

    ctx = mp.start_processes(_one_dies, args=(2, free_port(), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(120)
    assert [p.exitcode for p in ctx.processes] == [0, 3]
    message, waited = torch.load(tmp_path / "rank0.pt")
    assert "peer rank 1" in message and "stopped" in message, message
    assert waited < 30, waited  # not the 120 s timeout: the dead peer was noticed
