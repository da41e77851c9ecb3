#pragma once
// Squared Euclidean distance with direct differences, shared by the CPU kernels.
//
// ||a - b||^2 summed over (a_i - b_i)^2: every term is >= 0, so the relative error is at
// most gamma_D = D * eps / (1 - D * eps) whatever the norms (no cancellation, unlike the
// expansion ||a||^2 + ||b||^2 - 2 a.b). This is the form of the pure-torch references.
//
// The summation order is fixed here, not left to the vectoriser: coordinate i goes to
// lane i % 8 of an 8-lane accumulator (the tail is zero-padded, and 0 - 0 adds exactly
// 0), then the lanes are added in one fixed tree. So the value of a distance depends on
// the two rows only, bit for bit, whichever routine computes it: sqdist, sqdist_group (8
// centres at once), one thread or many, the greedy_coreset kernel or the per-shard step
// of the distributed coreset. The coreset relies on this: its lazy evaluation refreshes a
// point against its centres in groups whose boundaries depend on the order of the work,
// and the selection must not (`omp simd reduction` lets the compiler pick the lanes per
// loop: the grouped and the single form then differed in the last bit on 1 pair in 5).

#include <cstdint>
#include <cstring>

#if defined(__FMA__)
#include <immintrin.h>
#endif

// Without AVX, GCC notes that 32-byte vector arguments change the ABI; these helpers are
// inline and never cross a library boundary.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace patchcore_fast {
namespace sqdist_detail {

constexpr int64_t kLanes = 8;
// GCC / Clang vector extension: element-wise IEEE operations on 8 floats (one AVX
// register, two SSE registers without AVX). No reassociation happens across lanes.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The last r < 8 coordinates, zero-padded.
inline Lanes load_tail(const float* p, int64_t r) {
  Lanes v = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  std::memcpy(&v, p, sizeof(float) * static_cast<size_t>(r));
  return v;
}

// s + t * t per lane. Where the target has FMA, GCC contracts a * b + c into one fused
// operation at its own discretion (-ffp-contract=fast), which changes the last bit and
// is not guaranteed to be the same choice in every inlined copy; an explicit FMA is. A
// target without FMA has nothing to contract.
inline Lanes add_square(Lanes s, Lanes t) {
#if defined(__FMA__)
  return reinterpret_cast<Lanes>(_mm256_fmadd_ps(reinterpret_cast<__m256>(t),
                                                 reinterpret_cast<__m256>(t),
                                                 reinterpret_cast<__m256>(s)));
#else
  return s + t * t;
#endif
}

inline float lane_sum(Lanes s) {
  return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

}  // namespace sqdist_detail

// Args:
//   a, b: rows of d floats.
// Returns:
//   the squared distance, float32, summed in the fixed order described above.
inline float sqdist(const float* __restrict a, const float* __restrict b, int64_t d) {
  using namespace sqdist_detail;
  Lanes s = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    s = add_square(s, load(a + i) - load(b + i));
  }
  if (i < d) {
    s = add_square(s, load_tail(a + i, d - i) - load_tail(b + i, d - i));
  }
  return lane_sum(s);
}

// Squared distances from a to kSqdistGroup rows b[0..kSqdistGroup), each bit for bit
// equal to sqdist(a, b[q], d). One pass over a with independent accumulators keeps the
// FMA units busy where a single distance would wait on its own latency.
//
// Args:
//   a: a row of d floats; b: kSqdistGroup pointers to rows of d floats.
// Returns (in out[0..kSqdistGroup)): the squared distances.
constexpr int kSqdistGroup = 8;
inline void sqdist_group(const float* __restrict a, const float* const* b, int64_t d,
                         float* __restrict out) {
  using namespace sqdist_detail;
  Lanes s[kSqdistGroup];
  for (int q = 0; q < kSqdistGroup; ++q) s[q] = Lanes{0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    const Lanes va = load(a + i);
    for (int q = 0; q < kSqdistGroup; ++q) {
      s[q] = add_square(s[q], va - load(b[q] + i));
    }
  }
  if (i < d) {
    const Lanes va = load_tail(a + i, d - i);
    for (int q = 0; q < kSqdistGroup; ++q) {
      s[q] = add_square(s[q], va - load_tail(b[q] + i, d - i));
    }
  }
  for (int q = 0; q < kSqdistGroup; ++q) out[q] = lane_sum(s[q]);
}

// Rows centred on the bank's mean, and squared norms, for the k-NN kernels (knn.cpp and
// its projected pre-pass, knn_project.cpp). Their bounds take a centred row to be fl(x - mu)
// coordinate by coordinate and a squared norm to be a double sum rounded at most once, so
// every centred copy and every such norm is made by these two.
inline void centre_row(const float* __restrict src, const float* __restrict mean, int64_t d,
                       float* __restrict dst) {
#pragma omp simd
  for (int64_t t = 0; t < d; ++t) dst[t] = src[t] - mean[t];
}

inline double sqnorm_double(const float* a, int64_t d) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t t = 0; t < d; ++t) s += static_cast<double>(a[t]) * a[t];
  return s;
}

}  // namespace patchcore_fast

#pragma GCC diagnostic pop
