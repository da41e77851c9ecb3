#pragma once
// Argument checks of coreset_shard_step, shared by the CPU and CUDA kernels (shapes,
// dtypes and ranges only: no check reads tensor values, so none syncs with a GPU).

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common.h"

namespace patchcore_fast {

// Args:
//   shard: Tensor[N_r, D] float32, this rank's rows (global rows offset .. offset + N_r).
//   candidates: Tensor[R, D + 2] int32, one record per rank (see greedy_coreset.cpp).
//   offset: global index of the shard's first row; offset + N_r <= 2^31 - 1.
//   min_d: Tensor[N_r] float32, updated in place; indices: Tensor[k] int64, updated in
//   place at `step`, 0 <= step < k.
inline void check_coreset_shard_step_args(const at::Tensor& shard, const at::Tensor& candidates,
                                          int64_t offset, const at::Tensor& min_d,
                                          const at::Tensor& indices, int64_t step) {
  check_matrix(shard, "shard");
  TORCH_CHECK(candidates.dim() == 2 && candidates.scalar_type() == at::kInt,
              "candidates should be a 2-D int32 tensor [ranks, D + 2], got ",
              candidates.scalar_type(), " with shape ", candidates.sizes());
  const int64_t n = shard.size(0), d = shard.size(1);
  TORCH_CHECK(d > 0, "shard has zero columns (shape ", shard.sizes(), ")");
  TORCH_CHECK(candidates.size(0) > 0 && candidates.size(1) == d + 2,
              "candidates should be [ranks, D + 2] = [ranks, ", d + 2, "] (a packed key in 2 "
              "words, then a row of shard's width ", d, "), got shape ", candidates.sizes());
  TORCH_CHECK(offset >= 0 && offset + n <= static_cast<int64_t>(INT32_MAX),
              "offset should be >= 0 with offset + shard rows <= 2^31 - 1, got offset ", offset,
              " and ", n, " rows");
  TORCH_CHECK(min_d.dim() == 1 && min_d.size(0) == n && min_d.scalar_type() == at::kFloat,
              "min_d should be a float32 Tensor[", n, "] (one per shard row), got ",
              min_d.scalar_type(), " with shape ", min_d.sizes());
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong,
              "indices should be a 1-D int64 tensor, got ", indices.scalar_type(),
              " with shape ", indices.sizes());
  TORCH_CHECK(step >= 0 && step < indices.size(0), "step should be in [0, ", indices.size(0),
              ") (the length of indices), got ", step);
  TORCH_CHECK(shard.device() == candidates.device() && shard.device() == min_d.device() &&
                  shard.device() == indices.device(),
              "coreset_shard_step: shard, candidates, min_d and indices should be on one "
              "device, got ", shard.device(), ", ", candidates.device(), ", ", min_d.device(),
              ", ", indices.device());
}

}  // namespace patchcore_fast
