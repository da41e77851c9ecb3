#pragma once
// Exact refinement and certificate of the CUDA k-NN kernel's candidates, written with ATen
// ops on the current stream (csrc/cuda/knn.cu). The argument for exactness is in
// csrc/knn_bound.h; the CPU kernel does the same per row in csrc/cpu/knn.cpp.

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../knn_bound.h"

namespace patchcore_fast {
namespace knn_detail {

// Exact refinement of selected candidates, with the certificate of knn_bound.h (step 3).
//
// Args:
//   query: Tensor[Q, D] float32 contiguous, the rows as given (direct differences).
//   qn: Tensor[Q] float64, ||q - mu||^2 of the centred rows the selection used.
//   bank: Tensor[M, D] float32 contiguous, as given.
//   cand_idx: Tensor[Q, kc] int64, their bank rows (all valid, distinct per row).
//   thresh: Tensor[Q] float32, T: every non-candidate b has e(q, b) >= T (centred).
//   k: neighbours to return; bound: the expansion's bound; bmax: max ||b - mu||.
//   budget_bytes: bound on the scratch memory of each step.
//   out_d / out_i: Tensor[Q, k] float32 / int64, written for every row.
// Returns:
//   Tensor[Q] bool: the rows whose certificate failed (their outputs are to be redone
//   with a wider candidate set). All false when kc == M (the whole bank was refined).
inline at::Tensor refine_candidates_aten(const at::Tensor& query, const at::Tensor& qn,
                                         const at::Tensor& bank, const at::Tensor& cand_idx,
                                         const at::Tensor& thresh, int64_t k,
                                         const ExpansionBound& bound, double bmax,
                                         int64_t budget_bytes, at::Tensor& out_d,
                                         at::Tensor& out_i) {
  const int64_t q_rows = query.size(0), m = bank.size(0), d = bank.size(1);
  const int64_t kc = cand_idx.size(1);
  at::Tensor failed = at::zeros({q_rows}, query.options().dtype(at::kBool));
  // In query chunks, so that the gathered [c, kc, D] candidate rows stay within the budget.
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
      // Certificate, in float64: k-th refined distance <= T + ||q - mu||^2 - E(q).
      auto qn_c = qn.narrow(0, s, c);
      auto lower = thresh.narrow(0, s, c).to(at::kDouble) + qn_c - bound(qn_c.sqrt(), bmax);
      auto kth_sq = sq.gather(1, perm.narrow(1, k - 1, 1)).squeeze(1);
      failed.narrow(0, s, c).copy_(kth_sq.to(at::kDouble).le(lower).logical_not());
    }
  }
  return failed;
}

}  // namespace knn_detail
}  // namespace patchcore_fast
