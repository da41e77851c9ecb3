"""Tests of the sharded coreset: the threaded CPU kernel, the per-shard step op (the CPU's
lazy kind and the plain pass) and the distributed selection over torch.distributed (gloo,
2 processes started by the test).

All share one distance routine (csrc/cpu/sqdist.h: a fixed summation order), so their
selections must equal the single-threaded kernel's index for index, ties included,
whatever the thread count, the split of the rows into shards or the kind of step.
"""

from __future__ import annotations


import pytest
import torch

import patchcore_fast
from patchcore_fast import ops, reference

from gloo_ranks import spawn_ranks

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STEP_OP = torch.ops.patchcore_fast.coreset_shard_step.default
STATE_OP = torch.ops.patchcore_fast.coreset_shard_state.default


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


def _lowrank(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rank-6 rows, faint noise, far from the origin: the CPU's bound prunes (D >= 64)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g) @ torch.randn(6, d, generator=g)
    return z + 1e-3 * torch.randn(n, d, generator=g) + 100.0


def _lowrank_duplicates(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Few low-rank rows repeated across the whole range (so across shards): exact ties
    between ranks, then all-zero distances, with the bound on."""
    base = _lowrank(max(1, n // 10), d, seed)
    return base[torch.randint(0, base.shape[0], (n,), generator=torch.Generator().manual_seed(
        seed + 1))]


def _mixed_norms(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """The first half near the origin, the second half of norm ~1e5: a rank whose own rows
    are short receives far longer centres (its bound's margin must grow with them)."""
    x = _lowrank(n, d, seed) - 100.0
    x[n // 2:] = x[n // 2:] * 1e3 + 1e4
    return x


def _huge_tail(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """The last tenth of norm ~2e18: a rank whose bound is on receives centres too long for
    it (the filter must switch off from then on)."""
    x = _lowrank(n, d, seed)
    x[n - n // 10:] = x[n - n // 10:] * 2.5e15
    return x


DATA = {"gaussian": _gaussian, "duplicates": _duplicates, "grid": _grid}
# Data on which the lazy CPU step's bound acts (64 columns or more).
WIDE = {"lowrank": _lowrank, "lowrank-duplicates": _lowrank_duplicates,
        "mixed-norms": _mixed_norms, "huge-tail": _huge_tail, "grid": _grid}


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

def _simulate(x: torch.Tensor, bounds: list[int], k: int, start: int, impl=ops,
              device: str = "cpu", lazy: bool = True) -> torch.Tensor:
    """The distributed loop in one process: shards x[bounds[r]:bounds[r+1]], the
    all-gather replaced by a stack of the records; ``impl`` is ops or reference."""
    x = x.to(device)
    shards = [x[a:b].contiguous() for a, b in zip(bounds[:-1], bounds[1:])]
    d = x.shape[1]
    states = [impl.coreset_shard_state(s, k, lazy) for s in shards]
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
        records = [impl.coreset_shard_step(s, cands, bounds[r], states[r], outs[r], t)
                   for r, s in enumerate(shards)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), "ranks disagree on the selection"
    return outs[0].cpu()


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "plain"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(DATA))
@pytest.mark.parametrize("bounds", [[0, 300], [0, 1, 300], [0, 137, 200, 300], [0, 0, 299, 300]],
                         ids=["1-shard", "1+299", "uneven-3", "empty+299+1"])
def test_step_op_equals_kernel(device, kind, bounds, lazy):
    x = DATA[kind](300, 9, seed=len(bounds))
    want = patchcore_fast.greedy_coreset(x.to(device), 300, 5).cpu()
    got = _simulate(x, bounds, 300, 5, ops, device, lazy)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", sorted(WIDE))
@pytest.mark.parametrize("bounds,k", [([0, 1200, 2500], 400), ([0, 0, 700, 2500], 2500),
                                      ([0, 2499, 2500], 300), ([0, 900, 1700, 2500], 800)],
                         ids=["2-shards", "empty+k=n", "2499+1", "3-shards"])
def test_lazy_step_with_bound_equals_plain_and_kernel(kind, bounds, k):
    # 128 columns: each rank's subspace bound is on (except where norms switch it off);
    # every rank finds its exact local arg-max lazily, and the selection must be the
    # single-threaded kernel's and the plain pass's, index for index.
    x = WIDE[kind](2500, 128, seed=k)
    want = _single_thread(x, k, 11)
    assert torch.equal(_simulate(x, bounds, k, 11, lazy=False), want)
    assert torch.equal(_simulate(x, bounds, k, 11, lazy=True), want)


def test_lazy_state_layout():
    # The layout csrc/coreset_shard_step.h states; the bound's coordinates and axes only
    # from 64 columns on, and the axes flagged on for low-rank data.
    wide = ops.coreset_shard_state(_lowrank(500, 96), 40)
    assert [tuple(t.shape) for t in wide] == [(500,), (500,), (501,), (500, 32), (97, 32),
                                               (40, 96), (40 * 8 + 24 * 40,)]
    assert [t.dtype for t in wide] == [torch.float32, torch.int32, torch.int64, torch.float32,
                                       torch.float64, torch.float32, torch.float32]
    assert float(wide[4][96, 0]) == 1.0 and float(wide[4][96, 1]) > 0.0
    narrow = ops.coreset_shard_state(_gaussian(500, 9), 40)
    assert [tuple(t.shape) for t in narrow][3:] == [(0, 32), (10, 32), (40, 9), (0,)]
    plain = ops.coreset_shard_state(_gaussian(500, 9), 40, lazy=False)
    assert len(plain) == 1 and torch.equal(plain[0], torch.full((500,), float("inf")))


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
    rec_a = ops.coreset_shard_step(shard, cands, offset, [min_a], out_a, 2)  # the plain pass
    rec_b = reference.coreset_shard_step(shard, cands, offset, [min_b], out_b, 2)
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
    got = _simulate(x, [0, 70, 150], 150, 9, reference)
    assert torch.equal(got, want)


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "plain"])
def test_step_op_last_row_leaves_an_empty_record(lazy):
    x = _gaussian(1, 3)
    state = ops.coreset_shard_state(x, 2, lazy)
    out = torch.empty(2, dtype=torch.int64)
    cands = torch.zeros(1, 5, dtype=torch.int32)
    cands[0, :2] = reference.pack_keys(torch.tensor([1.0]), torch.tensor([0])).view(
        torch.int32)
    cands[0, 2:] = x[0].view(torch.int32)
    rec = ops.coreset_shard_step(x, cands, 0, state, out, 0)
    assert int(out[0]) == 0 and float(state[0][0]) == -1.0
    assert torch.equal(rec, torch.zeros(5, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [5, 64])
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "plain"])
def test_step_op_opcheck(device, d, lazy):
    x = _lowrank(64, d).to(device)
    torch.library.opcheck(STATE_OP, (x, 3, lazy))
    cands = torch.zeros(2, d + 2, dtype=torch.int32, device=device)
    cands[1, :2] = reference.pack_keys(torch.tensor([2.0]), torch.tensor([70])).view(
        torch.int32).to(device)
    cands[1, 2:] = torch.ones(d).view(torch.int32).to(device)
    # Step 0 on a rank that does not own the first centre (global row 70 is another's).
    torch.library.opcheck(STEP_OP, (x, cands, 10, ops.coreset_shard_state(x, 3, lazy),
                                    torch.zeros(3, dtype=torch.int64, device=device), 0))


@pytest.mark.parametrize("args,words", [
    (lambda x, c, m, o: (x, c[:, :4], 0, m, o, 0), "candidates should be"),
    (lambda x, c, m, o: (x, c, 0, m, o.float(), 0), "indices should"),
    (lambda x, c, m, o: (x, c, 0, m, o, 4), "step should"),
    (lambda x, c, m, o: (x, c, -1, m, o, 0), "offset should"),
    (lambda x, c, m, o: (x.double(), c, 0, m, o, 0), "shard should be"),
    (lambda x, c, m, o: (x, c.float(), 0, m, o, 0), "candidates should be"),
    (lambda x, c, m, o: (x, torch.zeros_like(c), 0, m, o, 0), "no rank offered"),
    (lambda x, c, m, o: (x, c, 0, [m[0][:3]], o, 0), "state tensor min_d should"),
    (lambda x, c, m, o: (x, c, 0, m[:2], o, 0), "state should hold"),
    (lambda x, c, m, o: (x, c, 0, [m[0], m[1].long(), *m[2:]], o, 0), "state tensor seen"),
    (lambda x, c, m, o: (x, c, 0, m[:5] + [m[5][:3]] + m[6:], o, 0), "state tensor centres"),
], ids=["width", "indices", "step", "offset", "dtype", "cand-dtype", "no-offer", "min_d",
        "state-count", "seen", "centres"])
def test_step_op_bad_input(args, words):
    x = _gaussian(10, 3)
    c = torch.zeros(2, 5, dtype=torch.int32)
    c[0, :2] = reference.pack_keys(torch.tensor([1.0]), torch.tensor([2])).view(torch.int32)
    m = ops.coreset_shard_state(x, 4)
    o = torch.zeros(4, dtype=torch.int64)
    a = args(x, c, m, o)
    with pytest.raises(RuntimeError, match=words):
        STEP_OP(*a)
    if words.split()[0] != "state" and words != "no rank offered":
        # the wrapper checks shapes of its arguments; the op the keys and the state's layout
        with pytest.raises(ValueError, match=words):
            ops.coreset_shard_step(*a)


@pytest.mark.parametrize("args,words", [
    (lambda x: (x.double(), 3), "shard should be"),
    (lambda x: (x[:, :0], 3), "zero columns|dim >= 1"),
    (lambda x: (x, 0), "k should be"),
], ids=["dtype", "no-columns", "k"])
def test_state_op_bad_input(args, words):
    a = args(_gaussian(10, 3))
    with pytest.raises(RuntimeError, match=words):
        STATE_OP(*a)
    with pytest.raises(ValueError, match=words):
        ops.coreset_shard_state(*a)


# ----------------------------------------------------------------------------- distributed

def _case_data(case: dict) -> torch.Tensor:
    return {**DATA, **WIDE}[case["kind"]](case["n"], case["d"], seed=case["seed"])


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
    # The lazy step with its bound on: low rank, 128 columns; duplicates across the ranks
    # (ties between them, then zeros, k = n); a rank whose rows are far shorter than the
    # other's centres.
    dict(kind="lowrank", n=20000, d=128, seed=5, bounds=[0, 9000, 20000], k=900, start=3),
    dict(kind="lowrank-duplicates", n=3000, d=64, seed=6, bounds=[0, 1700, 3000], k=3000,
         start=2999),
    dict(kind="mixed-norms", n=4000, d=128, seed=7, bounds=[0, 2000, 4000], k=500, start=0),
]


def test_distributed_selection_equals_single_process(tmp_path):
    per_rank = _spawn(2, CASES, tmp_path)
    for i, case in enumerate(CASES):
        x = _case_data(case)
        want = patchcore_fast.greedy_coreset(x, case["k"], case["start"])
        for rank in range(2):
            got = per_rank[rank][i]
            assert torch.equal(got, want), f"case {case}, rank {rank}: selections differ"
