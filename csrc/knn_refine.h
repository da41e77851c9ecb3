#pragma once
// Pieces of the k-NN operator shared by the CPU and CUDA kernels: argument checks, the
// candidate count, the error bound of the norm expansion, and (for the CUDA kernel) the
// exact refinement of the selected candidates written with ATen ops.
//
// Why the kernels are exact
// -------------------------
// Selection ranks bank rows b by the expanded form  e(q, b) = ||b||^2 - 2 q.b  (the query
// norm is the same for every b of one query, so it is left out). In float32 the expansion
// loses accuracy when distances are much smaller than the norms: with ||q||, ||b|| ~ 100
// its error is ~1e-3 .. 1e-1 in squared-distance units, larger than a 0.1 distance
// squared. So the kernels
//   1. keep kc = k + kExtraCandidates candidates per query by the expanded form (some
//      more stay in the running pool for free), with a threshold T such that every bank
//      row that is *not* a candidate has e(q, b) >= T;
//   2. recompute the candidates' squared distances with direct differences (the accurate
//      form, k x D per query) and sort them by (distance, index);
//   3. certify: the expanded form's error is at most E(q) = gamma * (||q|| + max ||b||)^2
//      (standard dot-product bound |fl(q.b) - q.b| <= gamma_D ||q|| ||b|| for any summation
//      order, plus the few extra roundings of the norms and of the subtraction). Every
//      non-candidate therefore has true squared distance >= T + ||q||^2 - E(q). If the
//      refined k-th distance is <= that bound, no non-candidate can beat the k winners,
//      and the answer is the exact one (up to the fp32 rounding of the direct distances,
//      the same as the oracle's);
//   4. rows that fail the certificate (near-ties at the k-th place finer than the
//      expansion can resolve, e.g. tight clusters far from the origin) are recomputed with
//      an exact scan over the whole bank with direct differences. On Gaussian or real
//      PatchCore features this is rare; the answer stays exact either way.
// When the current matmul precision lets the GEMM round its inputs (TF32 / bf16, see
// matmul_input_roundoff) the bound grows accordingly, so the answer stays exact and only
// the share of rows that need the exact scan grows.

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"

namespace patchcore_fast {
namespace knn_detail {

// Candidates kept beyond k so that near-ties around the k-th place are refined exactly.
constexpr int64_t kExtraCandidates = 4;

// Candidates selected by the expanded form: k + extra, capped at the bank size.
inline int64_t candidate_count(int64_t k, int64_t m) {
  return std::min<int64_t>(k + kExtraCandidates, m);
}

// NaN / Inf check in O(1) extra memory (at::isfinite on the whole input would allocate
// several input-sized temporaries). A finite sum proves every element finite, since Inf
// and NaN propagate through additions; only when the sum is not finite (a bad value, or a
// rare overflow of finite ones) are the rows inspected, in bounded chunks.
inline void check_finite_lowmem(const at::Tensor& t, const char* name) {
  if (t.numel() == 0 || std::isfinite(t.sum().item<double>())) return;
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, t.size(1)));
  for (int64_t r = 0; r < t.size(0); r += rows) {
    check_finite(t.narrow(0, r, std::min(rows, t.size(0) - r)), name);
  }
}

// All argument checks of knn(query, bank, k), with the bad value in each message.
inline void check_knn_args(const at::Tensor& query, const at::Tensor& bank, int64_t k) {
  check_matrix(query, "query");
  check_matrix(bank, "bank");
  TORCH_CHECK(query.device() == bank.device(),
              "query and bank should be on the same device, got query on ", query.device(),
              " and bank on ", bank.device());
  TORCH_CHECK(query.size(1) == bank.size(1),
              "query and bank should have the same width (columns), got query ",
              query.sizes(), " and bank ", bank.sizes());
  TORCH_CHECK(bank.size(1) > 0, "bank has zero columns (shape ", bank.sizes(), ")");
  TORCH_CHECK(bank.size(0) > 0, "bank is empty (0 rows, shape ", bank.sizes(), ")");
  TORCH_CHECK(bank.size(0) < std::numeric_limits<int32_t>::max(),
              "bank has too many rows (", bank.size(0), "); at most 2^31 - 2 supported");
  TORCH_CHECK(k >= 1 && k <= bank.size(0), "k should be between 1 and the bank size ",
              bank.size(0), ", got k=", k);
  check_finite_lowmem(query, "query");
  check_finite_lowmem(bank, "bank");
}

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
// kernels (GEMM in fp32, or with inputs rounded to unit roundoff u_in).
//   Args: qnorm = ||q||, bmax = max_b ||b||, d = width, u_in = matmul_input_roundoff().
struct ExpansionBound {
  double gamma;  // fp32 accumulation: gamma_{d+4} with 5 % slack
  double u_in;
  ExpansionBound(int64_t d, double u_in_) : u_in(u_in_) {
    const double u = std::ldexp(1.0, -24);
    const double n = static_cast<double>(d + 4);
    gamma = 1.05 * n * u / (1.0 - n * u);
  }
  double operator()(double qnorm, double bmax) const {
    const double s = qnorm + bmax;
    // Rounded inputs: each product q_i b_i is off by (2 u_in + u_in^2) |q_i b_i|, so q.b
    // by that times ||q|| ||b||, and the expansion by twice that.
    return gamma * s * s + 2.0 * 1.05 * (2.0 * u_in + u_in * u_in) * qnorm * bmax;
  }
};

