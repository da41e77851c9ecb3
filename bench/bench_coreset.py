"""Benchmark of the greedy k-center coreset: kernel vs the plain torch loop vs anomalib.

Workloads stand for the bottle category of MVTec AD: its memory bank has 163,856 patch
embeddings, projected to 128 dims before selection. Two data sets of that shape: Gaussian
(``-gauss``) and the real bottle features (``-real``: EfficientNet-Lite0 embeddings of the
209 good training images, projected to 128 dims; see _common.bottle_projected).

    bottle-1pct-{gauss,real}:  163,856 x 128, k = 1,638
    bottle-10pct-{gauss,real}: 163,856 x 128, k = 16,385

    bottle-{1,10}pct-real-threads: the CPU kernel on the real features with one thread
        (torch.set_num_threads(1)) and with all of torch's threads, side by side; the two
        selections must be identical.

Run:  python -m pytest bench/bench_coreset.py --benchmark-only [-m "not slow"] -s
The reference loop takes minutes at 10 %: it is marked ``slow``. Each selection runs once
(``pedantic(rounds=1)``); where the reference ran, the kernel's selection is checked
against it (same indices, or the same covering radii to 1e-5 relative where near-ties
reorder the selection) and the outcome printed.
"""

from __future__ import annotations

import _common
import pytest
import torch

import patchcore_fast
from patchcore_fast import reference

N, D = 163_856, 128
WORKLOADS = {"bottle-1pct": 1_638, "bottle-10pct": 16_385}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

try:  # anomalib's sampler, the peer, when installed
    from anomalib.models.components.sampling import KCenterGreedy
except Exception:  # noqa: BLE001 - any import failure means "not available"
    KCenterGreedy = None

_selections: dict[tuple[str, str], torch.Tensor] = {}
ALL_THREADS = torch.get_num_threads()  # torch's default: the cores of this machine


