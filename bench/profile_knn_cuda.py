"""Where the CUDA k-NN kernel's time goes (issue #11): one call of ``patchcore_fast.knn``
per GEMM scheme on the scoring shape of one batch of 64 images (50,176 x 1,024 queries
against 16,386 rows, Gaussian), under ``torch.profiler``, with each CUDA kernel's total
time; then the GEMMs alone (bf16 -> fp32 with ``out_dtype``, contiguous and as the
kernel's strided views; plain fp32; TF32) at one tile's shape.

Run on a GPU machine after ``pip install .``: ``python bench/profile_knn_cuda.py``.
"""

from __future__ import annotations

import torch

import _common

import patchcore_fast


def _time(fn, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def profile_calls() -> None:
    g = torch.Generator().manual_seed(99)
    q = torch.randn(50176, 1024, generator=g).cuda()
    b = torch.randn(16386, 1024, generator=g).cuda()
    for scheme in ("bf16x3", "fp32"):
        def call(k=1, scheme=scheme):
            return patchcore_fast.ops.knn_stats(q, b, k, gemm=scheme)
        for k in (1, 9):
            ms = _time(lambda: call(k), reps=5)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
                call(k)
                torch.cuda.synchronize()
            print(f"\n== {scheme} k={k}: {ms:.1f} ms per call (median of 5)")
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=8,
                                         max_name_column_width=70))


def gemms(rows: int = 4096, cols: int = 8192, d: int = 1024) -> None:
    print(f"\n== GEMMs alone, [{rows}, K] x [K, {cols}] (one tile), median of 10")
    a = torch.randn(rows, 2 * d, device="cuda").bfloat16()
    b = torch.randn(cols, 2 * d, device="cuda").bfloat16()
    out = torch.empty(rows, cols, device="cuda")
    a1, b1 = a[:, :d].contiguous(), b[:, d:].contiguous()
    flop = 2 * rows * cols * d
    cases = {
        "bf16->fp32 out_dtype, K=d, contiguous":
            (lambda: torch.mm(a1, b1.T, out_dtype=torch.float32, out=out), 1),
        "bf16->fp32 out_dtype, K=d, strided views (kernel's hi.hi)":
            (lambda: torch.mm(a[:, :d], b[:, d:].T, out_dtype=torch.float32, out=out), 1),
        "bf16->fp32 out_dtype, K=2d (kernel's lo GEMM)":
            (lambda: torch.mm(a, b.T, out_dtype=torch.float32, out=out), 2),
        "bf16->bf16, K=d": (lambda: torch.mm(a1, b1.T), 1),
    }
    af, bf = a1.float(), b1.float()
    cases["fp32, K=d"] = (lambda: torch.mm(af, bf.T, out=out), 1)
    for name, (fn, mult) in cases.items():
        ms = _time(fn)
        print(f"{name:60s} {ms:7.3f} ms  {flop * mult / ms / 1e9:7.1f} TFLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = True
    ms = _time(lambda: torch.mm(af, bf.T, out=out))
    print(f"{'tf32, K=d':60s} {ms:7.3f} ms  {flop / ms / 1e9:7.1f} TFLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = False


if __name__ == "__main__":
    print(_common.describe())
    gemms()
    profile_calls()
