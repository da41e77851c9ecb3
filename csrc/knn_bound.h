#pragma once
// The error bound of the k-NN kernels' norm expansion, shared by
// the CPU kernel (csrc/cpu/knn.cpp) and the CUDA kernel (csrc/cuda/knn.cu, whose exact
// refinement is csrc/cuda/knn_refine.h). Argument checks are in csrc/common.h.
//
// Why the kernels are exact
// -------------------------
// Selection ranks bank rows b by the expanded form  e(q, b) = ||b||^2 - 2 q.b  (the query
// norm is the same for every b of one query, so it is left out). In float32 the expansion
// loses accuracy when distances are much smaller than the norms: with ||q||, ||b|| ~ 100
// its error is ~1e-3 .. 1e-1 in squared-distance units, larger than a 0.1 distance
// squared. So the kernels
//   0. centre query and bank on the bank's mean mu before the expansion: distances do not
//      change under a common translation, and the norms in the bound below become the
//      data's spread (WideResNet-50 patch features: ||q|| / NN distance drops from ~28 to
//      ~13; pooled ReLU activations sit far from the origin);
//   1. keep candidates per query by the expanded form of the centred rows, with a
//      threshold T such that every bank row that is *not* a candidate has e(q, b) >= T;
//   2. recompute the candidates' squared distances with direct differences of the rows as
//      given (the accurate form, D per candidate) and sort them by (distance, index);
//   3. certify: the expanded form's error is at most E(q) = gamma * (||q|| + max ||b||)^2
//      (centred norms; standard dot-product bound |fl(q.b) - q.b| <= gamma_D ||q|| ||b||
//      for any summation order, plus the few extra roundings of the norms, of the
//      subtraction, and of the centring: fl(x - mu) moves each row by at most u ||x - mu||,
//      which changes a squared distance by at most 2.1 u s^2, s = ||q|| + ||b||, hence
//      gamma_{D+7}). Every non-candidate therefore has true squared distance
//      >= T + ||q||^2 - E(q). If the refined k-th distance is <= that bound, no
//      non-candidate can beat the k winners, and the answer is the exact one (up to the
//      fp32 rounding of the direct distances, the same as the oracle's);
//   4. rows that fail the certificate (more near-ties at the k-th place than the first
//      pass keeps, e.g. many duplicated bank rows) are rescored by a second tiled pass
//      with a wider candidate set that makes the certificate hold by construction (CPU:
//      every row within 3 E of the k-th value, in growable pools; CUDA: candidate counts
//      widened until certified). No row is rescored by a full-bank direct scan plus sort.
// When the current matmul precision lets the GEMM round its inputs (TF32 / bf16, see
// matmul_input_roundoff), or when the CUDA kernel selects with split bf16 GEMMs on tensor
// cores (ExpansionBound::bf16x3), the bound grows accordingly, so the answer stays exact
// and only the number of candidates refined grows.

#include <ATen/Context.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace patchcore_fast {
namespace knn_detail {

// Candidates kept beyond k by the CPU kernel's first-pass pools (with a floor of 64).
constexpr int64_t kExtraCandidates = 4;

// Unit roundoff of the GEMM inputs under the current float32 matmul precision: 0 when the
// GEMM is true fp32 (inputs used as they are), 2^-10 for TF32 and 2^-7 for bf16
// (conservative: covers truncation as well as round-to-nearest).
inline double matmul_input_roundoff(bool cuda) {
  auto& ctx = at::globalContext();
  const auto backend = cuda ? at::Float32Backend::CUDA : at::Float32Backend::MKLDNN;
  const auto p = ctx.float32Precision(backend, at::Float32Op::MATMUL);
  const auto legacy = ctx.float32MatmulPrecision();
  if (p == at::Float32Precision::BF16 || legacy == at::Float32MatmulPrecision::MEDIUM) {
    return std::ldexp(1.0, -7);
  }
  if (p == at::Float32Precision::TF32 || legacy == at::Float32MatmulPrecision::HIGH) {
    return std::ldexp(1.0, -10);
  }
  return 0.0;
}

// Bound on |(e(q, b) + ||q||^2) - ||q - b||^2| for every bank row b, as computed by the
// kernels: E(q) = gamma (||q|| + bmax)^2 + cross ||q|| bmax.
//   Args: qnorm = ||q||, bmax = max_b ||b||, d = width, u_in = matmul_input_roundoff().
struct ExpansionBound {
  double gamma;  // accumulation and centring: gamma_n with 5 % slack
  double cross;  // the GEMM's input representation (rounded or split inputs)

