"""Tests of the k-NN operator (csrc/cpu/knn.cpp, csrc/cuda/knn.cu) against the exact oracle.

Every result is compared tie-tolerantly with :func:`patchcore_fast.reference.knn` (exact
direct differences) and with float64 distances of the returned indices: where an index
differs from the oracle's, the true distance behind it must equal the returned distance
and be no larger than the oracle's k-th distance.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import patchcore_fast
from patchcore_fast import reference
from patchcore_fast.ops import build_info, compiled
from child import CHILD_CWD, child_env

pytestmark = pytest.mark.skipif(not compiled(), reason="patchcore_fast._C is not built")

RTOL = 1e-4  # relative tolerance on distances
ATOL = 1e-5  # absolute epsilon, for exact-zero distances


def _has_cuda_kernel() -> bool:
    return compiled() and torch.cuda.is_available() and "knn" in build_info()["cuda"]


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not _has_cuda_kernel(), reason="no CUDA device or no CUDA kernel built")]),
]


def _op(query, bank, k):
    return torch.ops.patchcore_fast.knn.default(query, bank, k)


def _true_dists(q: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Float64 Euclidean distance matrix [Q, M] by direct differences (CPU)."""
    q, b = q.detach().cpu().double(), b.detach().cpu().double()
    out = [torch.cdist(q[s:s + chunk], b, compute_mode="donot_use_mm_for_euclid_dist")
           for s in range(0, q.shape[0], chunk)]
    return torch.cat(out) if out else torch.empty(0, b.shape[0], dtype=torch.float64)


