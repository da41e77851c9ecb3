#pragma once
// The projected lower-bound pre-pass of the CPU k-NN kernel (csrc/cpu/knn.cpp): on wide
// low-rank data (real CNN patch features) it ranks the bank on 32 principal coordinates,
// refines the best rows until a rigorous lower bound proves the rest cannot enter, and
// leaves the rows it cannot certify to the exact passes. The bound, its float32 error
// terms and the rule that takes it are in knn_project.cpp.

#include <ATen/ATen.h>
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

// The bank's side of the pre-pass: what depends on the bank alone, so that a bank scoring
// many queries builds it once (the knn_bank op) instead of on every call (about 40 % of a
// one-image k-NN on WideResNet-50 features: bench/RESULTS.md, "Bank operands kept").
struct Basis {
  bool ok = false;          // false: no pre-pass on this bank (no LAPACK in this build, a
                            // GEMM with reduced-precision inputs, a basis not near
                            // orthonormal, or the captured share below the minimum asked)
  at::Tensor U;             // [D, r] float32: an almost orthonormal basis
  at::Tensor pb;            // [M, r] float32: fl(U^T fl(b - mu)), the projected bank
  at::Tensor pbn;           // [M] float32: ||pb||^2 in double, rounded once
  double pbmax = 0.0;       // max ||pb|| (from pbn, nudged up)
  double captured = 0.0;    // share of the bank sample's squared norm on the r axes
  double one_delta = 1.0;   // 1 + delta >= sigma_max(U), measured
};

// Builds the basis of a bank (the randomized range finder, its check and the projected
// bank). min_captured: below this captured share the projection is not made (ok = false);
// 0 makes it whenever it is valid (knn_bank: the rule is applied per call).
//   bank: [m, d] row-major float32; mean: [d] its mean (the centre).
Basis make_basis(const float* bank, const float* mean, int64_t m, int64_t d,
                 double min_captured);

// Runs the pre-pass over the query rows 0 .. nq - 1 where the mode (and, for kAuto, the
// rule) takes it; writes the answer of every row it certifies.
// Args:
//   query: [nq, d], bank: [m, d] row-major float32 as given; mean: [d] the bank's mean;
//   bmax: max ||fl(b - mu)|| over the bank rows; k: neighbours per query, 1 <= k <= m;
//   bound_scale: multiplies the lower bound (1 in use; > 1 makes it invalid: a test
//   shows that this breaks exactness, i.e. that the bound is what keeps the answer exact).
//   out_d, out_i: [nq, k], the kernel's outputs.
//   basis: the bank's, built beforehand by make_basis(..., 0) on this bank and mean; null:
//     built here when the rule takes the pre-pass. Either way the same rule decides, and
//     the same basis (seeded) gives the same answer and statistics.
// Returns: the rows left (every row, in order, when the pre-pass is not taken) and counts.
Result prepass(const float* query, const float* bank, const float* mean, int64_t nq,
               int64_t m, int64_t d, int64_t k, double bmax, Mode mode, double bound_scale,
               float* out_d, int64_t* out_i, const Basis* basis = nullptr);

}  // namespace knn_project
}  // namespace patchcore_fast
