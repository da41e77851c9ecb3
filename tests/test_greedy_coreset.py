"""Tests of the greedy k-center coreset operator against the pure-torch reference.

Every kernel is compared with :func:`patchcore_fast.reference.greedy_coreset` (always run
on the CPU, the oracle). The comparison is tie-tolerant: the indices must be equal, or,
where floating-point near-ties reorder the selection, the covering radius after every step
(computed in float64) must agree to 1e-5 relative. Well-separated random data has no
near-ties, and there the indices must be exactly equal.
"""

from __future__ import annotations

import pytest
import torch

import patchcore_fast
from patchcore_fast import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OP = torch.ops.patchcore_fast.greedy_coreset.default


# ----------------------------------------------------------------------------- helpers

def _gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def _blobs(n: int, d: int, seed: int = 0, blobs: int = 8) -> torch.Tensor:
    """Tight clusters far apart: the first centres land one per blob."""
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(blobs, d, generator=g)
    which = torch.randint(0, blobs, (n,), generator=g)
    return centres[which] + 1e-2 * torch.randn(n, d, generator=g)


def _duplicates(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Few distinct rows, each repeated many times: radii reach exactly 0 early."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(max(1, n // 10), d, generator=g)
    return base[torch.randint(0, base.shape[0], (n,), generator=g)]


DATA = {"gaussian": _gaussian, "blobs": _blobs, "duplicates": _duplicates}


def _check_selection(x: torch.Tensor, got: torch.Tensor, k: int, start: int,
                     device: str) -> torch.Tensor:
    """Checks the output contract and returns the selection on the CPU."""
    assert got.dtype == torch.int64
    assert got.device.type == torch.device(device).type
    assert got.shape == (k,)
    got = got.cpu()
    assert int(got[0]) == start
    assert got.min() >= 0 and got.max() < x.shape[0]
    assert got.unique().numel() == k, "a point was selected twice"
    return got


def _assert_equivalent(x: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal indices, or equal covering radii step by step (near-ties reordered)."""
    if torch.equal(got, want):
        return
    r_got, r_want = reference.covering_radii(x, got, want)
    scale = float(r_want[0]) if r_want.numel() else 0.0
    first = int((got != want).nonzero()[0])
    torch.testing.assert_close(
        r_got, r_want, rtol=1e-5, atol=1e-9 * scale,
        msg=lambda m: f"selections part at step {first} and the covering radii differ: {m}")


def _run_and_compare(x: torch.Tensor, k: int, start: int, device: str) -> torch.Tensor:
    got = patchcore_fast.greedy_coreset(x.to(device), k, start)
    got = _check_selection(x, got, k, start, device)
    want = reference.greedy_coreset(x.contiguous(), k, start)
    _assert_equivalent(x.contiguous(), got, want)
    return got


# ----------------------------------------------------------------------------- correctness

def _grid():
    cases = []
    for n in (1, 2, 17, 1000):
        for d in (1, 3, 128, 1024):
            for k in sorted({1, n, max(1, n // 3)}):
                slow = n * d * k > 2 * 10**8
                marks = [pytest.mark.slow] if slow else []
                cases.append(pytest.param(n, d, k, marks=marks, id=f"n{n}-d{d}-k{k}"))
    cases += [
        pytest.param(50000, 3, 300, id="n50000-d3-k300"),
        pytest.param(50000, 128, 1, id="n50000-d128-k1"),
        pytest.param(50000, 128, 300, marks=pytest.mark.slow, id="n50000-d128-k300"),
    ]
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(DATA))
@pytest.mark.parametrize("n,d,k", _grid())
def test_matches_reference(device, kind, n, d, k):
    x = DATA[kind](n, d, seed=n + d + k)
    _run_and_compare(x, k, 0, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d", [(17, 3), (200, 4), (500, 16)])
def test_exact_on_well_separated_data(device, n, d):
    # Random Gaussian points in a few dimensions: distances differ by far more than the
    # rounding, so the selection must be the reference's index for index (k == N: the
    # whole order, down to the last points).
    x = _gaussian(n, d, seed=7)
    got = patchcore_fast.greedy_coreset(x.to(device), n, 5).cpu()
    want = reference.greedy_coreset(x, n, 5)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(DATA))
def test_k_equals_n_is_a_permutation(device, kind):
    x = DATA[kind](300, 5, seed=3)
    got = _run_and_compare(x, 300, 11, device)
    assert torch.equal(got.sort().values, torch.arange(300))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start", [1, 499, 998, 999])
def test_start(device, start):
    x = _blobs(1000, 32, seed=start)
    _run_and_compare(x, 100, start, device)


@pytest.mark.parametrize("device", DEVICES)
def test_all_duplicates_drain_lowest_index_first(device):
    # Every row equal: every distance is 0, so after `start` the points come out in index
    # order (the reference's tie rule), skipping nothing and repeating nothing.
    x = torch.ones(50, 7)
    got = patchcore_fast.greedy_coreset(x.to(device), 50, 20).cpu()
    want = torch.cat([torch.tensor([20]), torch.arange(20), torch.arange(21, 50)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_blobs_first_centres_one_per_blob(device):
    # With 8 tight, far apart blobs the first 8 centres are one per blob.
    g = torch.Generator().manual_seed(0)
    centres = 100.0 * torch.eye(8, 16)
    which = torch.arange(800) % 8
    x = centres[which] + 1e-3 * torch.randn(800, 16, generator=g)
    got = _run_and_compare(x, 40, 0, device)
    assert sorted(which[got[:8]].tolist()) == list(range(8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
def test_non_contiguous_input(device, layout):
    base = _gaussian(600, 40, seed=1).to(device)
    if layout == "transposed":
        x = base.t().contiguous().t()  # [600, 40] with strides (1, 600)
    elif layout == "strided":
        x = base[::2, ::3]  # [300, 14]
    else:
        x = base[100:400, 5:30]  # a window of a larger tensor
    assert not x.is_contiguous()
    for fn in (patchcore_fast.greedy_coreset, OP):
        got = _check_selection(x.cpu(), fn(x, 60, 3), 60, 3, device)
        _assert_equivalent(x.cpu().contiguous(), got,
                           reference.greedy_coreset(x.cpu().contiguous(), 60, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_converts_float64(device):
    x = _gaussian(200, 8, seed=2).double().to(device)
    _run_and_compare(x.float().cpu(), 20, 0, device)  # the float32 view of the same data
    got = patchcore_fast.greedy_coreset(x, 20, 0).cpu()
    want = reference.greedy_coreset(x.float().cpu(), 20, 0)
    _assert_equivalent(x.float().cpu(), got, want)


def test_cpu_and_cuda_agree():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = _gaussian(20000, 128, seed=4)
    a = patchcore_fast.greedy_coreset(x, 500, 0)
    b = patchcore_fast.greedy_coreset(x.cuda(), 500, 0).cpu()
    _assert_equivalent(x, a, b)


# ----------------------------------------------------------------------------- bad input

def _bad_input(name: str, device: str):
    """(features, k, start, a word the error message must contain) for a bad input."""
    x = _gaussian(10, 3).to(device)
    if name in ("nan", "inf"):
        x = x.clone()
        x[3, 1] = float("nan") if name == "nan" else float("inf")
    return {
        "k>N": (x, 11, 0, "k should"),
        "k=0": (x, 0, 0, "k should"),
        "k<0": (x, -3, 0, "k should"),
        "start=N": (x, 2, 10, "start should"),
        "start<0": (x, 2, -1, "start should"),
        "1-D": (x[0], 1, 0, "features should be a 2-D"),
        "3-D": (x[None], 1, 0, "features should be a 2-D"),
        "int64": (x.long(), 1, 0, "features should be"),
        "nan": (x, 2, 0, "features contains NaN"),
        "inf": (x, 2, 0, "features contains NaN or Inf"),
        "empty": (torch.empty(0, 3, device=device), 1, 0, "features is empty"),
        "no-columns": (torch.empty(5, 0, device=device), 1, 0, "features has zero columns"),
    }[name]


BAD = ["k>N", "k=0", "k<0", "start=N", "start<0", "1-D", "3-D", "int64", "nan", "inf",
       "empty", "no-columns"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BAD)
def test_bad_input_wrapper_raises_value_error(device, case):
    x, k, start, words = _bad_input(case, device)
    with pytest.raises(ValueError, match=words):
        patchcore_fast.greedy_coreset(x, k, start)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BAD)
def test_bad_input_op_raises_value_error(device, case):
    # The kernels check their arguments (TORCH_CHECK_VALUE): Python sees ValueError.
    x, k, start, words = _bad_input(case, device)
    with pytest.raises(ValueError, match=words):
        OP(x, k, start)


@pytest.mark.parametrize("device", DEVICES)
def test_op_rejects_float64(device):
    # The wrapper converts; the op itself takes float32 only and says so.
    with pytest.raises(ValueError, match="float32"):
        OP(_gaussian(10, 3).double().to(device), 2, 0)


def test_op_default_start():
    x = _gaussian(30, 3)
    assert int(torch.ops.patchcore_fast.greedy_coreset(x, 3)[0]) == 0


# ----------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d,k,start", [(1, 1, 1, 0), (64, 3, 10, 5), (257, 128, 257, 0)])
def test_opcheck(device, n, d, k, start):
    x = _gaussian(n, d, seed=n).to(device)
    torch.library.opcheck(OP, (x, k, start))
