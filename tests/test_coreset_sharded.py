"""Tests of the sharded coreset: the threaded CPU kernel, the per-shard step op and the
distributed selection over torch.distributed (gloo, 2 processes started by the test).

The three share one distance routine (csrc/cpu/sqdist.h: a fixed summation order), so
their selections must equal the single-threaded kernel's index for index, ties included,
whatever the thread count or the split of the rows into shards.
"""

from __future__ import annotations


import pytest
import torch

import patchcore_fast
from patchcore_fast import ops, reference

from gloo_ranks import spawn_ranks

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STEP_OP = torch.ops.patchcore_fast.coreset_shard_step.default


# ----------------------------------------------------------------------------- data

def _gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _duplicates(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Few distinct rows, each repeated many times: exact ties, then all-zero distances."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(max(1, n // 10), d, generator=g)
    return base[torch.randint(0, base.shape[0], (n,), generator=g)]


def _grid(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Integer grid points: many exactly equal distances (ties broken by the index)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (n, d), generator=g).float()


DATA = {"gaussian": _gaussian, "duplicates": _duplicates, "grid": _grid}


def _single_thread(x: torch.Tensor, k: int, start: int) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return patchcore_fast.greedy_coreset(x, k, start)
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- threads

@pytest.mark.parametrize("kind", sorted(DATA))
@pytest.mark.parametrize("threads", [2, 3, 4, 7])
def test_threaded_selection_equals_single_threaded(kind, threads):
    # 40,000 rows: enough for 7 shards of >= 4,096 rows (the kernel's minimum per thread),
    # so every thread count here really runs that many shards.
    x = DATA[kind](40_000, 16, seed=threads)
    want = _single_thread(x, 600, 3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = patchcore_fast.greedy_coreset(x, 600, 3)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)


def test_threaded_k_equals_n_is_the_single_threaded_permutation():
    x = _duplicates(9000, 5, seed=1)  # 2 shards; ends with thousands of zero keys
    want = _single_thread(x, 9000, 0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = patchcore_fast.greedy_coreset(x, 9000, 0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)
    assert torch.equal(got.sort().values, torch.arange(9000))


# ----------------------------------------------------------------------------- step op

def _simulate(x: torch.Tensor, bounds: list[int], k: int, start: int, step_fn,
              device: str = "cpu") -> torch.Tensor:
    """The distributed loop in one process: shards x[bounds[r]:bounds[r+1]], the
    all-gather replaced by a stack of the records."""
    x = x.to(device)
    shards = [x[a:b].contiguous() for a, b in zip(bounds[:-1], bounds[1:])]
    d = x.shape[1]
    mins = [torch.full((s.shape[0],), float("inf"), device=device) for s in shards]
    outs = [torch.empty(k, dtype=torch.int64, device=device) for _ in shards]
    records = []
    for r, s in enumerate(shards):
        rec = torch.zeros(d + 2, dtype=torch.int32, device=device)
        if bounds[r] <= start < bounds[r + 1]:
            rec[:2] = reference.pack_keys(torch.tensor([float("inf")]),
                                          torch.tensor([start])).view(torch.int32)
            rec[2:] = s[start - bounds[r]].view(torch.int32)
        records.append(rec)
    for t in range(k):
        cands = torch.stack(records)
        records = [step_fn(s, cands, bounds[r], mins[r], outs[r], t)
                   for r, s in enumerate(shards)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), "ranks disagree on the selection"
    return outs[0].cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(DATA))
@pytest.mark.parametrize("bounds", [[0, 300], [0, 1, 300], [0, 137, 200, 300], [0, 0, 299, 300]],
                         ids=["1-shard", "1+299", "uneven-3", "empty+299+1"])
def test_step_op_equals_kernel(device, kind, bounds):
    x = DATA[kind](300, 9, seed=len(bounds))
    want = patchcore_fast.greedy_coreset(x.to(device), 300, 5).cpu()
    got = _simulate(x, bounds, 300, 5, ops.coreset_shard_step, device)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", sorted(DATA))
def test_step_op_matches_reference(kind):
    # The twin sums in torch's order: equal distances up to rounding, so compare the
    # min_d values step by step, and the selections where the data has no near-ties.
    x = DATA[kind](200, 6, seed=11)
    shard, offset = x[50:170].contiguous(), 50
    cands = torch.zeros(3, 8, dtype=torch.int32)
    for r, i in enumerate((7, 60, 190)):  # three offers; the largest key wins (index 60)
        cands[r, :2] = reference.pack_keys(torch.tensor([float(r == 1) + 1.0]),
                                           torch.tensor([i])).view(torch.int32)
        cands[r, 2:] = x[i].view(torch.int32)
    min_a = torch.rand(120, generator=torch.Generator().manual_seed(1)) * 10
    min_a[[3, 40]] = -1.0  # already selected
    min_b, out_a, out_b = min_a.clone(), torch.zeros(4, dtype=torch.int64), torch.zeros(
        4, dtype=torch.int64)
    rec_a = ops.coreset_shard_step(shard, cands, offset, min_a, out_a, 2)
    rec_b = reference.coreset_shard_step(shard, cands, offset, min_b, out_b, 2)
    assert int(out_a[2]) == int(out_b[2]) == 60
    assert float(min_a[60 - offset]) == -1.0 and float(min_a[3]) == -1.0
    torch.testing.assert_close(min_a, min_b, rtol=1e-5, atol=1e-6)
    ka = rec_a[:2].view(torch.int64)
    kb = rec_b[:2].view(torch.int64)
    ia, ib = int(reference.key_index(ka)), int(reference.key_index(kb))
    # Tie-tolerant: the offered rows' distances agree.
    torch.testing.assert_close(min_a[ia - offset], min_a[ib - offset], rtol=1e-5, atol=1e-6)
    assert torch.equal(rec_a[2:].view(torch.float32), x[ia])


@pytest.mark.parametrize("kind", ["gaussian"])
def test_reference_twin_selection(kind):
    x = DATA[kind](150, 4, seed=2)  # well separated: no near-ties
    want = reference.greedy_coreset(x, 150, 9)
    got = _simulate(x, [0, 70, 150], 150, 9, reference.coreset_shard_step)
    assert torch.equal(got, want)


def test_step_op_last_row_leaves_an_empty_record():
    x = _gaussian(1, 3)
    min_d = torch.full((1,), float("inf"))
    out = torch.empty(1, dtype=torch.int64)
    cands = torch.zeros(1, 5, dtype=torch.int32)
    cands[0, :2] = reference.pack_keys(torch.tensor([1.0]), torch.tensor([0])).view(
        torch.int32)
    cands[0, 2:] = x[0].view(torch.int32)
    rec = ops.coreset_shard_step(x, cands, 0, min_d, out, 0)
    assert int(out[0]) == 0 and float(min_d[0]) == -1.0
    assert torch.equal(rec, torch.zeros(5, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_step_op_opcheck(device):
    x = _gaussian(64, 5).to(device)
    cands = torch.zeros(2, 7, dtype=torch.int32, device=device)
    cands[1, :2] = reference.pack_keys(torch.tensor([2.0]), torch.tensor([70])).view(
        torch.int32).to(device)
    cands[1, 2:] = torch.ones(5).view(torch.int32).to(device)
    torch.library.opcheck(STEP_OP, (x, cands, 10, torch.full((64,), 5.0, device=device),
                                    torch.zeros(3, dtype=torch.int64, device=device), 1))


@pytest.mark.parametrize("args,words", [
    (lambda x, c, m, o: (x, c[:, :4], 0, m, o, 0), "candidates should be"),
    (lambda x, c, m, o: (x, c, 0, m[:3], o, 0), "min_d should"),
    (lambda x, c, m, o: (x, c, 0, m, o.float(), 0), "indices should"),
    (lambda x, c, m, o: (x, c, 0, m, o, 4), "step should"),
    (lambda x, c, m, o: (x, c, -1, m, o, 0), "offset should"),
    (lambda x, c, m, o: (x.double(), c, 0, m, o, 0), "shard should be"),
    (lambda x, c, m, o: (x, c.float(), 0, m, o, 0), "candidates should be"),
    (lambda x, c, m, o: (x, torch.zeros_like(c), 0, m, o, 0), "no rank offered"),
], ids=["width", "min_d", "indices", "step", "offset", "dtype", "cand-dtype", "no-offer"])
def test_step_op_bad_input(args, words):
    x = _gaussian(10, 3)
    c = torch.zeros(2, 5, dtype=torch.int32)
    c[0, :2] = reference.pack_keys(torch.tensor([1.0]), torch.tensor([2])).view(torch.int32)
    m = torch.full((10,), float("inf"))
    o = torch.zeros(4, dtype=torch.int64)
    a = args(x, c, m, o)
    with pytest.raises(RuntimeError, match=words):
        STEP_OP(*a)
    if words != "no rank offered":  # the wrapper checks shapes only, the op the keys
        with pytest.raises(ValueError, match=words):
            ops.coreset_shard_step(*a)


# ----------------------------------------------------------------------------- distributed

def _case_data(case: dict) -> torch.Tensor:
    return DATA[case["kind"]](case["n"], case["d"], seed=case["seed"])


def _worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from patchcore_fast.sharded import greedy_coreset_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = []
        for case in cases:
            x = _case_data(case)
            a, b = case["bounds"][rank], case["bounds"][rank + 1]
            results.append(greedy_coreset_sharded(x[a:b], case["k"], case["start"]))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, cases: list, out_dir, timeout_s: float = 240.0) -> list:
    return spawn_ranks(_worker, world, out_dir, cases, timeout_s=timeout_s,
                       what="distributed coreset")


CASES = [
    dict(kind="gaussian", n=1000, d=16, seed=0, bounds=[0, 137, 1000], k=1, start=0),
    dict(kind="gaussian", n=1000, d=16, seed=0, bounds=[0, 137, 1000], k=60, start=400),
    dict(kind="gaussian", n=1000, d=16, seed=0, bounds=[0, 700, 1000], k=1000, start=999),
    dict(kind="duplicates", n=500, d=8, seed=1, bounds=[0, 300, 500], k=500, start=0),
    dict(kind="grid", n=400, d=3, seed=2, bounds=[0, 399, 400], k=120, start=17),
    dict(kind="grid", n=60, d=2, seed=3, bounds=[0, 0, 60], k=60, start=5),  # empty shard
    dict(kind="gaussian", n=20000, d=128, seed=4, bounds=[0, 12345, 20000], k=200, start=1),
]


def test_distributed_selection_equals_single_process(tmp_path):
    per_rank = _spawn(2, CASES, tmp_path)
    for i, case in enumerate(CASES):
        x = _case_data(case)
        want = patchcore_fast.greedy_coreset(x, case["k"], case["start"])
        for rank in range(2):
            got = per_rank[rank][i]
            assert torch.equal(got, want), f"case {case}, rank {rank}: selections differ"
