"""Benchmark of the k-NN operator on the scoring workload of PatchCore.

One group per workload, named for the real case: "score-10img-<M>-k<k>" is scoring ten
224 px test images (10 x 784 = 7,840 patch embeddings of width 1,024) against a coreset
bank of M rows (1,638 = 1 % or 16,386 = 10 % of the bottle bank), with k = 1 (patch
scores) or k = 9 (the reweighting's neighbourhood). Each group times

* ``kernel``: ``patchcore_fast.knn`` (the compiled operator),
* ``reference``: ``reference.knn(exact=False)``, i.e. ``torch.cdist`` in its matrix-multiply
  form plus ``topk``, in query chunks,
* ``faiss``: faiss-cpu ``IndexFlatL2.search`` when faiss is importable,

on seeded Gaussian data, and checks that kernel and faiss distances agree to 1e-3
relative. The kernel's peak extra memory (growth of the process's VmHWM over one call of
``torch.ops.patchcore_fast.knn`` after a warm-up call, in a fresh subprocess, Linux only) is
stored in ``extra_info["peak_extra_mb"]``. It leaves out the wrapper's ``torch.isfinite``
input check, which alone allocates about 1.5x the bank's size.

Run: ``python -m pytest bench/bench_knn.py --benchmark-group-by=group``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import patchcore_fast
from patchcore_fast import reference

try:
    import faiss
except ImportError:  # pragma: no cover - optional peer
    faiss = None

N_QUERY = 7840  # 10 images x 28 x 28 patches
WIDTH = 1024
WORKLOADS = [(m, k) for m in (1638, 16386) for k in (1, 9)]
ROUNDS = 3


def _group(m: int, k: int) -> str:
    return f"score-10img-{m}-k{k}"


_DATA: dict = {}


def _data(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    if m not in _DATA:
        g = torch.Generator().manual_seed(1234 + m)
        _DATA[m] = (torch.randn(N_QUERY, WIDTH, generator=g), torch.randn(m, WIDTH, generator=g))
    return _DATA[m]


def _check_agreement(dist: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    rel = float(((dist - ref).abs() / ref.abs().clamp_min(1e-6)).max())
    print(f"\n{what}: max relative distance difference {rel:.2e}")
    assert rel <= 1e-3, f"{what}: distances differ by {rel:.2e} relative"
    return rel


_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch, patchcore_fast
    def hwm_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    m, k = int(sys.argv[1]), int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    q, b = torch.randn({nq}, {d}, generator=g), torch.randn(m, {d}, generator=g)
    op = torch.ops.patchcore_fast.knn.default  # the kernel itself, not the wrapper's checks
    op(q, b, k)  # load the library, warm up thread pool and BLAS buffers
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    before = hwm_mb()
    op(q, b, k)
    print("PEAK_EXTRA_MB", hwm_mb() - before)
""").format(nq=N_QUERY, d=WIDTH)


def _peak_extra_mb(m: int, k: int) -> float | None:
    """Growth of the peak resident memory over one kernel call, in a fresh process."""
    if not sys.platform.startswith("linux"):
        return None
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(m), str(k)],
                         capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:
        return None
    return float(res.stdout.split("PEAK_EXTRA_MB")[1])


# Workload outer, implementation inner: the three contenders of a group run back to back,
# under the same machine load.
CASES = [(m, k, impl) for m, k in WORKLOADS for impl in ("kernel", "reference", "faiss")]


@pytest.mark.parametrize("m,k,impl", CASES, ids=[f"{_group(m, k)}-{i}" for m, k, i in CASES])
def test_knn(benchmark, m, k, impl):
    q, b = _data(m)
    benchmark.group = _group(m, k)
    benchmark.extra_info["workload"] = f"{N_QUERY} x {WIDTH} vs {m}, k={k}"
    run = dict(rounds=ROUNDS, iterations=1, warmup_rounds=0)
    if impl == "kernel":
        benchmark.extra_info["compiled"] = patchcore_fast.ops.compiled()
        dist, _ = benchmark.pedantic(patchcore_fast.knn, args=(q, b, k), **run)
        rd, _ = reference.knn(q[:512], b, k, exact=True)
        _check_agreement(dist[:512], rd, "kernel vs exact reference (512 rows)")
        peak = _peak_extra_mb(m, k)
        benchmark.extra_info["peak_extra_mb"] = peak
        print(f"kernel peak extra memory: {peak} MB "
              f"(outputs {N_QUERY * k * 12 / 2**20:.2f} MB)")
        if peak is not None:
            assert peak < 256
    elif impl == "reference":
        benchmark.pedantic(reference.knn, args=(q, b, k), kwargs={"exact": False}, **run)
    else:
        if faiss is None:
            pytest.skip("faiss-cpu is not installed")
        benchmark.extra_info["faiss_threads"] = faiss.omp_get_max_threads()
        index = faiss.IndexFlatL2(WIDTH)
        index.add(b.numpy())
        sq, _ = benchmark.pedantic(index.search, args=(q.numpy(), k), **run)
        fd = torch.from_numpy(sq).clamp_min(0).sqrt()
        kd, _ = patchcore_fast.knn(q, b, k)
        _check_agreement(kd, fd, "kernel vs faiss")
