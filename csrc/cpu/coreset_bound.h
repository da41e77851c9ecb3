#pragma once
// An exact filter for the CPU coreset: a cheap lower bound of ||x - c||^2 that proves,
// for almost every (point, centre) pair the lazy greedy visits, that the centre cannot
// lower the point's min_d, so its 128-d distance need not be computed.
//
// The bound. Let V be a D x m matrix with orthonormal columns (m = 32 here: the data's
// leading principal axes). Projection onto a subspace never lengthens a vector, so
//     ||x - c|| >= ||V^T (x - c)||   for every x, c,
// and the right side costs m coordinates instead of D. On PatchCore features (a random
// projection of CNN embeddings, whose variance sits in few directions) the first 8 axes
// carry 82 % of the variance and 32 axes 98 %; at bottle 10 %, 98.4 % of the distances
// the lazy loop evaluates are provably too large from 8 axes, 99.7 % from 32.
//
// Two stages per centre group (greedy_coreset.cpp): the first 8 axes for 8 centres at once
// (one vector per axis, no horizontal sums), then, for the few centres that pass, the
// other 24 axes; only a centre that passes both gets its exact distance (sqdist.h, the
// same bits as ever). Skipping a centre is exact: it is skipped only when its computed
// distance would be >= u, and then min(u, distance) == u bit for bit.
//
// Floating point (why "provably"). With y = fl32(V^T x), computed in double and rounded:
//   * rounding each coordinate to float32 moves y by at most 2^-24 ||V^T x|| <= 2^-24 ||x||
//     (the double products add ~D 2^-53 ||x||, far below the 2 % margin taken on eta), so
//     ||V^T (x - c)|| >= ||y_x - y_c|| - eta, eta = 1.02 * 2^-23 * max_i ||x_i||;
//   * the computed L = sum_j (y_xj - y_cj)^2 has non-negative terms, each rounded at most
//     m + 8 times: L <= (1 + g) ||y_x - y_c||^2 with g = (m + 8) 2^-24 (1 + tiny);
//   * sqdist's direct differences (non-negative terms too, D / 8 + 5 roundings each) give
//     sqdist(x, c) >= (1 - gD) ||x - c||^2 with gD = (D + 2) 2^-24;
//   * V's columns are orthonormal to ~1e-14 (Gram-Schmidt twice in double).
// So L > T(u) = (sqrt(u) s + eta)^2 with s^2 >= (1 + g)(1 + 1e-13) / (1 - gD) implies
// ||x - c|| > sqrt(u / (1 - gD)), i.e. sqdist(x, c) > u. s = 1 + (D + 48) 2^-23 + 1e-6
// covers that with room; T is computed in double and rounded up to float. Two guards keep
// the relative bounds valid: u < 1e-30 never skips (subnormal round-off is absolute, not
// relative), and the filter is off when some row's norm exceeds 1e18 (squares of such
// coordinates could overflow float32), when D < 64 (32 axes would cost as much as the
// distance itself) or when the 32 axes hold under 60 % of the variance (it would rarely
// prune: isotropic data).
//
// Only the filter's speed depends on V: any orthonormal V gives an exact bound, so V is
// estimated from a sample of rows, and its rounding, LAPACK's eigenvectors or the thread
// count cannot change the selection.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace patchcore_fast {

constexpr int kBoundLead = 8;   // first stage: axes 0..7, 8 centres per vector
constexpr int kBoundDims = 32;  // both stages together: axes 0..31
constexpr int kBoundTail = kBoundDims - kBoundLead;
constexpr int64_t kBoundMinDim = 2 * kBoundDims;
constexpr double kBoundMaxNorm = 1e18;
constexpr int64_t kBoundSampleRows = 8192;  // rows of the covariance estimate
// The filter is used when the 32 axes hold at least this share of the sample's variance.
// Below it (isotropic data: 25 % at D = 128) it would rarely prune, and its projection
// pass and first stage would only add time (1.5x at bottle 1 % on Gaussian data).
constexpr double kBoundMinVariance = 0.6;

struct SubspaceBound {
  bool on = false;
  const float* y = nullptr;  // [n, kBoundDims] float32: the rows on the principal axes
  double eta = 0.0, slack = 1.0;

  // The threshold T(u) of the header: a centre whose computed bound L is > T(u) cannot
  // lower a point's min_d u. +Inf (never skip) for tiny u.
  float threshold(float u) const {
    if (!(u >= 1e-30f)) return std::numeric_limits<float>::infinity();
    const double r = std::sqrt(static_cast<double>(u)) * slack + eta;
    return std::nextafter(static_cast<float>(r * r), std::numeric_limits<float>::infinity());
  }
};