def assert_knn_matches(q, b, k, dist, idx):
    """Tie-tolerant comparison of (dist, idx) = knn(q, b, k) with the exact oracle."""
    nq, m = q.shape[0], b.shape[0]
    assert dist.shape == (nq, k) and idx.shape == (nq, k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    assert dist.device == q.device and idx.device == q.device
    dist, idx = dist.cpu(), idx.cpu()
    if nq == 0:
        return
    assert bool(torch.isfinite(dist).all())
    assert int(idx.min()) >= 0 and int(idx.max()) < m
    # Each row returns k distinct bank rows, sorted by distance.
    assert bool((idx.sort(1).values.diff(dim=1) > 0).all()) if k > 1 else True
    assert bool((dist.diff(dim=1) >= 0).all()), "distances are not ascending"

    rd, ri = reference.knn(q.cpu().float(), b.cpu().float(), k, exact=True)
    # Values: position by position, as with any exact method.
    torch.testing.assert_close(dist, rd, rtol=RTOL, atol=ATOL)

    truth = _true_dists(q, b)  # [Q, M] float64
    ours_true = truth.gather(1, idx)
    # The returned distance is the true distance of the returned index...
    torch.testing.assert_close(dist.double(), ours_true, rtol=RTOL, atol=ATOL)
    # ... and no returned row is farther than the true k-th nearest one.
    kth = truth.topk(k, dim=1, largest=False).values[:, -1:]
    assert bool((ours_true <= kth * (1 + RTOL) + ATOL).all()), "a returned row is not a k-NN"
    # Where indices differ from the oracle's, the distances behind them agree.
    diff = idx != ri
    if bool(diff.any()):
        torch.testing.assert_close(ours_true[diff], truth.gather(1, ri)[diff], rtol=RTOL,
                                   atol=ATOL)
    # Exact ties (equal returned distances) are ordered by bank index.
    same = dist[:, 1:] == dist[:, :-1]
    assert bool((idx[:, 1:][same] > idx[:, :-1][same]).all()), "exact ties not by index"


def _gauss(n, d, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(device)


K_CASES = [1, 2, 9, 16, "M"]


# k > M is an error case (see test_bad_inputs), left out of the grid.
SIZE_GRID = [(nq, m, k) for nq in (0, 1, 7, 1000) for m in (1, 2, 33, 5000)
             for k in K_CASES if k == "M" or k <= m]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nq,m,k", SIZE_GRID)
def test_sizes(device, nq, m, k):
    k = m if k == "M" else k
    d = 129 if nq * m <= 10**6 else 33  # odd widths; smaller for the biggest grid points
    q, b = _gauss(nq, d, device, 1), _gauss(m, d, device, 2)
    dist, idx = _op(q, b, k)
    assert_knn_matches(q, b, k, dist, idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [1, 3, 128, 129, 1024])
@pytest.mark.parametrize("k", [1, 9])
def test_widths(device, d, k):
    q, b = _gauss(300, d, device, 3), _gauss(700, d, device, 4)
    dist, idx = _op(q, b, k)
    assert_knn_matches(q, b, k, dist, idx)


def _clustered(nq, m, d, device, seed, norm=100.0, noise=0.1):
    """Tight clusters far from the origin: norms ~norm, NN distances ~noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(32, d, generator=g)
    centres = centres / centres.norm(dim=1, keepdim=True) * norm
    per_dim = noise / (2 * d) ** 0.5  # so that ||x - y|| ~ noise within a cluster
    b = centres[torch.randint(0, 32, (m,), generator=g)]
    b = b + per_dim * torch.randn(m, d, generator=g)
    q = centres[torch.randint(0, 32, (nq,), generator=g)]
    q = q + per_dim * torch.randn(nq, d, generator=g)
    return q.to(device), b.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [3, 128, 1024])
@pytest.mark.parametrize("k", [1, 2, 9, 16])
def test_clustered_small_distances(device, d, k):
    # The norm expansion alone cannot rank these (its error exceeds the distances).
    q, b = _clustered(200, 1500, d, device, seed=d + k)
    dist, idx = _op(q, b, k)
    assert float(dist.max()) < 1.0 and float(b.norm(dim=1).min()) > 90  # the regime meant
    assert_knn_matches(q, b, k, dist, idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 9])
def test_offset_features(device, k):
    # Non-negative features with a large common offset, like pooled ReLU activations.
    g = torch.Generator().manual_seed(5)
    b = (torch.rand(3000, 256, generator=g) * 2 + 10).to(device)
    q = (torch.rand(400, 256, generator=g) * 2 + 10).to(device)
    dist, idx = _op(q, b, k)
    assert_knn_matches(q, b, k, dist, idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 2, 9, "M"])
def test_duplicates_and_exact_ties(device, k):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(40, 17, generator=g)
    # Every row appears three times, scattered; queries include bank rows (distance 0).
    b = base[torch.randperm(120, generator=g) % 40]
    q = torch.cat([b[:30], torch.randn(50, 17, generator=g)])
    k = b.shape[0] if k == "M" else k
    q, b = q.to(device), b.to(device)
    dist, idx = _op(q, b, k)
    assert_knn_matches(q, b, k, dist, idx)
    # Tie rule at the cut: if a row is returned, so is every identical row of lower index.
    bc, ic = b.cpu(), idx.cpu()
    same = (bc[:, None, :] == bc[None, :, :]).all(-1)  # [M, M] identical rows
    for r in range(q.shape[0]):
        chosen = set(ic[r].tolist())
        for j in chosen:
            twins = same[j].nonzero().flatten().tolist()
            assert all(t in chosen for t in twins if t < j), f"row {r}: twin of {j} skipped"
    # A query equal to a bank row finds it (its first copy) at distance exactly 0.
    assert bool((dist[:30, 0] == 0).all())
    first_copy = same.float().argmax(1)  # lowest identical row
    assert bool((ic[:30, 0] == first_copy[:30]).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 9, 70])
def test_all_rows_at_one_point(device, k):
    # Every bank row and every query at the same point: all distances are exactly 0 and the
    # expansion's error band is 0 (no spread around the mean), the degenerate case of the
    # pools' trimming (it must keep the k lowest indices, not drop the k-th itself). 1,500
    # rows span two bank tiles, 100 queries take the thread-per-chunk layout, and k = 70
    # exceeds the first pass's pool capacity.
    b = torch.full((1500, 24), 3.25, device=device)
    q = torch.full((100, 24), 3.25, device=device)
    dist, idx = _op(q, b, k)
    assert bool((dist == 0).all())
    assert torch.equal(idx.cpu(), torch.arange(k).expand(100, k))
    if device == "cpu":
        # Each returned neighbour was refined (its distance computed), not read from a pool
        # emptied by the trimming (the kernel before the fix refined 0 here).
        _, _, stats = patchcore_fast.ops.knn_stats(q, b, k)
        assert stats["refined"] >= 100 * k, stats


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 9])
def test_non_contiguous(device, k):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(130, 200, generator=g).to(device).t()         # transposed [200, 130]
    b = torch.randn(900, 260, generator=g).to(device)[::2, ::2]   # strided [450, 130]
    assert not q.is_contiguous() and not b.is_contiguous()
    dist, idx = _op(q, b, k)
    assert_knn_matches(q, b, k, dist, idx)
    d2, i2 = _op(q.contiguous(), b.contiguous(), k)
    assert torch.equal(dist, d2) and torch.equal(idx, i2)


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper(device):
    q, b = _gauss(50, 20, device, 8), _gauss(80, 20, device, 9)
    dist, idx = patchcore_fast.knn(q.double(), b, 4)  # converted to float32
    assert_knn_matches(q, b, 4, dist, idx)
    dist1, idx1 = patchcore_fast.knn(q, b)  # k defaults to 1
    assert dist1.shape == (50, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for nq, m, d, k in [(5, 9, 3, 2), (0, 4, 2, 1), (33, 70, 17, 9)]:
        q, b = _gauss(nq, d, device, 10), _gauss(m, d, device, 11)
        torch.library.opcheck(torch.ops.patchcore_fast.knn.default, (q, b, k))


def _bad_cases(device):
    q, b = _gauss(4, 3, device, 12), _gauss(6, 3, device, 13)
    nan_q = q.clone()
    nan_q[1, 2] = float("nan")
    inf_b = b.clone()
    inf_b[0, 0] = float("inf")
    return [
        ("k_gt_m", (q, b, 7), r"k should be between 1 and the bank size 6"),
        ("k_zero", (q, b, 0), r"k should be between 1 and the bank size"),
        ("k_negative", (q, b, -3), r"k should be between 1 and the bank size"),
        ("query_1d", (q[0], b, 1), r"query should be a 2-D tensor"),
        ("query_3d", (q[None], b, 1), r"query should be a 2-D tensor"),
        ("bank_1d", (q, b[0], 1), r"bank should be a 2-D tensor"),
        ("width", (q, _gauss(6, 4, device, 14), 1), r"same width"),
        ("nan_query", (nan_q, b, 1), r"query contains NaN or Inf"),
        ("inf_bank", (q, inf_b, 1), r"bank contains NaN or Inf"),
        ("int_query", (q.long(), b, 1), r"query should be"),
        ("int_bank", (q, b.int(), 1), r"bank should be"),
        ("empty_bank", (q, b[:0], 1), r"bank is empty"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_wrapper(device):
    for name, args, msg in _bad_cases(device):
        with pytest.raises(ValueError, match=msg):
            patchcore_fast.knn(*args)
            pytest.fail(f"no error for {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_op(device):
    # The kernels check their arguments (TORCH_CHECK_VALUE): Python sees ValueError.
    for name, args, msg in _bad_cases(device):
        with pytest.raises(ValueError, match=msg):
            _op(*args)
            pytest.fail(f"no error for {name}")
    q, b = _gauss(4, 3, device, 15), _gauss(6, 3, device, 16)
    with pytest.raises(ValueError, match=r"query should be float32, got Double"):
        _op(q.double(), b, 1)
    with pytest.raises(ValueError, match=r"zero columns"):
        _op(q[:, :0], b[:, :0], 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("nq", [0, 5, 700])
def test_bank_check_rides_on_the_kernel_pass(two_threads, device, where, value, nq):
    # The bank's NaN / Inf check is folded into the kernel's own pass over the bank (its
    # centred norms), not a separate scan per call: a bad value anywhere in the bank, with
    # no query, a few or many (several threads' chunks), still raises ValueError by name.
    g = torch.Generator().manual_seed(31)
    q, b = torch.randn(nq, 24, generator=g), torch.randn(3000, 24, generator=g)
    b[{"first": 0, "middle": 1717, "last": 2999}[where], 5] = float(value)
    with pytest.raises(ValueError, match="bank contains NaN or Inf values"):
        _op(q.to(device), b.to(device), 3)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_check_passes_finite_overflow(device):
    # Finite values whose centred differences overflow float32 make the norms the check
    # rides on infinite; the rows are then inspected, found finite, and the call goes on.
    b = torch.tensor([[3.4e38], [-3.4e38], [-3.4e38], [1.0]])
    q = torch.tensor([[1.0], [2.0]])
    d, i = _op(q.to(device), b.to(device), 1)
    assert d.shape == (2, 1) and i.shape == (2, 1)


@pytest.mark.skipif(not torch.cuda.is_available() or not _has_cuda_kernel(),
                    reason="needs a CUDA device and the CUDA kernel")
@pytest.mark.cuda
@pytest.mark.parametrize("k", [1, 9, 70])
def test_cpu_cuda_agree(k):
    q, b = _gauss(500, 64, "cpu", 17), _gauss(3000, 64, "cpu", 18)
    dc, ic = _op(q, b, k)
    dg, ig = _op(q.cuda(), b.cuda(), k)
    torch.testing.assert_close(dg.cpu(), dc, rtol=RTOL, atol=ATOL)
    diff = ig.cpu() != ic
    if bool(diff.any()):
        truth = _true_dists(q, b)
        torch.testing.assert_close(truth.gather(1, ig.cpu())[diff], truth.gather(1, ic)[diff],
                                   rtol=RTOL, atol=ATOL)


_LARGE_SCRIPT = textwrap.dedent("""
    import torch, patchcore_fast
    from patchcore_fast import reference

    def hwm_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    torch.manual_seed(0)
    q, b = torch.randn(20000, 8), torch.randn(20000, 8)
    op = torch.ops.patchcore_fast.knn.default  # the kernel, without the wrapper's checks
    op(q[:64], b[:64], 1)  # load and warm up
    before = hwm_mb()
    d, i = op(q, b, 1)
    extra = hwm_mb() - before
    rows = torch.randperm(20000)[:300]
    rd, ri = reference.knn(q[rows], b, 1, exact=True)
    torch.testing.assert_close(d[rows], rd, rtol=1e-4, atol=1e-5)
    print(f"EXTRA_MB {extra:.1f}")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_large_problem_bounded_memory():
    # Q x M = 4e8 distances (1.6 GB as one float32 matrix): the kernel tiles it, so the
    # process peak must grow by far less (outputs: 20000 x 1 x 12 bytes).
    res = subprocess.run([sys.executable, "-c", _LARGE_SCRIPT], capture_output=True,
                         text=True, env=child_env(), timeout=600, cwd=CHILD_CWD)
    assert res.returncode == 0, res.stderr
    extra = float(res.stdout.split("EXTRA_MB")[1])
    assert extra < 256, f"peak memory grew by {extra:.0f} MB"
