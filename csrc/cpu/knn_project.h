#pragma once
// The projected lower-bound pre-pass of the CPU k-NN kernel (csrc/cpu/knn.cpp): on wide
// low-rank data (real CNN patch features) it ranks the bank on 32 principal coordinates,
// refines the best rows until a rigorous lower bound proves the rest cannot enter, and
// leaves the rows it cannot certify to the exact passes. The bound, its float32 error
// terms and the rule that takes it are in knn_project.cpp.

#include <c10/util/string_view.h>

#include <cstdint>
#include <vector>

namespace patchcore_fast {
namespace knn_project {

// When the pre-pass runs (knn_stats's `project` argument; knn uses kAuto).
enum class Mode {
  kAuto,   // when the rule says it pays: width, work, captured variance, a pilot
  kOff,    // never
  kForce,  // whenever it is valid (D >= 32, M > c, fp32 GEMM, LAPACK): no rule, no pilot
};

// knn_stats's `project` ("auto", "off" or "force", checked by check_knn_variant).
inline Mode parse_mode(c10::string_view s) {
  return s == "off" ? Mode::kOff : s == "force" ? Mode::kForce : Mode::kAuto;
}

struct Result {
  std::vector<int64_t> rest;  // query rows left to the exact passes, in the order to run them
  int64_t rows = 0;           // query rows sent through the pre-pass
  int64_t certified = 0;      // of those, rows it settled (answer written)
  int64_t refined = 0;        // candidates refined with direct differences
};

// Runs the pre-pass over the query rows 0 .. nq - 1 where the mode (and, for kAuto, the
// rule) takes it; writes the answer of every row it certifies.
// Args:
//   query: [nq, d], bank: [m, d] row-major float32 as given; mean: [d] the bank's mean;
//   bmax: max ||fl(b - mu)|| over the bank rows; k: neighbours per query, 1 <= k <= m;
//   bound_scale: multiplies the lower bound (1 in use; > 1 makes it invalid: a test
//   shows that this breaks exactness, i.e. that the bound is what keeps the answer exact).
//   out_d, out_i: [nq, k], the kernel's outputs.
// Returns: the rows left (every row, in order, when the pre-pass is not taken) and counts.
Result prepass(const float* query, const float* bank, const float* mean, int64_t nq,
               int64_t m, int64_t d, int64_t k, double bmax, Mode mode, double bound_scale,
               float* out_d, int64_t* out_i);

}  // namespace knn_project
}  // namespace patchcore_fast
