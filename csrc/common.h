#pragma once
// Argument checks shared by the CPU and CUDA kernels. Messages quote the bad value, so a
// user sees what was passed, not just that something was wrong.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace patchcore_fast {

inline void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " should be a 2-D tensor [rows, dim], got ", t.dim(),
              "-D with shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " should be float32, got ",
              t.scalar_type());
}

inline void check_finite(const at::Tensor& t, const char* name) {
  // One reduction over the input; NaN or Inf would make every distance comparison
  // meaningless (and NaN breaks the arg-max/min orderings), so refuse them up front.
  TORCH_CHECK(t.numel() == 0 || at::isfinite(t).all().item<bool>(), name,
              " contains NaN or Inf values");
}

// Arguments of greedy_coreset, shared by the CPU and CUDA kernels.
//   features: Tensor[N, D] float32, N >= 1, D >= 1, finite; k in [1, N]; start in [0, N).
// Indices are kept as 32-bit integers inside the kernels, so N must fit in int32.
// check_values=false leaves the NaN / Inf check to a kernel that fuses it with its first
// pass over the data (it must then raise the same message).
inline void check_greedy_coreset_args(const at::Tensor& features, int64_t k, int64_t start,
                                      bool check_values = true) {
  check_matrix(features, "features");
  const int64_t n = features.size(0);
  TORCH_CHECK(n > 0, "features is empty (shape ", features.sizes(),
              "): nothing to select from");
  TORCH_CHECK(features.size(1) > 0, "features has zero columns (shape ", features.sizes(), ")");
  TORCH_CHECK(n <= static_cast<int64_t>(INT32_MAX), "features has ", n,
              " rows; at most 2^31 - 1 are supported");
  TORCH_CHECK(k >= 1 && k <= n, "k should be between 1 and the number of rows ", n,
              ", got ", k);
  TORCH_CHECK(start >= 0 && start < n, "start should be a row index in [0, ", n, "), got ",
              start);
  if (check_values) check_finite(features, "features");
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

// Arguments of knn, shared by the CPU and CUDA kernels.
//   query: Tensor[Q, D] float32, finite; bank: Tensor[M, D] float32, finite, same device
//   and width, 1 <= M < 2^31 - 1 (indices are 32-bit inside the kernels); k in [1, M].
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

}  // namespace patchcore_fast
