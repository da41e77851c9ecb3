#pragma once
// Squared Euclidean distance with direct differences, shared by the CPU kernels.

#include <cstdint>

namespace patchcore_fast {

// ||a - b||^2 summed over (a_i - b_i)^2: every term is >= 0, so the relative error is at
// most gamma_D = D * eps / (1 - D * eps) whatever the norms (no cancellation, unlike the
// expansion ||a||^2 + ||b||^2 - 2 a.b). This is the form of the pure-torch references;
// vector lanes make it a blocked sum, which only changes the last bits.
//
// Args:
//   a, b: rows of d floats.
// Returns:
//   the squared distance, float32.
inline float sqdist(const float* __restrict a, const float* __restrict b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) {
    const float t = a[i] - b[i];
    s += t * t;
  }
  return s;
}

}  // namespace patchcore_fast
