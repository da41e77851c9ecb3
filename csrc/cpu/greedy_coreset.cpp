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
// are taken kSqdistGroup at a time, with independent accumulators (sqdist.h; a distance
// has the same bits whichever way it is computed, so the grouping cannot change ub).
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
#include "../coreset_shard_step.h"
#include "../pack_key.h"  // pack_key, key_index: (distance, index) heap keys
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

// One shard's lazy arg-max for step t (t centres exist, their rows in rows[0..t)).
// Pops, refreshes and pushes back points of the shard's heap until either its exact
// local maximum is found (returned, out of the heap, offered to `best`), or its heap
// top falls below `best` (returns -1). See the header for why this is exact.
int32_t shard_argmax(const float* x, int64_t dim, int64_t t, const float* const* rows,
                     std::vector<ArgmaxKey>& heap, float* ub, int32_t* last,
                     std::atomic<ArgmaxKey>& best) {
  while (!heap.empty()) {
    const ArgmaxKey known = best.load(std::memory_order_relaxed);
    if (heap.front() < known) return -1;  // nothing here can beat a real key
    std::pop_heap(heap.begin(), heap.end());
    const int32_t i = key_index(heap.back());
    heap.pop_back();
    // The point is behind (cannot be the arg-max now) once below the next heap key or
    // below a key another shard already has.
    const ArgmaxKey bar = std::max(heap.empty() ? ArgmaxKey{0} : heap.front(), known);
    const float* xi = x + static_cast<int64_t>(i) * dim;
    float u = ub[i];
    int64_t s = last[i];
    bool behind = false;
    // Centres are taken kSqdistGroup at a time; a group is always used whole (a tighter
    // upper bound is still an upper bound, and `last` records exactly what was seen).
    while (s < t && !behind) {
      if (u == 0.f) {  // nothing is closer than 0: up to date whatever the centres
        s = t;
        break;
      }
      if (t - s >= kSqdistGroup) {
        float dist[kSqdistGroup];
        sqdist_group(xi, rows + s, dim, dist);
        for (int q = 0; q < kSqdistGroup; ++q) u = std::min(u, dist[q]);
        s += kSqdistGroup;
      } else {
        u = std::min(u, sqdist(xi, rows[s], dim));
        s += 1;
      }
      behind = pack_key(u, i) < bar;
    }
    ub[i] = u;
    last[i] = static_cast<int32_t>(s);
    const ArgmaxKey key = pack_key(u, i);
    if (behind) {
      heap.push_back(key);
      std::push_heap(heap.begin(), heap.end());
      continue;
    }
    // Up to date and key >= every other key of the shard: its exact local maximum.
    ArgmaxKey cur = known;
    while (cur < key &&
           !best.compare_exchange_weak(cur, key, std::memory_order_relaxed)) {
    }
    return i;
  }
  return -1;
}

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
  TORCH_CHECK(bad == 0, "features contains NaN or Inf values (", bad, " rows)");

  if (k == 1) return;
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

    // Rows of the centres, in selection order: each thread's own list of pointers.
    // Centre rows are read over and over (a point is refreshed against hundreds of them
    // in a row), so they are copied into one contiguous buffer, `centres`, streamed
    // sequentially instead of gathered from all over x. Thread 0 copies centre t after
    // the barrier of step t; the other threads may already be refreshing with it, so
    // until the next barrier (which orders the copy before their reads) they read that
    // one row from x.
    std::vector<const float*> rows;
    rows.reserve(static_cast<size_t>(k));
    rows.push_back(centres.data());
    std::vector<ArgmaxKey> heap;
    heap.reserve(static_cast<size_t>(hi - lo));
    for (int64_t i = lo; i < hi; ++i) {
      if (i != start) heap.push_back(pack_key(ub[i], static_cast<int32_t>(i)));
    }
    std::make_heap(heap.begin(), heap.end());

    for (int64_t t = 1; t < k; ++t) {
      const int32_t offered = shard_argmax(x, dim, t, rows.data(), heap, ub.data(),
                                           last.data(), keys[t]);
      barrier->wait();  // every offer is in keys[t]
      const int32_t chosen = key_index(keys[t].load(std::memory_order_relaxed));
      rows[t - 1] = centres.data() + (t - 1) * dim;  // copied before this barrier
      rows.push_back(x + static_cast<int64_t>(chosen) * dim);
      if (tid == 0) {
        out[t] = chosen;
        std::memcpy(centres.data() + t * dim, rows[t], sizeof(float) * dim);
      }
      if (offered >= 0 && offered != chosen) {  // lost: back into the shard's heap
        heap.push_back(pack_key(ub[offered], offered));
        std::push_heap(heap.begin(), heap.end());
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

// ---------------------------------------------------------------------------------------
// One step of the distributed coreset on one rank's shard (the plain, non-lazy loop: a
// rank cannot skip its shard's update without knowing the other ranks' keys).
//
// A record is int32[D + 2]: words 0-1 hold a packed key (pack_key's 64 bits, stored as
// they lie in memory), words 2.. the float32 bits of that point's row. Key 0 means "no
// point". Integer words, not floats: the key's low word is a NaN pattern as a float,
// and NaNs do not compare equal (nor survive every copy path bit for bit).
//
// Step `step`: the candidate records of all ranks (the all-gathered offers of the previous
// step) name the new centre, their largest key; every rank lowers its min_d with the
// distance to that centre (sqdist: the same bits as the fused kernel, so the shards
// together hold exactly the min_d values of a single process), marks the centre -1 if it
// owns it, writes indices[step] and returns its own offer: the packed key of its largest
// min_d (ties: lowest global index) and that row.

inline ArgmaxKey record_key(const int32_t* record) {
  ArgmaxKey key;
  std::memcpy(&key, record, sizeof(key));
  return key;
}

at::Tensor coreset_shard_step_cpu(const at::Tensor& shard, const at::Tensor& candidates,
                                  int64_t offset, at::Tensor& min_d, at::Tensor& indices,
                                  int64_t step) {
  check_coreset_shard_step_args(shard, candidates, offset, min_d, indices, step);
  TORCH_CHECK(shard.device().is_cpu() && candidates.device().is_cpu() &&
                  min_d.device().is_cpu() && indices.device().is_cpu(),
              "coreset_shard_step: every tensor should be on the CPU, got shard on ",
              shard.device(), ", candidates on ", candidates.device(), ", min_d on ",
              min_d.device(), ", indices on ", indices.device());
  TORCH_CHECK(min_d.is_contiguous() && indices.is_contiguous(),
              "coreset_shard_step: min_d and indices should be contiguous (they are updated "
              "in place)");
  const at::Tensor x = shard.contiguous();
  const at::Tensor cands = candidates.contiguous();
  const int64_t n = x.size(0), d = x.size(1), width = d + 2;

  // The new centre: the largest offer (keys are distinct: they hold the index).
  const int32_t* cand = cands.data_ptr<int32_t>();
  int64_t owner = 0;
  for (int64_t r = 1; r < cands.size(0); ++r) {
    if (record_key(cand + r * width) > record_key(cand + owner * width)) owner = r;
  }
  const ArgmaxKey chosen_key = record_key(cand + owner * width);
  TORCH_CHECK(chosen_key != 0, "coreset_shard_step: no rank offered a point at step ", step,
              " (all ", cands.size(0), " candidate keys are 0): k exceeds the number of rows");
  const int64_t chosen = key_index(chosen_key);
  std::vector<float> centre(static_cast<size_t>(d));  // the row, from its bits
  std::memcpy(centre.data(), cand + owner * width + 2, sizeof(float) * d);
  indices.data_ptr<int64_t>()[step] = chosen;

  const float* xp = x.data_ptr<float>();
  float* md = min_d.data_ptr<float>();
  ArgmaxKey best = 0;
  const int threads = std::max(1, at::get_num_threads());
#pragma omp parallel for schedule(static) num_threads(threads) reduction(max : best) \
    if (n * d > kParallelTerms)
  for (int64_t i = 0; i < n; ++i) {
    float m = md[i];
    if (offset + i == chosen) {
      m = -1.f;  // selected: never offered again
    } else if (m >= 0.f) {
      m = std::min(m, sqdist(xp + i * d, centre.data(), d));
    }
    md[i] = m;
    if (m >= 0.f) best = std::max(best, pack_key(m, static_cast<int32_t>(offset + i)));
  }

  at::Tensor record = at::zeros({width}, cands.options());
  int32_t* rec = record.data_ptr<int32_t>();
  if (best != 0) {
    std::memcpy(rec, &best, sizeof(best));
    std::memcpy(rec + 2, xp + (key_index(best) - offset) * d, sizeof(float) * d);
  }
  return record;
}

}  // namespace
}  // namespace patchcore_fast

TORCH_LIBRARY_IMPL(patchcore_fast, CPU, m) {
  m.impl("greedy_coreset", &patchcore_fast::greedy_coreset_cpu);
  m.impl("coreset_shard_step", &patchcore_fast::coreset_shard_step_cpu);
}