// Exact refinement of selected candidates with ATen ops (used by the CUDA kernel).
//
// Args:
//   query: Tensor[Q, D] float32 contiguous.
//   bank: Tensor[M, D] float32 contiguous.
//   cand_idx: Tensor[Q, kc] int64, their bank rows (all valid, distinct per row).
//   thresh: Tensor[Q] float32, T: every non-candidate b has e(q, b) >= T.
//   k: neighbours to return; bmax: max bank row norm; u_in: matmul_input_roundoff().
//   budget_bytes: bound on the scratch memory of each step.
// Returns:
//   (Tensor[Q, k] float32 Euclidean distances ascending, Tensor[Q, k] int64 indices);
//   rows that fail the certificate are recomputed with an exact scan of the bank.
inline std::tuple<at::Tensor, at::Tensor> refine_candidates_aten(
    const at::Tensor& query, const at::Tensor& bank, const at::Tensor& cand_idx,
    const at::Tensor& thresh, int64_t k, double bmax, double u_in, int64_t budget_bytes) {
  const int64_t q_rows = query.size(0), m = bank.size(0), d = bank.size(1);
  const int64_t kc = cand_idx.size(1);
  auto out_d = at::empty({q_rows, k}, query.options());
  auto out_i = at::empty({q_rows, k}, query.options().dtype(at::kLong));
  if (q_rows == 0) return {out_d, out_i};
  const ExpansionBound bound(d, u_in);
  std::vector<at::Tensor> failed;

  // Step 1-3: refine and certify, in query chunks so that the gathered [c, kc, D]
  // candidate rows stay within the budget.
  const int64_t per_row = std::max<int64_t>(1, kc * d * 4 * 3);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(q_rows, budget_bytes / per_row));
  for (int64_t s = 0; s < q_rows; s += chunk) {
    const int64_t c = std::min(chunk, q_rows - s);
    auto q = query.narrow(0, s, c);
    // Sort candidates by index first, so that the stable sort by distance below breaks
    // exact ties by the lower bank index.
    auto idx = std::get<0>(at::sort(cand_idx.narrow(0, s, c), 1));
    auto rows = bank.index_select(0, idx.reshape({-1})).view({c, kc, d});
    auto sq = (rows - q.unsqueeze(1)).square_().sum(2);  // [c, kc] direct differences
    // Rank on the distances as returned (after the square root), so that "lower index
    // first" holds for equal returned values.
    auto dist = sq.clamp_min(0).sqrt();
    auto sorted = at::sort(dist, /*stable=*/true, /*dim=*/1, /*descending=*/false);
    auto perm = std::get<1>(sorted).narrow(1, 0, k);
    out_d.narrow(0, s, c).copy_(std::get<0>(sorted).narrow(1, 0, k));
    out_i.narrow(0, s, c).copy_(idx.gather(1, perm));
    if (kc < m) {
      // Certificate, in float64: k-th refined distance <= T + ||q||^2 - E(q).
      auto qn = q.to(at::kDouble).square().sum(1);
      auto qnorm = qn.sqrt();
      auto s_ = qnorm + bmax;
      auto e = bound.gamma * s_ * s_ +
               2.0 * 1.05 * (2.0 * bound.u_in + bound.u_in * bound.u_in) * bmax * qnorm;
      auto lower = thresh.narrow(0, s, c).to(at::kDouble) + qn - e;
      auto kth_sq = sq.gather(1, perm.narrow(1, k - 1, 1)).squeeze(1);
      auto ok = kth_sq.to(at::kDouble).le(lower);
      failed.push_back(ok.logical_not().nonzero().reshape({-1}) + s);
    }
  }
  if (failed.empty()) return {out_d, out_i};

  // Step 4: exact scan for the rows whose k-th place the expansion could not resolve.
  auto bad = at::cat(failed);  // one host sync below (its size)
  const int64_t nbad = bad.numel();
  if (nbad == 0) return {out_d, out_i};
  const int64_t scan_chunk =
      std::max<int64_t>(1, std::min<int64_t>(nbad, budget_bytes / std::max<int64_t>(1, m * 24)));
  for (int64_t s = 0; s < nbad; s += scan_chunk) {
    const int64_t c = std::min(scan_chunk, nbad - s);
    auto rows = bad.narrow(0, s, c);
    auto q = query.index_select(0, rows);
    auto dist = at::cdist(q, bank, 2.0, /*compute_mode=donot_use_mm*/ 2);  // [c, M]
    // Stable sort: equal distances keep the lower bank index first.
    auto sorted = at::sort(dist, /*stable=*/true, /*dim=*/1, /*descending=*/false);
    out_d.index_copy_(0, rows, std::get<0>(sorted).narrow(1, 0, k).contiguous());
    out_i.index_copy_(0, rows, std::get<1>(sorted).narrow(1, 0, k).contiguous());
  }
  return {out_d, out_i};
}

}  // namespace knn_detail
}  // namespace patchcore_fast
