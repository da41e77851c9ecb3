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

"features-*" groups (issue #11) time the same contenders on real patch features, whose
large norms and many near-ties a Gaussian benchmark hides (see bench/_common.py):

* ``features-wrn50-8img-k<k>``: WideResNet-50 with random weights on generated 224 px
  images, 8 images' patches (6,272 x 1,024) against a 16,386-row bank of such features
  (the patches of 21 other images); ``gaussian-twin`` is the kernel on Gaussian data of the
  same shape (so "no slow path" reads as a ratio near 1 between the two);
* ``features-lite0-8img-k<k>``: EfficientNet-Lite0 on MVTec AD bottle, 8 test images
  (6,272 x 152) against 16,386 rows drawn (seeded) from the 163,856 training patches;
* ``features-<wrn50|lite0>-64img-k1``: one batch of 64 images (50,176 queries) against the
  same banks: kernel, faiss-cpu, ``torch.cdist`` + ``topk`` (one round each on the CPU:
  the WRN-50 GEMM alone is 1.7 TFLOP).

On a GPU the ``*-cuda`` groups (WRN-50 features and ``gauss``, Gaussian data of the same
shapes; 64 and 10 images' queries, k = 1 and 9) time the kernel (tensor-core selection,
``kernel``; with its fp32 GEMM, ``kernel-fp32``) against ``torch.cdist`` + ``topk``, the
matrix-multiply form (``||q||^2 + ||b||^2 - 2 q.b`` then ``topk``) and a bf16
``torch.nn.functional.linear`` + ``topk`` (not exact: a speed reference); both kernel
entries are checked against the float64 oracle on 256 rows. They skip without CUDA.

Run: ``python -m pytest bench/bench_knn.py --benchmark-group-by=group``. On a shared
machine, ``python bench/bench_knn.py [rounds]`` runs the WRN-50 8-image contenders with
their rounds interleaved and prints wall and CPU time, min and median (:func:`interleaved`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

import _common

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
    # The package this process imported (installed, with its compiled library), run from
    # outside the repository so that the source tree cannot shadow it.
    root = os.path.dirname(os.path.dirname(os.path.abspath(patchcore_fast.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(m), str(k)],
                         capture_output=True, text=True, env=env, timeout=600,
                         cwd=tempfile.gettempdir())
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


# ----- real patch features (issue #11) ------------------------------------------------

FEATURE_BANK = 16386
FEATURE_SETS = ("wrn50", "lite0")
_FEATURES: dict = {}


def _features(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries [50,176, D], bank [16,386, D]) of a feature set (see the module docstring)."""
    if name not in _FEATURES:
        if name == "wrn50":
            f = _common.random_backbone_features("wide_resnet50_2", 85)  # 21 + 64 images
            bank, query = f[:FEATURE_BANK], f[21 * 784:]
        else:
            train = _common.bottle_features("train/good")
            rows = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))
            bank = train[rows[:FEATURE_BANK]].contiguous()
            query = _common.bottle_features("test")[:64 * 784]
        _FEATURES[name] = (query.contiguous(), bank)
    return _FEATURES[name]


def _gauss_like(q: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return torch.randn(q.shape, generator=g), torch.randn(b.shape, generator=g)


def _cdist_topk(q, b, k):
    return torch.cdist(q, b).topk(k, dim=1, largest=False)


def _mm_topk(q, b, k, chunk=8192):
    bn = b.square().sum(1)
    out = [(bn - 2 * q[s:s + chunk] @ b.T).topk(k, dim=1, largest=False)
           for s in range(0, q.shape[0], chunk)]
    return torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])


def _bf16_linear_topk(q, b, k, chunk=8192):
    qh, bh = q.bfloat16(), b.bfloat16()
    bn = b.square().sum(1)
    out = [(bn - 2 * torch.nn.functional.linear(qh[s:s + chunk], bh).float())
           .topk(k, dim=1, largest=False) for s in range(0, q.shape[0], chunk)]
    return torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])


# (group, feature set, queries, k, contenders); CPU first, then the GPU groups: WRN-50
# features and their Gaussian twin (the same shapes, its own group, so that the kernel is
# compared with the peers on both), one batch of 64 images and ten images.
CUDA_IMPLS = ("kernel", "kernel-fp32", "cdist-topk", "mm-topk", "bf16-linear-topk")
FEATURE_CASES = (
    [(f"features-{f}-8img-k{k}", f, 6272, k, impl) for f in FEATURE_SETS for k in (1, 9)
     for impl in ("kernel", "faiss", "reference", "gaussian-twin")]
    + [(f"features-{f}-64img-k1", f, 50176, 1, impl) for f in FEATURE_SETS
       for impl in ("kernel", "faiss", "reference")]
    + [(f"features-{f}-{n}img-k{k}-cuda", f, n * 784, k, impl) for n in (64, 10)
       for f in ("wrn50", "gauss") for k in (1, 9) for impl in CUDA_IMPLS])


@pytest.mark.parametrize("group,fset,nq,k,impl", FEATURE_CASES,
                         ids=[f"{c[0]}-{c[4]}" for c in FEATURE_CASES])
def test_knn_features(benchmark, group, fset, nq, k, impl):
    cuda = group.endswith("-cuda")
    if cuda and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    q, b = _features("wrn50" if fset == "gauss" else fset)
    q = q[:nq]
    if impl == "gaussian-twin" or fset == "gauss":
        q, b = _gauss_like(q, b)
    dev = "cuda" if cuda else "cpu"
    q, b = q.to(dev), b.to(dev)
    benchmark.group = group
    benchmark.extra_info["workload"] = f"{tuple(q.shape)} vs {tuple(b.shape)}, k={k}"
    rounds = 1 if (nq > 10000 and not cuda) else 3
    run = dict(rounds=rounds, iterations=1, warmup_rounds=1 if cuda else 0)

    def timed(fn, *args):
        if not cuda:
            return benchmark.pedantic(fn, args=args, **run)

        def synced():
            out = fn(*args)
            torch.cuda.synchronize()
            return out
        return benchmark.pedantic(synced, **run)

    if impl in ("kernel", "kernel-fp32", "gaussian-twin"):
        # kernel-fp32: the CUDA kernel with its fp32 GEMM instead of the tensor-core split
        # (csrc/cuda/knn.cu), chosen by knn_stats's gemm argument (knn picks the split);
        # timed through knn_stats, whose statistics cost one small host copy per call.
        gemm = "fp32" if impl == "kernel-fp32" else "auto"
        dist, idx, stats = patchcore_fast.ops.knn_stats(q, b, k, gemm=gemm)  # also the warm-up
        benchmark.extra_info.update(second_pass=stats["second_pass"],
                                    exact_scans=stats["exact_scans"],
                                    refined_per_row=stats["refined"] / q.shape[0],
                                    projected=stats["projected"],
                                    projected_certified=stats["projected_certified"])
        print(f"\n{group} {impl}: {stats}")
        if impl == "kernel-fp32":
            timed(lambda *a: patchcore_fast.ops.knn_stats(*a, gemm="fp32")[:2], q, b, k)
        else:
            timed(patchcore_fast.knn, q, b, k)
        if impl != "gaussian-twin":
            rows = slice(0, 256)
            truth = torch.cdist(q[rows].cpu().double(), b.cpu().double())
            best = truth.topk(k, dim=1, largest=False).values
            ours = truth.gather(1, idx[rows].cpu())
            rel = float(((ours - best).abs() / best.clamp_min(1e-12)).max())
            benchmark.extra_info["max_rel_err_vs_f64"] = rel
            print(f"kernel vs float64 oracle (256 rows): max relative error {rel:.1e}")
            assert rel <= 1e-5
    elif impl == "faiss":
        if faiss is None:
            pytest.skip("faiss-cpu is not installed")
        benchmark.extra_info["faiss_threads"] = faiss.omp_get_max_threads()
        index = faiss.IndexFlatL2(b.shape[1])
        index.add(b.numpy())
        timed(index.search, q.numpy(), k)
    elif impl == "reference":
        timed(reference.knn, q, b, k, 1024, False)  # torch.cdist (mm form) + topk, chunked
    elif impl == "cdist-topk":
        timed(_cdist_topk, q, b, k)
    elif impl == "mm-topk":
        timed(_mm_topk, q, b, k)
    else:
        timed(_bf16_linear_topk, q, b, k)


OPERAND_CASES = [("cpu", 1), ("cpu", 8), ("cuda", 1), ("cuda", 10), ("cuda", 64)]


@pytest.mark.parametrize("device,nimg", OPERAND_CASES,
                         ids=[f"features-{d}-{n}img" for d, n in OPERAND_CASES])
def test_knn_bank_operands(benchmark, device, nimg):
    """Scoring's k-NN (k = 1) with the bank's operands made once (``ops.knn_bank``, as the
    model keeps them) against made on every call (``ops.knn`` alone): WideResNet-50
    features, the 16,386-row bank, the patches of 1 and 8 images (CPU), 1, 10 and 64
    (CUDA: the centred bank split for the tensor cores and the bound's scalar, a host
    synchronisation, made once). The two alternate call by call (this machine's speed
    drifts between seconds); ``extra_info``: the medians of both, the median of the
    per-pair ratios, and the time to make the operands."""
    import statistics
    import time

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    q, b = _features("wrn50")
    q, b = q[:nimg * 784].contiguous().to(device), b.to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    prepared = patchcore_fast.ops.knn_bank(b)
    sync()
    made = time.perf_counter() - t0
    d0, i0 = patchcore_fast.knn(q, b, 1)
    d1, i1 = patchcore_fast.ops.knn(q, b, 1, prepared)
    assert torch.equal(d0, d1) and torch.equal(i0, i1)
    times: dict[str, list[float]] = {"per_call": [], "kept": []}

    def pair():
        for name, operands in (("per_call", None), ("kept", prepared)):
            sync()
            start = time.perf_counter()
            patchcore_fast.ops.knn(q, b, 1, operands)
            sync()
            times[name].append(time.perf_counter() - start)

    suffix = "-cuda" if device == "cuda" else ""
    benchmark.group = f"features-wrn50-{nimg}img-k1-operands{suffix}"
    rounds = 15 if nimg == 1 else 7
    benchmark.pedantic(pair, rounds=rounds * (4 if device == "cuda" else 1), iterations=1,
                       warmup_rounds=2 if device == "cuda" else 1)
    ratios = [k / p for k, p in zip(times["kept"], times["per_call"])]
    info = {"per_call_ms": round(1e3 * statistics.median(times["per_call"]), 3),
            "kept_ms": round(1e3 * statistics.median(times["kept"]), 3),
            "kept_over_per_call": round(statistics.median(ratios), 3),
            "knn_bank_ms": round(1e3 * made, 1)}
    benchmark.extra_info.update(info)
    print(f"\n{benchmark.group}: {info}")


# ----- interleaved rounds (python bench/bench_knn.py [rounds]) -------------------------

def interleaved(rounds: int = 5) -> None:
    """The WRN-50 8-image workloads with the contenders' rounds interleaved (kernel,
    Gaussian twin, faiss-cpu, ``torch.cdist`` + ``topk`` as in the pytest groups).

    pytest-benchmark runs one contender's rounds back to back, so on a shared machine a
    burst of load lands on one entry. Here round r of every contender runs before round
    r + 1 of any, and each call's process CPU time is printed beside its wall time: CPU
    time counts only this process's work, so it moves far less with the load of others.
    """
    import statistics
    import time

    print(_common.describe())
    q, b = _features("wrn50")
    q = q[:6272].contiguous()
    qg, bg = _gauss_like(q, b)
    fns = {}
    for k in (1, 9):
        fns[f"wrn50-8img-k{k} kernel"] = (patchcore_fast.knn, (q, b, k))
        fns[f"wrn50-8img-k{k} gaussian-twin"] = (patchcore_fast.knn, (qg, bg, k))
        if faiss is not None:
            index = faiss.IndexFlatL2(b.shape[1])
            index.add(b.numpy())
            fns[f"wrn50-8img-k{k} faiss"] = (index.search, (q.numpy(), k))
        fns[f"wrn50-8img-k{k} cdist-topk"] = (reference.knn, (q, b, k, 1024, False))
    patchcore_fast.knn(q[:64], b, 1)  # load the library, start the thread pool
    wall = {n: [] for n in fns}
    cpu = {n: [] for n in fns}
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            c, t = time.process_time(), time.perf_counter()
            fn(*args)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    print(f"load average after the run: {os.getloadavg()}")
    for name in fns:
        w, c = wall[name], cpu[name]
        print(f"{name:30s} wall min {min(w):.2f} s median {statistics.median(w):.2f} s | "
              f"cpu min {min(c):.2f} s median {statistics.median(c):.2f} s")


if __name__ == "__main__":
    interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