// y = fl32(V^T x) for one row, accumulated in double and rounded once (the rounding the
// header's eta covers); returns ||x||^2 in double.
//
// Args:
//   v: [dim, kBoundDims] float64, the axes; xi: [dim]; y: [kBoundDims], written.
inline double project_on_axes(const double* v, const float* xi, int64_t dim, float* y) {
  double acc[kBoundDims] = {};
  double sq = 0.0;
  for (int64_t r = 0; r < dim; ++r) {
    const double xr = xi[r];
    sq += xr * xr;
    for (int j = 0; j < kBoundDims; ++j) acc[j] += xr * v[r * kBoundDims + j];
  }
  for (int j = 0; j < kBoundDims; ++j) y[j] = static_cast<float>(acc[j]);
  return sq;
}

// eta of the header for rows (and centres) of norm at most max_norm.
inline double bound_eta(double max_norm) { return 1.02 * std::ldexp(max_norm, -23); }

// Args:
//   x: [n, dim] row-major float32 points, finite (checked before).
//   threads: OpenMP threads for the projection pass.
//   y_store, v_store: storage the filter points into (resized here): the rows' coordinates
//     [n, 32] and the axes V [dim, 32] (float64; kept so that rows the caller meets later,
//     e.g. another rank's centres, can be projected with project_on_axes).
// Returns:
//   the filter: on, with y [n, 32] and its margins, when dim >= 64 and the norms allow it.
inline SubspaceBound make_subspace_bound(const float* x, int64_t n, int64_t dim, int threads,
                                         std::vector<float>& y_store,
                                         std::vector<double>& v_store) {
  SubspaceBound bound;
  if (dim < kBoundMinDim || n < 2) return bound;

  // Principal axes of a strided sample: eigenvectors of its covariance, largest first.
  const at::Tensor all = at::from_blob(const_cast<float*>(x), {n, dim}, at::kFloat);
  const int64_t stride = std::max<int64_t>(1, n / kBoundSampleRows);
  at::Tensor sample = all.slice(0, 0, n, stride).to(at::kDouble);
  sample = sample - sample.mean(0, /*keepdim=*/true);
  std::vector<double>& v = v_store;
  v.assign(static_cast<size_t>(dim * kBoundDims), 0.0);  // [dim, 32]
  try {
    const auto [vals, vecs] = at::linalg_eigh(at::matmul(sample.t(), sample));
    const double total = vals.clamp_min(0).sum().item<double>();
    const double top = vals.slice(0, dim - kBoundDims, dim).clamp_min(0).sum().item<double>();
    if (!(top >= kBoundMinVariance * total && total > 0.0)) return bound;
    const at::Tensor lead = vecs.slice(1, dim - kBoundDims, dim).flip(1).contiguous();
    std::copy(lead.data_ptr<double>(), lead.data_ptr<double>() + v.size(), v.begin());
  } catch (const c10::Error&) {
    return bound;  // no LAPACK in this build: the kernel runs unfiltered
  }
  // Gram-Schmidt, twice, in double: orthonormal columns to ~1e-15 whatever eigh returned.
  for (int pass = 0; pass < 2; ++pass) {
    for (int j = 0; j < kBoundDims; ++j) {
      for (int q = 0; q < j; ++q) {
        double dot = 0.0;
        for (int64_t r = 0; r < dim; ++r) dot += v[r * kBoundDims + j] * v[r * kBoundDims + q];
        for (int64_t r = 0; r < dim; ++r) v[r * kBoundDims + j] -= dot * v[r * kBoundDims + q];
      }
      double norm = 0.0;
      for (int64_t r = 0; r < dim; ++r) norm += v[r * kBoundDims + j] * v[r * kBoundDims + j];
      norm = std::sqrt(norm);
      if (!(norm > 0.5)) return bound;  // degenerate basis: leave the filter off
      for (int64_t r = 0; r < dim; ++r) v[r * kBoundDims + j] /= norm;
    }
  }

  // y = V^T x per row, accumulated in double and rounded once to float32.
  y_store.resize(static_cast<size_t>(n * kBoundDims));
  float* y = y_store.data();
  const double* vp = v.data();
  double max_sq = 0.0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(max : max_sq)
  for (int64_t i = 0; i < n; ++i) {
    max_sq = std::max(max_sq, project_on_axes(vp, x + i * dim, dim, y + i * kBoundDims));
  }
  const double max_norm = std::sqrt(max_sq) * (1.0 + 1e-12);
  if (!(max_norm <= kBoundMaxNorm)) return bound;
  bound.on = true;
  bound.y = y;
  bound.eta = bound_eta(max_norm);
  bound.slack = 1.0 + static_cast<double>(dim + 48) * std::ldexp(1.0, -23) + 1e-6;
  return bound;
}

}  // namespace patchcore_fast
