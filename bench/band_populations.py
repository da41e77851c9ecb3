"""How many candidates each GEMM scheme of the CUDA k-NN would have to keep (issue #24,
item 2: "fewer GEMMs for the candidates ... choose by measurement").

The CUDA kernel ranks bank rows by the expanded form v(q, b) = ||b||^2 - 2 q.b of the
centred rows, computed by a GEMM whose error is at most E(q) (csrc/knn_bound.h); every row
with v <= v_k + 2 E(q) may be among the k nearest and must be kept as a candidate and
refined with direct differences. The number of such rows per query -- the band's
population -- decides the selection's list size (the register-list kernel holds at most
64 candidates; more take the slow at::topk path or a second pass) and the refinement's
work. It depends on the scheme only through E(q), so it can be counted here, in float64
on the CPU, before any GPU time is spent: the GEMM's speed is the device's half of the
choice (bench/bench_knn.py on the GPU).

Schemes (E(q) = gamma (||q|| + bmax)^2 + cross ||q|| bmax, as ExpansionBound):

- ``fp32``: the SIMT fp32 GEMM (round-to-nearest accumulation, exact inputs);
- ``bf16x3``: the kernel's default, three bf16 products per pair (hi.hi + hi.lo + lo.hi,
  two GEMMs of lengths d and 2d), tensor-core accumulation taken at 2^-22;
- ``tf32``: one TF32 GEMM of length d (inputs rounded to 2^-10, the bound's conservative
  TF32 unit; TF32 tensor cores run at half the bf16 rate);
- ``fp16``: one fp16 GEMM of length d (inputs rounded to nearest, 2^-11, after scaling the
  rows into fp16's range), at the bf16 rate: a third of bf16x3's tensor-core work;
- ``bf16``: one bf16 GEMM of length d (2^-8).

The formulas mirror csrc/knn_bound.h (gamma_n = 1.05 n u / (1 - n u)).

    python bench/band_populations.py [queries]    # markdown table on stdout
"""

from __future__ import annotations

import sys

import torch

import _common


def gamma_n(n: float, u: float) -> float:
    return 1.05 * n * u / (1.0 - n * u)


def bounds(d: int) -> dict[str, tuple[float, float]]:
    """(gamma, cross) of each scheme at width d (see the module docstring)."""
    acc = 2.0 ** -22  # tensor-core accumulation, as ExpansionBound::bf16x3

    def rounded_inputs(u_in: float, accumulation: float, extra: int = 7) -> tuple:
        return (gamma_n(d + extra, accumulation), 2.0 * 1.05 * (2.0 * u_in + u_in * u_in))

    u = 2.0 ** -8
    bf16x3 = (gamma_n(d + 9, acc),
              2.0 * 1.05 * ((3.0 + 4.0 * u) * u * u + gamma_n(2.0 * d, acc) * 2.0 * (1.0 + u) * u))
    return {"fp32": rounded_inputs(0.0, 2.0 ** -24), "bf16x3": bf16x3,
            "tf32": rounded_inputs(2.0 ** -10, acc), "fp16": rounded_inputs(2.0 ** -11, acc),
            "bf16": rounded_inputs(2.0 ** -8, acc)}


def populations(q: torch.Tensor, b: torch.Tensor, k: int, chunk: int = 256
                ) -> dict[str, torch.Tensor]:
    """Per query row, the number of bank rows within the band of each scheme."""
    b = b.double()
    mu = b.mean(0)
    bc = b - mu
    bn = bc.square().sum(1)
    bmax = float(bn.max().sqrt())
    schemes = bounds(b.shape[1])
    out: dict[str, list] = {s: [] for s in schemes}
    for s in range(0, q.shape[0], chunk):
        qc = q[s:s + chunk].double() - mu
        v = bn - 2.0 * qc @ bc.T                       # [rows, M] the expanded form
        vk = v.kthvalue(k, dim=1).values                # the k-th value
        qn = qc.square().sum(1).sqrt()
        for name, (gamma, cross) in schemes.items():
            e = gamma * (qn + bmax) ** 2 + cross * bmax * qn
            out[name].append((v <= (vk + 2.0 * e)[:, None]).sum(1))
    return {name: torch.cat(parts) for name, parts in out.items()}


def _row(data: str, k: int, pops: dict[str, torch.Tensor]) -> str:
    cells = []
    for name, p in pops.items():
        p = p.double()
        q50, q90, q99 = (float(p.quantile(x)) for x in (0.5, 0.9, 0.99))
        over = float((p > 64).double().mean())
        cells.append(f"{q50:.0f} / {q90:.0f} / {q99:.0f} ({100 * over:.1f} %)")
    return f"| {data} | {k} | " + " | ".join(cells) + " |"


def main(n_queries: int = 2000) -> None:
    sets = {}
    f = _common.random_backbone_features("wide_resnet50_2", 85)
    bank, query = f[:16_386], f[21 * 784:]
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(query.shape[0], generator=g)[:n_queries]
    sets["WRN-50 (random weights), 16,386 x 1,024"] = (query[pick], bank)
    gq, gb = torch.randn(n_queries, 1024, generator=g), torch.randn(16_386, 1024, generator=g)
    sets["Gaussian, 16,386 x 1,024"] = (gq, gb)
    try:
        train = _common.bottle_features("train/good")
        rows = torch.randperm(train.shape[0], generator=g)[:16_386]
        test = _common.bottle_features("test")
        sets["Lite0 on bottle, 16,386 x 152"] = (
            test[torch.randperm(test.shape[0], generator=g)[:n_queries]], train[rows])
    except BaseException:  # no MVTec data here (pytest.skip raises a BaseException)
        pass
    names = list(bounds(1024))
    print(f"Band populations, {n_queries} queries per set: median / p90 / p99 (share of "
          f"queries over 64, the register lists' capacity)\n")
    print("| features | k | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for data, (q, b) in sets.items():
        for k in (1, 9):
            print(_row(data, k, populations(q, b, k)), flush=True)
    d = 1024
    print("\nE(q) for ||q|| = bmax = 1 at d = 1,024 (relative to bf16x3): " + ", ".join(
        f"{n} {(4 * gm + cr) / (4 * bounds(d)['bf16x3'][0] + bounds(d)['bf16x3'][1]):.2f}"
        for n, (gm, cr) in bounds(d).items()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
