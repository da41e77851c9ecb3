// Exact greedy k-center (farthest-point) selection on the CPU.
//
// The plain loop (patchcore_fast/reference.py) costs k passes over the N x D features:
// after every new centre it lowers every point's nearest-centre distance min_d, then takes
// the arg-max. This kernel gives the same selection with lazy evaluation:
//
//   * Each unselected point i keeps ub[i] = min over the first last[i] centres of the
//     squared distance to them (direct differences, as the reference). Centres only ever
//     lower min_d, so ub[i] is an upper bound of the point's true min_d over all centres.
//   * A max-heap holds key(ub[i], i) of every unselected point; key orders by distance,
//     then by lower index (the reference's tie rule), so all keys are distinct.
//   * To pick the next centre, pop the top point and bring it up to date with the centres
//     it has not seen. If it is fully up to date and its key is still >= the new heap top,
//     it is the arg-max: every other point's true key is <= its heap key <= the top. As
//     soon as its key drops below the top, stop (it cannot be the arg-max now), record how
//     many centres it has seen, push it back and pop the next one.
//
// A new centre is far from almost every point, so the points that win stay close to the
// top of the heap and are refreshed against few centres; most points are refreshed a few
// times in the whole run instead of k times. The result is the exact selection of the
// plain loop (the same min_d values; the arg-max taken over them), because an upper bound
// is only trusted when it cannot change the answer.
//
// Only distances are computed, never bounds derived from them, so no floating-point
// margin is needed: every ub is a min over computed direct-difference distances, like the
// reference's min_d, and differs from it only by the summation order of those sums (a few
// ulps), which can reorder near-ties only. (The triangle-inequality pruning of Elkan-style
// clusters was tried first: on 128-d data, Gaussian or of intrinsic dimension 12, the
// cluster test d(c, a) >= 2 radius(a) almost never fires and the per-point test skipped
// under 60 % of the distances, 2-3x at best, while lazy evaluation skips ~95 %.)
//
// A refresh of one point against many centres is a small matrix-vector product: centres
// are taken kGroup at a time, with independent accumulators.
//
// Selected points leave the heap for good, so they are never selected again and k == N
// gives a permutation. Points at distance 0 (duplicates of a centre) cannot go lower and
// are not refreshed; once every remaining key is 0 they come out lowest index first.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common.h"
#include "../pack_key.h"  // pack_key, key_index: (distance, index) heap keys
#include "sqdist.h"

namespace patchcore_fast {
namespace {

// Below this many distance terms the first pass runs on one thread.
constexpr int64_t kParallelTerms = 1 << 16;


// Squared distances from a to kGroup consecutive rows b[0..kGroup) (row stride d), each
// summed exactly as sqdist sums it. Independent accumulators keep the FMA units busy where
// a single reduction would wait on its own latency.
constexpr int64_t kGroup = 8;
inline void sqdist_group(const float* __restrict a, const float* __restrict b, int64_t d,
                         float* __restrict out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f, s5 = 0.f, s6 = 0.f, s7 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
  for (int64_t i = 0; i < d; ++i) {
    const float v = a[i];
    const float t0 = v - b[i], t1 = v - b[d + i], t2 = v - b[2 * d + i],
                t3 = v - b[3 * d + i], t4 = v - b[4 * d + i], t5 = v - b[5 * d + i],
                t6 = v - b[6 * d + i], t7 = v - b[7 * d + i];
    s0 += t0 * t0;
    s1 += t1 * t1;
    s2 += t2 * t2;
    s3 += t3 * t3;
    s4 += t4 * t4;
    s5 += t5 * t5;
    s6 += t6 * t6;
    s7 += t7 * t7;
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
  out[4] = s4, out[5] = s5, out[6] = s6, out[7] = s7;
}

// Args:
//   x: [n, dim] row-major float32 points, finite.
//   k: centres to select, 1 <= k <= n; start: the first centre, 0 <= start < n.
// Returns (in out[0..k)): the selected rows in selection order.
void greedy_coreset_impl(const float* x, int64_t n, int64_t dim, int64_t k, int64_t start,
                         int64_t* out) {
  std::vector<float> centres(static_cast<size_t>(k * dim));  // rows of the centres
  std::vector<float> ub(static_cast<size_t>(n));
  std::vector<int32_t> last(static_cast<size_t>(n), 1);  // centres seen by each point

  out[0] = start;
  const float* first = x + start * dim;
  std::memcpy(centres.data(), first, sizeof(float) * dim);

  // First centre: one full pass, every point sees it. The same pass checks the values:
  // v * 0 is 0 for finite v and NaN for NaN or +-Inf, so the sum of a row's v * 0 is 0
  // exactly when the row is finite (a check folded into a read the kernel makes anyway,
  // instead of a separate isfinite() pass over the whole input).
  const int nthreads = std::max(1, at::get_num_threads());
  int64_t bad = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : bad) \
    if (n * dim > kParallelTerms)
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * dim;
    float s = 0.f, z = 0.f;
#pragma omp simd reduction(+ : s, z)
    for (int64_t j = 0; j < dim; ++j) {
      const float t = xi[j] - first[j];
      s += t * t;
      z += xi[j] * 0.f;
    }
    ub[i] = s;
    bad += (z != 0.f);
  }
  TORCH_CHECK(bad == 0, "features contains NaN or Inf values (", bad, " rows)");

