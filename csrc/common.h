#pragma once
// Argument checks shared by the CPU and CUDA kernels. Messages quote the bad value, so a
// user sees what was passed, not just that something was wrong.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace patchcore_fast {

// Bad arguments raise ValueError in Python (TORCH_CHECK_VALUE), as the wrappers in
// patchcore_fast/ops.py did before they left the checks to the kernels. (coreset_shard_step
// still raises RuntimeError from its own checks and check_matrix; issue #25 rewrites it.)

// Why t is not a float32 matrix, or "" when it is.
inline std::string matrix_problem(const at::Tensor& t, const char* name) {
  if (t.dim() != 2) {
    return c10::str(name, " should be a 2-D tensor [rows, dim], got ", t.dim(), "-D with shape ",
                    t.sizes());
  }
  if (t.scalar_type() != at::kFloat) {
    return c10::str(name, " should be float32, got ", t.scalar_type());
  }
  return "";
}

inline void check_matrix(const at::Tensor& t, const char* name) {
  const std::string p = matrix_problem(t, name);
  TORCH_CHECK(p.empty(), p);
}

inline void check_matrix_value(const at::Tensor& t, const char* name) {
  const std::string p = matrix_problem(t, name);
  TORCH_CHECK_VALUE(p.empty(), p);
}

// NaN / Inf check of every row, in bounded chunks (at::isfinite on the whole input would
// allocate several input-sized temporaries). NaN or Inf would make every distance
// comparison meaningless (and NaN breaks the arg-max/min orderings), so refuse them.
inline void check_finite_rows(const at::Tensor& t, const char* name) {
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, t.size(1)));
  for (int64_t r = 0; r < t.size(0); r += rows) {
    const at::Tensor part = t.narrow(0, r, std::min(rows, t.size(0) - r));
    TORCH_CHECK_VALUE(at::isfinite(part).all().item<bool>(), name, " contains NaN or Inf values");
  }
}

// The same in O(1) extra memory where all is well: a finite sum proves every element
// finite, since Inf and NaN propagate through additions; only when the sum is not finite
// (a bad value, or a rare overflow of finite ones) are the rows inspected.
inline void check_finite_lowmem(const at::Tensor& t, const char* name) {
  if (t.numel() == 0 || std::isfinite(t.sum().item<double>())) return;
  check_finite_rows(t, name);
}

// Arguments of greedy_coreset, shared by the CPU and CUDA kernels.
//   features: Tensor[N, D] float32, N >= 1, D >= 1, finite; k in [1, N]; start in [0, N).
// Indices are kept as 32-bit integers inside the kernels, so N must fit in int32.
// check_values=false leaves the NaN / Inf check to a kernel that fuses it with its first
// pass over the data (it must then raise the same message, with TORCH_CHECK_VALUE).
inline void check_greedy_coreset_args(const at::Tensor& features, int64_t k, int64_t start,
                                      bool check_values = true) {
  check_matrix_value(features, "features");
  const int64_t n = features.size(0);
  TORCH_CHECK_VALUE(n > 0, "features is empty (shape ", features.sizes(),
                    "): nothing to select from");
  TORCH_CHECK_VALUE(features.size(1) > 0, "features has zero columns (shape ",
                    features.sizes(), ")");
  TORCH_CHECK_VALUE(n <= static_cast<int64_t>(INT32_MAX), "features has ", n,
                    " rows; at most 2^31 - 1 are supported");
  TORCH_CHECK_VALUE(k >= 1 && k <= n, "k should be between 1 and the number of rows ", n,
                    ", got ", k);
  TORCH_CHECK_VALUE(start >= 0 && start < n, "start should be a row index in [0, ", n,
                    "), got ", start);
  if (check_values) check_finite_lowmem(features, "features");
}

// Arguments of knn, shared by the CPU and CUDA kernels.
//   query: Tensor[Q, D] float32, finite; bank: Tensor[M, D] float32, same device and width,
//   1 <= M < 2^31 - 1 (indices are 32-bit inside the kernels); k in [1, M].
// The bank's NaN / Inf check is left to the kernels, which fold it into the pass over the
// bank they make anyway (its centred norms): a scoring call does not scan the bank a
// second time. They must raise "bank contains NaN or Inf values" (check_finite_rows).
inline void check_knn_args(const at::Tensor& query, const at::Tensor& bank, int64_t k) {
  check_matrix_value(query, "query");
  check_matrix_value(bank, "bank");
  TORCH_CHECK_VALUE(query.device() == bank.device(),
                    "query and bank should be on the same device, got query on ",
                    query.device(), " and bank on ", bank.device());
  TORCH_CHECK_VALUE(query.size(1) == bank.size(1),
                    "query and bank should have the same width (columns), got query ",
                    query.sizes(), " and bank ", bank.sizes());
  TORCH_CHECK_VALUE(bank.size(1) > 0, "bank has zero columns (shape ", bank.sizes(), ")");
  TORCH_CHECK_VALUE(bank.size(0) > 0, "bank is empty (0 rows, shape ", bank.sizes(),
                    "): fit a model first");
  TORCH_CHECK_VALUE(bank.size(0) < std::numeric_limits<int32_t>::max(),
                    "bank has too many rows (", bank.size(0), "); at most 2^31 - 2 supported");
  TORCH_CHECK_VALUE(k >= 1 && k <= bank.size(0), "k should be between 1 and the bank size ",
                    bank.size(0), ", got k=", k);
  check_finite_lowmem(query, "query");
}

// Arguments of knn_bank, shared by the CPU and CUDA kernels (each checks its device):
//   bank: Tensor[M, D] float32 with M, D >= 1; its NaN / Inf check rides on the kernel's
//   own pass over it.
inline void check_knn_bank_args(const at::Tensor& bank) {
  check_matrix_value(bank, "bank");
  TORCH_CHECK_VALUE(bank.size(0) > 0 && bank.size(1) > 0,
                    "bank should have rows and columns, got shape ", bank.sizes());
}

// The variant arguments of knn_stats (schema in csrc/ops.cpp), checked by both kernels so
// that one call is valid on either device:
//   gemm: the CUDA kernel's ranking GEMM, "auto" (the tensor-core split bf16x3 where this
//     torch has the dtype-out GEMM it needs, else fp32), "fp32" or "bf16x3" (the CPU kernel
//     always runs a true fp32 GEMM);
//   project: the CPU kernel's projected pre-pass, "auto" (its rule), "off" or "force"
//     (whenever valid); CUDA has none;
//   project_bound_scale: multiplies the pre-pass's lower bound; 1 in use, > 1 invalid (a
//     test shows that this breaks exactness).
inline void check_knn_variant(c10::string_view gemm, c10::string_view project,
                              double project_bound_scale) {
  TORCH_CHECK_VALUE(gemm == "auto" || gemm == "fp32" || gemm == "bf16x3",
                    "gemm should be auto, fp32 or bf16x3, got '", gemm, "'");
  TORCH_CHECK_VALUE(project == "auto" || project == "off" || project == "force",
                    "project should be auto, off or force, got '", project, "'");
  TORCH_CHECK_VALUE(project_bound_scale > 0.0, "project_bound_scale should be > 0, got ",
                    project_bound_scale);
}

}  // namespace patchcore_fast