@pytest.fixture(scope="module", params=["gauss", "real"])
def data(request) -> tuple[str, torch.Tensor]:
    if request.param == "real":
        x = _common.bottle_projected(D)
        assert x.shape == (N, D)
        return "real", x
    return "gauss", torch.randn(N, D, generator=torch.Generator().manual_seed(0))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _compare(name: str, x: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> None:
    if torch.equal(got, want):
        print(f"\n{name}: kernel selection == reference selection ({got.numel()} indices)")
        return
    first = int((got != want).nonzero()[0])
    r_got, r_want = reference.covering_radii(x, got, want)
    rel = float(((r_got - r_want).abs() / r_want.abs().clamp_min(1e-30)).max())
    print(f"\n{name}: selections part at step {first} (near-tie); covering radii max "
          f"relative difference {rel:.2e}")
    assert rel <= 1e-5, f"{name}: covering radii differ by {rel:.2e} > 1e-5"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_kernel(benchmark, data, workload, device):
    kind, features = data
    benchmark.group = f"{workload}-{kind}"
    k = WORKLOADS[workload]
    x = features.to(device)
    _sync(device)

    def run():
        out = patchcore_fast.greedy_coreset(x, k, 0)
        _sync(device)
        return out

    out = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    _selections[(benchmark.group, device)] = out.cpu()
    benchmark.extra_info.update(n=N, d=D, k=k, device=device, data=kind)


@pytest.mark.parametrize("threads", [1, ALL_THREADS], ids=["1-thread", "all-threads"])
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_kernel_threads(benchmark, workload, threads):
    features = _common.bottle_projected(D)
    benchmark.group = group = f"{workload}-real-threads"
    k = WORKLOADS[workload]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = benchmark.pedantic(patchcore_fast.greedy_coreset, args=(features, k, 0),
                                 rounds=1, iterations=1, warmup_rounds=0)
    finally:
        torch.set_num_threads(before)
    benchmark.extra_info.update(n=N, d=D, k=k, device="cpu", data="real", threads=threads)
    _selections[(group, f"threads={threads}")] = out
    other = _selections.get((group, f"threads={1 if threads != 1 else ALL_THREADS}"))
    if other is not None:
        same = torch.equal(out, other)
        print(f"\n{group}: 1-thread and {ALL_THREADS}-thread selections identical: {same}")
        assert same


def _reference_case(benchmark, data, workload):
    kind, features = data
    benchmark.group = group = f"{workload}-{kind}"
    k = WORKLOADS[workload]
    out = benchmark.pedantic(reference.greedy_coreset_matvec, args=(features, k, 0),
                             rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(n=N, d=D, k=k, device="cpu", data=kind)
    for device in DEVICES:
        if (group, device) not in _selections:  # kernel not run in this session
            _selections[(group, device)] = patchcore_fast.greedy_coreset(
                features.to(device), k, 0).cpu()
        _compare(f"{group} {device}", features, _selections[(group, device)], out)


def test_reference_matvec_1pct(benchmark, data):
    _reference_case(benchmark, data, "bottle-1pct")


@pytest.mark.slow
def test_reference_matvec_10pct(benchmark, data):
    _reference_case(benchmark, data, "bottle-10pct")


@pytest.mark.skipif(KCenterGreedy is None, reason="anomalib is not installed")
@pytest.mark.parametrize("workload", [
    "bottle-1pct", pytest.param("bottle-10pct", marks=pytest.mark.slow)])  # 10 %: ~20 min
def test_anomalib(benchmark, data, workload):
    kind, features = data
    benchmark.group = f"{workload}-{kind}"
    k = WORKLOADS[workload]
    sampler = KCenterGreedy(embedding=features, sampling_ratio=k / N)

    def run():
        if hasattr(sampler, "select_coreset_idxs"):
            return sampler.select_coreset_idxs()
        return sampler.sample_coreset()

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(n=N, d=D, k=k, device="cpu", data=kind)


def _final_radius(x: torch.Tensor, sel: torch.Tensor) -> float:
    """Squared covering radius of a whole selection: max over points of the squared
    distance to the nearest selected point (float64 matrix form, in chunks)."""
    xd = x.double()
    c = xd[sel]
    cn = c.pow(2).sum(1)
    worst = 0.0
    for chunk in xd.split(8192):
        d = (chunk.pow(2).sum(1, keepdim=True) + cn[None] - 2.0 * chunk @ c.T).clamp_min_(0)
        worst = max(worst, float(d.min(1).values.max()))
    return worst


@pytest.mark.slow
def test_reference_10pct(benchmark, data):
    """The plain loop (direct differences) at 10 %: same selection as the kernel?

    Step-by-step radii of two 16,385-step selections cost tens of minutes here, so this
    checks the common prefix, the selected sets and the final covering radius.
    """
    kind, features = data
    benchmark.group = group = f"bottle-10pct-{kind}"
    k = WORKLOADS["bottle-10pct"]
    want = benchmark.pedantic(reference.greedy_coreset, args=(features, k, 0),
                              rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(n=N, d=D, k=k, device="cpu", data=kind)
    got = _selections.get((group, "cpu"))
    if got is None:
        got = patchcore_fast.greedy_coreset(features, k, 0)
    differ = (got != want).nonzero()
    prefix = int(differ[0]) if differ.numel() else k
    sym = len(set(got.tolist()) ^ set(want.tolist()))
    r_got, r_want = _final_radius(features, got), _final_radius(features, want)
    rel = abs(r_got - r_want) / r_want
    print(f"\n{group}: identical order for the first {prefix} of {k} steps; sets differ by "
          f"{sym} points; final squared covering radius kernel {r_got:.6g} vs reference "
          f"{r_want:.6g} (relative difference {rel:.1e})")
    benchmark.extra_info.update(identical_prefix=prefix, set_symmetric_difference=sym,
                                final_radius_rel_diff=rel)
    assert rel <= 1e-5