  if (k == 1) return;

  std::vector<uint64_t> heap;
  heap.reserve(static_cast<size_t>(n - 1));
  for (int64_t i = 0; i < n; ++i) {
    if (i != start) heap.push_back(pack_key(ub[i], static_cast<int32_t>(i)));
  }
  std::make_heap(heap.begin(), heap.end());

  for (int64_t t = 1; t < k; ++t) {
    // t centres exist; find the unselected point of largest min_d over all of them.
    int32_t chosen = -1;
    while (chosen < 0) {
      TORCH_INTERNAL_ASSERT(!heap.empty(), "greedy_coreset: no unselected point at step ", t);
      std::pop_heap(heap.begin(), heap.end());
      const int32_t i = key_index(heap.back());
      heap.pop_back();
      const uint64_t top = heap.empty() ? 0 : heap.front();
      const float* xi = x + static_cast<int64_t>(i) * dim;
      float u = ub[i];
      int64_t s = last[i];
      bool behind = false;  // known to be below the top: cannot be the arg-max now
      // Centres are taken kGroup at a time; a group is always used whole (a tighter upper
      // bound is still an upper bound, and `last` records exactly what was seen).
      while (s < t && !behind) {
        if (u == 0.f) {  // nothing is closer than 0: up to date whatever the centres
          s = t;
          break;
        }
        const float* cs = centres.data() + s * dim;
        if (t - s >= kGroup) {
          float dist[kGroup];
          sqdist_group(xi, cs, dim, dist);
          for (int64_t q = 0; q < kGroup; ++q) u = std::min(u, dist[q]);
          s += kGroup;
        } else {
          u = std::min(u, sqdist(xi, cs, dim));
          s += 1;
        }
        behind = pack_key(u, i) < top;
      }
      ub[i] = u;
      last[i] = static_cast<int32_t>(s);
      if (behind) {
        heap.push_back(pack_key(u, i));
        std::push_heap(heap.begin(), heap.end());
      } else {
        chosen = i;  // up to date and key >= top >= every other point's true key
      }
    }
    out[t] = chosen;
    std::memcpy(centres.data() + t * dim, x + static_cast<int64_t>(chosen) * dim,
                sizeof(float) * dim);
  }
}

at::Tensor greedy_coreset_cpu(const at::Tensor& features, int64_t k, int64_t start) {
  check_greedy_coreset_args(features, k, start, /*check_values=*/false);  // fused below
  TORCH_CHECK(features.device().is_cpu(), "features should be on the CPU, got ",
              features.device());
  const at::Tensor x = features.contiguous();
  at::Tensor out = at::empty({k}, features.options().dtype(at::kLong));
  greedy_coreset_impl(x.data_ptr<float>(), x.size(0), x.size(1), k, start,
                      out.data_ptr<int64_t>());
  return out;
}

}  // namespace
}  // namespace patchcore_fast

TORCH_LIBRARY_IMPL(patchcore_fast, CPU, m) {
  m.impl("greedy_coreset", &patchcore_fast::greedy_coreset_cpu);
}
