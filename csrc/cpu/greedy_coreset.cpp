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
//   * To pick the next centre, look at the top point and bring it up to date with the
//     centres it has not seen. If it is fully up to date and its key is still >= every
//     other key of the heap (the top's largest child), it is the arg-max: every other
//     point's true key is <= its heap key. As soon as its key drops below that, stop (it
//     cannot be the arg-max now), record how many centres it has seen, put it back lower
//     (one sift-down of a 4-ary heap, key_heap.h) and look at the new top.
//
// A new centre is far from almost every point, so the points that win stay close to the
// top of the heap and are refreshed against few centres; most points are refreshed a few
// times in the whole run instead of k times. The result is the exact selection of the
// plain loop (the same min_d values; the arg-max taken over them), because an upper bound
// is only trusted when it cannot change the answer.
//
// Every ub is a min over computed direct-difference distances (sqdist.h), like the
// reference's min_d, and differs from it only by the summation order of those sums (a few
// ulps), which can reorder near-ties only. (Elkan-style triangle-inequality pruning was
// tried first and skips far fewer distances: bench/RESULTS.md, "Elkan-style pruning (tried
// before lazy evaluation, not kept)".)
//
// What a refresh costs. Lazy evaluation still leaves about 620 million distances at bottle
// 10 % (163,856 x 128, k = 16,385), each a 128-d pass over a centre row. Profiled, the
// loop was bound by streaming those rows (16 ns a distance), not by the heap (16 %). So
// from 64 columns on, a refresh first asks a lower bound (coreset_bound.h): the distance
// on the data's 32 leading principal axes, which can only be shorter, taken with a
// rigorous floating-point margin. A centre whose bound already exceeds the point's ub
// cannot lower it and is skipped; on bottle that is 99.7 % of them, and the bound's first
// stage costs 8 coordinates for 8 centres at once. Only the survivors get their exact
// distance (sqdist, unchanged bits), so ub is exactly what it was without the bound: the
// same selection, bit for bit, faster. Where the bound prunes little (isotropic data),
// groups of 8 centres fall back to sqdist_group, the unfiltered path.
//
// Selected points leave the heap for good, so they are never selected again and k == N
// gives a permutation. Points at distance 0 (duplicates of a centre) cannot go lower and
// are not refreshed; once every remaining key is 0 they come out lowest index first.
//
// Threads: the points are cut into one contiguous shard per thread, each with its own
// heap, ub and last (no sharing, no locks). Per step, every shard looks for its exact
// local arg-max as above and offers it to the step's shared key (an atomic max of packed
// keys). A shard stops as soon as its heap top is below the shared key: every point of
// the shard has a true key <= its heap key <= top < a key that some point really has,
// so none of them can be the arg-max, and the shard does no more work this step. When
// all threads reach the step's barrier, the shared key is the true global maximum: the
// shard holding the global arg-max p either offered p (its exact local maximum) or
// stopped below a real key >= key(p), which is impossible. Ties cannot occur (keys hold
// the index). So the selection is that of one thread, bit for bit, for any thread count;
// only the amount of work differs (a shard refreshes points that could beat its own
// best, not the global one, until another shard's offer cuts it short).
//
// A shard's exact local maximum that loses is kept aside (up to date, its key exact) and
// goes back into its heap at the next step. One barrier per step; it spins briefly, then
// yields the core: on a machine shared with other work a waiting thread must not keep a
// straggler off the CPU (an OpenMP barrier that spins there made 2 threads 3x slower than
// one on a loaded 2-core machine).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "../common.h"
#include "../pack_key.h"  // pack_key, key_index: (distance, index) heap keys
#include "coreset_bound.h"
#include "key_heap.h"
#include "lazy_argmax.h"
#include "sqdist.h"

namespace patchcore_fast {
namespace {

// Below this many distance terms the first pass runs on one thread.
constexpr int64_t kParallelTerms = 1 << 16;


// A barrier for the threads of one parallel region: spin a little (a step of a quiet
// machine ends within microseconds of the others), then yield the core.
class SpinBarrier {
 public:
  explicit SpinBarrier(int count) : count_(count) {}
  void wait() {
    const uint32_t gen = gen_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
      arrived_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spin = 0; gen_.load(std::memory_order_acquire) == gen; ++spin) {
      if (spin >= kSpins) std::this_thread::yield();
    }
  }

