"""The CPU coreset's exact pruning (csrc/cpu/coreset_bound.h) on data where it acts.

From 64 columns on, the CPU kernel skips a centre's distance when a lower bound on 32
principal axes proves that the centre cannot lower a point's min_d. Skipping is exact only
if the bound (and its floating-point margin) is right, so the selection must equal, index
for index, that of the plain loop that computes every distance with the same bits: the
distributed step op's plain pass run as one shard (``coreset_shard_step`` with a
``lazy=False`` state: no pruning, no laziness).
The data below make the bound fire (low-rank and clustered rows, far from the origin so the
rounding margin is large against the distances), make it useless (isotropic Gaussian), or
switch it off (norms above 1e18); duplicates and integer grids add exact ties and zeros.
"""

from __future__ import annotations

import pytest
import torch

import patchcore_fast
from patchcore_fast import ops, reference


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lowrank(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rank-6 rows plus faint noise, offset to norm ~1e3: most distances are pruned, and
    the bound's margin (relative to the norms) is large against near distances."""
    g = _gen(seed)
    z = torch.randn(n, 6, generator=g) @ torch.randn(6, d, generator=g)
    return z + 1e-3 * torch.randn(n, d, generator=g) + 100.0


def _clusters(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Tight clusters of decaying spread along a few directions (like patch features)."""
    g = _gen(seed)
    scale = torch.logspace(1, -3, d)
    centres = torch.randn(64, d, generator=g) * scale
    which = torch.randint(0, 64, (n,), generator=g)
    return centres[which] + 0.05 * torch.randn(n, d, generator=g) * scale


def _gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Isotropic: 32 of 128 axes bound little, nearly nothing is pruned."""
    return torch.randn(n, d, generator=_gen(seed))


def _duplicates(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Few distinct low-rank rows, each repeated: exact ties, then all-zero distances."""
    base = _lowrank(max(1, n // 10), d, seed)
    return base[torch.randint(0, base.shape[0], (n,), generator=_gen(seed + 1))]


def _grid(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Integer points with few non-zero coordinates: many exactly equal distances."""
    g = _gen(seed)
    x = torch.zeros(n, d)
    x[:, :8] = torch.randint(0, 4, (n, 8), generator=g).float()
    return x


def _huge(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Norms above 1e18: the bound switches itself off (float32 squares could overflow)."""
    return 3e17 * _lowrank(n, d, seed) / 100.0


DATA = {"lowrank": _lowrank, "clusters": _clusters, "gaussian": _gaussian,
        "duplicates": _duplicates, "grid": _grid, "huge": _huge}


def _plain_loop(x: torch.Tensor, k: int, start: int) -> torch.Tensor:
    """Every distance of every step, with the kernels' bits: the plain step, 1 shard."""
    n, d = x.shape
    state = ops.coreset_shard_state(x, k, lazy=False)
    out = torch.empty(k, dtype=torch.int64)
    record = torch.zeros(1, d + 2, dtype=torch.int32)
    record[0, :2] = reference.pack_keys(torch.tensor([float("inf")]),
                                        torch.tensor([start])).view(torch.int32)
    record[0, 2:] = x[start].view(torch.int32)
    for t in range(k):
        record = ops.coreset_shard_step(x, record, 0, state, out, t)[None]
    return out


def _kernel(x: torch.Tensor, k: int, start: int, threads: int) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return patchcore_fast.greedy_coreset(x, k, start)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", sorted(DATA))
@pytest.mark.parametrize("d", [64, 128])
def test_selection_equals_plain_loop(kind, d):
    x = DATA[kind](3000, d, seed=d)
    want = _plain_loop(x, 400, 7)
    assert torch.equal(_kernel(x, 400, 7, 1), want)


@pytest.mark.parametrize("kind", ["lowrank", "duplicates", "grid"])
def test_k_equals_n_equals_plain_loop(kind):
    x = DATA[kind](1500, 64, seed=3)
    want = _plain_loop(x, 1500, 0)
    got = _kernel(x, 1500, 0, 1)
    assert torch.equal(got, want)
    assert torch.equal(got.sort().values, torch.arange(1500))


@pytest.mark.parametrize("kind", ["lowrank", "clusters", "duplicates", "grid"])
@pytest.mark.parametrize("threads", [2, 3, 7])
def test_threads_equal_single_thread(kind, threads):
    # 30,000 rows: enough for 7 shards of at least 4,096 rows (the kernel's minimum).
    x = DATA[kind](30_000, 128, seed=threads)
    want = _kernel(x, 1500, 11, 1)
    assert torch.equal(_kernel(x, 1500, 11, threads), want)


def test_lowrank_matches_reference():
    # The torch oracle (cdist direct differences, another summation order): equal indices
    # or, at near-ties, equal covering radii.
    x = _clusters(4000, 128, seed=5)
    got = _kernel(x, 500, 0, 2)
    want = reference.greedy_coreset(x, 500, 0)
    if not torch.equal(got, want):
        r_got, r_want = reference.covering_radii(x, got, want)
        torch.testing.assert_close(r_got, r_want, rtol=1e-5, atol=0.0)
