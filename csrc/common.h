#pragma once
// Argument checks shared by the CPU and CUDA kernels. Messages quote the bad value, so a
// user sees what was passed, not just that something was wrong.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

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

}  // namespace patchcore_fast