  // fp32 GEMM (inputs rounded to unit roundoff u_in when TF32 / bf16 is allowed).
  ExpansionBound(int64_t d, double u_in) {
    gamma = gamma_n(static_cast<double>(d + 7), std::ldexp(1.0, -24));
    // Rounded inputs: each product q_i b_i is off by (2 u_in + u_in^2) |q_i b_i|, so q.b
    // by that times ||q|| ||b||, and the expansion by twice that.
    cross = 2.0 * 1.05 * (2.0 * u_in + u_in * u_in);
  }

  // The CUDA kernel's tensor-core scheme (csrc/cuda/knn.cu): x = hi(x) + lo(x) + r(x) with
  // hi = bf16(x), lo = bf16(x - hi) (x - hi is exact in fp32), so with u = 2^-8 (bf16
  // round to nearest) |lo| <= (1 + u) u |x| and |r| <= u^2 |x| elementwise. Two bf16 GEMMs
  // with fp32 accumulation give  hi(q).hi(b)  (length d) and  hi(q).lo(b) + lo(q).hi(b)
  // (length 2d); the kernel adds them. Dropped: hi(q).r(b) + lo(q).lo(b) + lo(q).r(b) +
  // r(q).b, at most (3 + 4u) u^2 ||q|| ||b|| (Cauchy-Schwarz on each), twice that in the
  // expansion. Products of bf16 numbers are exact in fp32; the accumulation is where the
  // rest of the error comes from. Tensor cores accumulate in fp32 but may align a block of
  // products to its largest exponent and truncate instead of rounding (Fasi et al. 2021;
  // Khattak and Mikaitis 2024 for Hopper), so the accumulation's unit is taken as 2^-22,
  // four times fp32's round-to-nearest 2^-24: gamma_{d+9} on the hi GEMM (Sigma |products|
  // <= (1 + 3u) ||q|| ||b||, absorbed by the (||q|| + bmax)^2 >= 4 ||q|| bmax form, as are
  // the sum of the two outputs and the norms), and gamma_{2d} times the lo products'
  // 2 (1 + u) u ||q|| ||b|| in the cross term. About 4x the fp32 bound: the candidate
  // band is that much wider, the answer as exact.
  static ExpansionBound bf16x3(int64_t d) {
    ExpansionBound b(d, 0.0);
    const double u = std::ldexp(1.0, -8), acc = std::ldexp(1.0, -22);
    b.gamma = gamma_n(static_cast<double>(d + 9), acc);
    b.cross = 2.0 * 1.05 * ((3.0 + 4.0 * u) * u * u +
                            gamma_n(2.0 * static_cast<double>(d), acc) * 2.0 * (1.0 + u) * u);
    return b;
  }

  // T is double (one row, CPU) or a float64 Tensor[rows] of query norms (CUDA refinement):
  // the one place where the formula is written.
  template <class T>
  T operator()(const T& qnorm, double bmax) const {
    const T s = qnorm + bmax;
    return gamma * s * s + cross * bmax * qnorm;
  }

 private:
  static double gamma_n(double n, double u) { return 1.05 * n * u / (1.0 - n * u); }
};

}  // namespace knn_detail
}  // namespace patchcore_fast
