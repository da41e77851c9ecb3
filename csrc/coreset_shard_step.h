#pragma once
// The distributed coreset's per-rank ops, coreset_shard_state and coreset_shard_step:
// what their records and states hold, and their argument checks, shared by the CPU and
// CUDA kernels (shapes, dtypes and ranges only: no check reads tensor values, so none
// syncs with a GPU).
//
// A record is int32[D + 2]: words 0-1 hold a packed key (pack_key's 64 bits, stored as
// they lie in memory), words 2.. the float32 bits of that point's row. Key 0 means "no
// point". Integer words, not floats: the key's low word is a NaN pattern as a float, and
// NaNs do not compare equal (nor survive every copy path bit for bit).
//
// A rank's state (coreset_shard_state makes it, coreset_shard_step updates it in place;
// its layout is the kernel's own, the Python loop only carries it):
// Both kinds start each row's min_d at the op's `start` (its squared distance to centres
// chosen before the run; +inf without one), so a run continues an earlier selection.
//   lazy (CPU, the default there: csrc/cpu/coreset_shard.cpp), 7 tensors:
//     0 ub      float32[N_r]     upper bound of each row's min_d (min of its start and of
//                                the first seen[i] centres; -1 once selected)
//     1 seen    int32[N_r]       centres each row has been compared with (or skipped by
//                                the bound)
//     2 heap    int64[N_r + 1]   [0] = h, [1 .. h] a 4-ary max-heap (key_heap.h) of the
//                                local keys pack_key(ub[i], i) of the unselected rows other
//                                than this rank's pending offer
//     3 coords  float32[N_r or 0, 32]  the rows on the bound's axes (coreset_bound.h);
//                                0 rows when D < 64
//     4 axes    float64[D + 1, 32]  rows 0..D-1 the axes V; row D = (on, eta, slack)
//     5 centres float32[k, D]    the centres' rows, in selection order
//     6 ccoords float32[L]       the centres' bound coordinates, lead / tail layout
//                                (lazy_argmax.h), L = ceil(k/8)*8*8 + 24k (0 when D < 64)
//   plain (CUDA always, csrc/cuda/greedy_coreset.cu; CPU with lazy=False: one pass over
//   the shard per step, every distance computed, the oracle of the tests), 1 tensor:
//     0 min_d   float32[N_r]     each row's min_d (its start before the first step, -1
//                                once selected)

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "common.h"

namespace patchcore_fast {

// Number of state tensors of each kind (see above).
constexpr size_t kShardStateLazy = 7;
constexpr size_t kShardStatePlain = 1;

// Args:
//   shard: Tensor[N_r, D] float32, this rank's rows (global rows offset .. offset + N_r).
//   k: centres to select, >= 1.
//   start: Tensor[N_r] float32 on the shard's device, or undefined.
inline void check_coreset_shard_state_args(const at::Tensor& shard, int64_t k,
                                           const std::optional<at::Tensor>& start) {
  check_matrix(shard, "shard");
  TORCH_CHECK(shard.size(1) > 0, "shard has zero columns (shape ", shard.sizes(), ")");
  TORCH_CHECK(k >= 1, "k should be >= 1, got ", k);
  if (start.has_value() && start->defined()) {
    TORCH_CHECK(start->scalar_type() == at::kFloat && start->dim() == 1 &&
                    start->size(0) == shard.size(0) && start->device() == shard.device(),
                "start should be a float32 Tensor[", shard.size(0), "] on ", shard.device(),
                " (one squared distance per row of the shard), got ", start->scalar_type(),
                " with shape ", start->sizes(), " on ", start->device());
  }
}

// The rows' starting min_d: a copy of `start`, or +inf for every row without one.
inline at::Tensor shard_start(const at::Tensor& shard, const std::optional<at::Tensor>& start) {
  if (start.has_value() && start->defined()) return start->contiguous().clone();
  return at::full({shard.size(0)}, std::numeric_limits<float>::infinity(), shard.options());
}

// One state tensor: its dtype, its shape, contiguous, on the shard's device.
inline void check_state_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                               at::IntArrayRef shape, const at::Tensor& shard) {
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == shape && t.is_contiguous() &&
                  t.device() == shard.device(),
              "coreset_shard_step: state tensor ", name, " should be a contiguous ", dtype,
              " Tensor", shape, " on ", shard.device(), " (as coreset_shard_state makes it), got ",
              t.scalar_type(), " with shape ", t.sizes(), " on ", t.device());
}

// Args:
//   shard: Tensor[N_r, D] float32, this rank's rows (global rows offset .. offset + N_r).
//   candidates: Tensor[R, D + 2] int32, one record per rank.
//   offset: global index of the shard's first row; offset + N_r <= 2^31 - 1.
//   state: this rank's state (its tensors are checked by the kernel).
//   indices: Tensor[k] int64, updated in place at `step`, 0 <= step < k.
inline void check_coreset_shard_step_args(const at::Tensor& shard, const at::Tensor& candidates,
                                          int64_t offset, const at::Tensor& indices,
                                          int64_t step) {
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
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong && indices.is_contiguous(),
              "indices should be a contiguous 1-D int64 tensor, got ", indices.scalar_type(),
              " with shape ", indices.sizes());
  TORCH_CHECK(step >= 0 && step < indices.size(0), "step should be in [0, ", indices.size(0),
              ") (the length of indices), got ", step);
  TORCH_CHECK(shard.device() == candidates.device() && shard.device() == indices.device(),
              "coreset_shard_step: shard, candidates and indices should be on one device, got ",
              shard.device(), ", ", candidates.device(), ", ", indices.device());
}

}  // namespace patchcore_fast