 private:
  static constexpr int kSpins = 64;
  const int count_;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<uint32_t> gen_{0};
};

// Below this many points per thread, fewer threads: a shard must hold enough points for
// its work to outweigh one barrier per step.
constexpr int64_t kMinShardRows = 4096;

// Args:
//   x: [n, dim] row-major float32 points, finite.
//   k: centres to select, 1 <= k <= n; start: the first centre, 0 <= start < n.
//   threads: threads (shards) to use, >= 1.
// Returns (in out[0..k)): the selected rows in selection order.
void greedy_coreset_impl(const float* x, int64_t n, int64_t dim, int64_t k, int64_t start,
                         int threads, int64_t* out) {
  std::vector<float> ub(static_cast<size_t>(n));
  std::vector<int32_t> last(static_cast<size_t>(n), 1);  // centres seen by each point

  out[0] = start;
  const float* first = x + start * dim;

  // First centre: one full pass, every point sees it. The same pass checks the values:
  // v * 0 is 0 for finite v and NaN for NaN or +-Inf, so the sum of a row's v * 0 is 0
  // exactly when the row is finite (a check folded into a read the kernel makes anyway,
  // instead of a separate isfinite() pass over the whole input).
  int64_t bad = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : bad) \
    if (n * dim > kParallelTerms)
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * dim;
    float z = 0.f;
#pragma omp simd reduction(+ : z)
    for (int64_t j = 0; j < dim; ++j) z += xi[j] * 0.f;
    ub[i] = sqdist(xi, first, dim);
    bad += (z != 0.f);
  }
  TORCH_CHECK_VALUE(bad == 0, "features contains NaN or Inf values (", bad, " rows)");

  if (k == 1) return;
  std::vector<float> y_store;
  std::vector<double> v_store;
  const SubspaceBound bound = make_subspace_bound(x, n, dim, threads, y_store, v_store);
  const float* y = bound.on ? bound.y : nullptr;
  threads = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(threads, n / kMinShardRows)));

  // keys[t]: the packed key of centre t, the atomic max of the shards' offers at step t
  // (a fresh zeroed slot per step, so no slot is reset while another thread reads it).
  std::unique_ptr<std::atomic<ArgmaxKey>[]> keys(new std::atomic<ArgmaxKey>[k]);
  for (int64_t t = 0; t < k; ++t) keys[t].store(0, std::memory_order_relaxed);
  std::vector<float> centres(static_cast<size_t>(k * dim));  // rows of the centres
  std::memcpy(centres.data(), first, sizeof(float) * dim);
  std::atomic<int> team{0};
  std::unique_ptr<SpinBarrier> barrier;

#pragma omp parallel num_threads(threads)
  {
#pragma omp single
    {
      // OpenMP may give fewer threads than asked (nesting, thread limits).
      team.store(omp_get_num_threads());
      barrier.reset(new SpinBarrier(omp_get_num_threads()));
    }  // implicit barrier: every thread sees the team size and the barrier
    const int tid = omp_get_thread_num();
    const int nt = team.load();
    const int64_t lo = n * tid / nt, hi = n * (tid + 1) / nt;

    // Centre rows are read over and over (a point is refreshed against hundreds of them
    // in a row), so they are copied into one contiguous buffer, `centres`, streamed
    // sequentially instead of gathered from all over x. Thread 0 copies centre t after
    // the barrier of step t; the other threads may already be refreshing with it, so
    // until the next barrier (which orders the copy before their reads) they read that
    // one row from x.
    CentreTables tab(k, bound.on);
    tab.add(centres.data(), y == nullptr ? nullptr : y + start * kBoundDims);
    KeyHeap heap;
    heap.reserve(static_cast<size_t>(hi - lo));
    for (int64_t i = lo; i < hi; ++i) {
      if (i != start) heap.append(pack_key(ub[i], static_cast<uint32_t>(i)));
    }
    heap.build();

    for (int64_t t = 1; t < k; ++t) {
      const int32_t offered = shard_argmax(x, dim, bound, t, tab, heap, ub.data(),
                                           last.data(), keys[t]);
      barrier->wait();  // every offer is in keys[t]
      const int32_t chosen = key_index(keys[t].load(std::memory_order_relaxed));
      tab.rows[t - 1] = centres.data() + (t - 1) * dim;  // copied before this barrier
      tab.add(x + static_cast<int64_t>(chosen) * dim,
              y == nullptr ? nullptr : y + static_cast<int64_t>(chosen) * kBoundDims);
      if (tid == 0) {
        out[t] = chosen;
        std::memcpy(centres.data() + t * dim, tab.rows[t], sizeof(float) * dim);
      }
      if (offered >= 0 && offered != chosen) {  // lost: back into the shard's heap
        heap.push(pack_key(ub[offered], static_cast<uint32_t>(offered)));
      }
    }
  }
}

at::Tensor greedy_coreset_cpu(const at::Tensor& features, int64_t k, int64_t start) {
  check_greedy_coreset_args(features, k, start, /*check_values=*/false);  // fused below
  TORCH_CHECK(features.device().is_cpu(), "features should be on the CPU, got ",
              features.device());
  const at::Tensor x = features.contiguous();
  at::Tensor out = at::empty({k}, features.options().dtype(at::kLong));
  greedy_coreset_impl(x.data_ptr<float>(), x.size(0), x.size(1), k, start,
                      std::max(1, at::get_num_threads()), out.data_ptr<int64_t>());
  return out;
}

}  // namespace
}  // namespace patchcore_fast

TORCH_LIBRARY_IMPL(patchcore_fast, CPU, m) {
  m.impl("greedy_coreset", &patchcore_fast::greedy_coreset_cpu);
}
