#pragma once
// Exact refinement and certificate of the CUDA k-NN kernel's candidates, written with ATen
// ops on the current stream (csrc/cuda/knn.cu). The argument for exactness is in
// csrc/knn_bound.h; the CPU kernel does the same per row in csrc/cpu/knn.cpp.

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../knn_bound.h"

namespace patchcore_fast {
namespace knn_detail {

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
      auto lower = thresh.narrow(0, s, c).to(at::kDouble) + qn - bound(qn.sqrt(), bmax);
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
