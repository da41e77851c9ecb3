// The distributed greedy coreset on the CPU: one rank's shard, with the lazy evaluation and
// the exact bound of the single-process kernel (greedy_coreset.cpp, lazy_argmax.h).
//
// The Python loop (patchcore_fast/distributed.py) runs k steps; each step all-gathers one
// record per rank (its offer: a packed (min_d, global index) key and that row) and calls
// coreset_shard_step, which
//   1. takes the largest offered key as the new centre (the arg-max over all rows, ties to
//      the lower global index) and adds its row to the rank's centre tables;
//   2. brings back its own offer if that lost (up to date, its key exact) into its heap;
//   3. finds its shard's exact arg-max by the lazy loop (refresh the heap's top against the
//      centres it has not seen, until the top is up to date and above the rest of the
//      heap), takes it out of the heap and returns it as its next offer.
//
// Why the selection is one process's, bit for bit. A rank's heap keys are upper bounds of
// its rows' true min_d (min over all centres so far of sqdist, the distance routine every
// coreset kernel shares), so the lazy loop returns the shard's exact arg-max with its exact
// min_d: the argument of the single-process kernel, whose threads are shards too. The
// largest of the ranks' exact local maxima is the global arg-max, with the global tie rule
// because every offered key holds the global index. The single-process kernel's threads
// also cut each other's work short within a step (a shard stops below a key another
// already has); ranks cannot without a second exchange per step, so each rank finds its
// own local maximum every step: more work per rank than a thread, but one collective.
//
// The bound (coreset_bound.h) is exact for any orthonormal axes, so each rank takes the
// principal axes of its own rows and projects every centre it receives onto them itself;
// its margin eta must cover the norms of both sides, so it grows to cover each arriving
// centre (a larger eta only prunes less), and the filter turns off for good if a centre's
// norm exceeds the bound's limit.
//
// A rank's lazy loop runs on one thread (the ranks are the parallelism); the state's
// projection pass at setup uses torch's threads.
//
// The plain pass (state made with lazy=False, and CUDA's only kind) lowers every row's
// min_d with its distance to every new centre and takes the arg-max: one read of the shard
// per step, every distance computed with the same bits; the tests' oracle for the lazy one.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../common.h"
#include "../coreset_shard_step.h"
#include "../pack_key.h"
#include "coreset_bound.h"
#include "key_heap.h"
#include "lazy_argmax.h"
#include "sqdist.h"

namespace patchcore_fast {
namespace {

// Length of the centres' lead / tail coordinate table for k centres.
int64_t centre_coords_size(int64_t k) { return (k + 7) / 8 * 8 * kBoundLead + k * kBoundTail; }

ArgmaxKey record_key(const int32_t* record) {
  ArgmaxKey key;
  std::memcpy(&key, record, sizeof(key));
  return key;
}

std::vector<at::Tensor> coreset_shard_state_cpu(const at::Tensor& shard, int64_t k, bool lazy,
                                                const std::optional<at::Tensor>& start) {
  check_coreset_shard_state_args(shard, k, start);
  TORCH_CHECK(shard.device().is_cpu(), "shard should be on the CPU, got ", shard.device());
  const at::Tensor x = shard.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  if (!lazy) return {shard_start(x, start)};
  const bool bounded = d >= kBoundMinDim;
  const auto f32 = x.options(), f64 = x.options().dtype(at::kDouble);
  // A row's start is its exact min_d over the centres before the run, so it is an upper
  // bound of its min_d at every step: the lazy loop's invariant holds from the start.
  at::Tensor ub = shard_start(x, start);
  at::Tensor seen = at::zeros({n}, x.options().dtype(at::kInt));
  at::Tensor heap = at::zeros({n + 1}, x.options().dtype(at::kLong));
  at::Tensor coords = at::zeros({bounded ? n : 0, kBoundDims}, f32);
  at::Tensor axes = at::zeros({d + 1, kBoundDims}, f64);
  at::Tensor centres = at::zeros({k, d}, f32);
  at::Tensor ccoords = at::zeros({bounded ? centre_coords_size(k) : 0}, f32);
  if (bounded) {
    std::vector<float> y;
    std::vector<double> v;
    const SubspaceBound bound = make_subspace_bound(x.data_ptr<float>(), n, d,
                                                    std::max(1, at::get_num_threads()), y, v);
    if (bound.on) {
      std::copy(y.begin(), y.end(), coords.data_ptr<float>());
      double* a = axes.data_ptr<double>();
      std::copy(v.begin(), v.end(), a);
      a[d * kBoundDims + 0] = 1.0;
      a[d * kBoundDims + 1] = bound.eta;
      a[d * kBoundDims + 2] = bound.slack;
    }
  }
  return {ub, seen, heap, coords, axes, centres, ccoords};
}

// The plain pass (see the header): min_d = state[0] lowered with the new centre's row
// `crow`; returns the shard's arg-max as a local row (-1 when none is left).
int64_t plain_step(const float* xp, int64_t n, int64_t d, int64_t offset, int64_t chosen,
                   const float* crow, float* md) {
  ArgmaxKey best = 0;
  for (int64_t i = 0; i < n; ++i) {
    float m = md[i];
    if (offset + i == chosen) {
      m = -1.f;  // selected: never offered again
    } else if (m >= 0.f) {
      m = std::min(m, sqdist(xp + i * d, crow, d));
    }
    md[i] = m;
    if (m >= 0.f) best = std::max(best, pack_key(m, static_cast<uint32_t>(i)));
  }
  return best == 0 ? -1 : static_cast<int64_t>(key_index(best));
}

at::Tensor coreset_shard_step_cpu(const at::Tensor& shard, const at::Tensor& candidates,
                                  int64_t offset, at::TensorList state, const at::Tensor& indices,
                                  int64_t step) {
  check_coreset_shard_step_args(shard, candidates, offset, indices, step);
  TORCH_CHECK(shard.device().is_cpu() && candidates.device().is_cpu(),
              "coreset_shard_step: every tensor should be on the CPU, got shard on ",
              shard.device(), ", candidates on ", candidates.device());
  TORCH_CHECK(state.size() == kShardStateLazy || state.size() == kShardStatePlain,
              "coreset_shard_step: state should hold ", kShardStateLazy, " (lazy) or ",
              kShardStatePlain, " (plain) tensors on the CPU, as coreset_shard_state makes "
              "it, got ", state.size());
  const at::Tensor x = shard.contiguous();
  const at::Tensor cands = candidates.contiguous();
  const int64_t n = x.size(0), d = x.size(1), width = d + 2, k = indices.size(0);
  const float* xp = x.data_ptr<float>();
  at::Tensor record = at::zeros({width}, cands.options());
  const auto offer = [&](int64_t i, float value) {  // record of local row i, at min_d value
    const ArgmaxKey key = pack_key(value, static_cast<uint32_t>(offset + i));
    int32_t* rec = record.data_ptr<int32_t>();
    std::memcpy(rec, &key, sizeof(key));
    std::memcpy(rec + 2, xp + i * d, sizeof(float) * d);
  };

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
  indices.data_ptr<int64_t>()[step] = chosen;
  const float* centre_bits = reinterpret_cast<const float*>(cand + owner * width + 2);

  if (state.size() == kShardStatePlain) {
    check_state_tensor(state[0], "min_d", at::kFloat, {n}, x);
    std::vector<float> centre(centre_bits, centre_bits + d);  // aligned copy of the row
    float* md = state[0].data_ptr<float>();
    const int64_t i = plain_step(xp, n, d, offset, chosen, centre.data(), md);
    if (i >= 0) offer(i, md[i]);
    return record;
  }

  const bool bounded = d >= kBoundMinDim;
  check_state_tensor(state[0], "ub", at::kFloat, {n}, x);
  check_state_tensor(state[1], "seen", at::kInt, {n}, x);
  check_state_tensor(state[2], "heap", at::kLong, {n + 1}, x);
  check_state_tensor(state[3], "coords", at::kFloat, {bounded ? n : 0, kBoundDims}, x);
  check_state_tensor(state[4], "axes", at::kDouble, {d + 1, kBoundDims}, x);
  check_state_tensor(state[5], "centres", at::kFloat, {k, d}, x);
  check_state_tensor(state[6], "ccoords", at::kFloat, {bounded ? centre_coords_size(k) : 0}, x);
  float* ub = state[0].data_ptr<float>();
  int32_t* seen = state[1].data_ptr<int32_t>();
  int64_t* heap_store = state[2].data_ptr<int64_t>();
  float* centres = state[5].data_ptr<float>();
  double* meta = state[4].data_ptr<double>() + d * kBoundDims;  // (on, eta, slack)
  float* lead = bounded ? state[6].data_ptr<float>() : nullptr;
  float* tail = bounded ? lead + (k + 7) / 8 * 8 * kBoundLead : nullptr;

  // 1. The new centre joins the tables (its row from the record's bits).
  float* crow = centres + step * d;
  std::memcpy(crow, centre_bits, sizeof(float) * d);
  if (meta[0] != 0.0) {
    float yc[kBoundDims];
    const double norm = std::sqrt(project_on_axes(state[4].data_ptr<double>(), crow, d, yc)) *
                        (1.0 + 1e-12);
    put_centre_coords(lead, tail, step, yc);
    if (!(norm <= kBoundMaxNorm)) {
      meta[0] = 0.0;  // squares of such coordinates could overflow: no filter from here on
    } else {
      meta[1] = std::max(meta[1], bound_eta(norm));
    }
  }

  // 2. The heap: built from the first centre's distances (each lowering the row's start),
  //    or given back this rank's offer.
  KeyHeap heap(reinterpret_cast<ArgmaxKey*>(heap_store + 1), static_cast<size_t>(heap_store[0]));
  const int64_t mine = chosen - offset;  // the centre's local row, when in [0, n)
  if (step == 0) {
    for (int64_t i = 0; i < n; ++i) {
      if (i == mine) {
        ub[i] = -1.f;
        continue;
      }
      ub[i] = std::min(ub[i], sqdist(xp + i * d, crow, d));
      seen[i] = 1;
      heap.append(pack_key(ub[i], static_cast<uint32_t>(i)));
    }
    heap.build();
  } else {
    if (0 <= mine && mine < n) ub[mine] = -1.f;  // it was this rank's offer: out for good
    for (int64_t r = 0; r < cands.size(0); ++r) {
      const ArgmaxKey key = record_key(cand + r * width);
      const int64_t i = key == 0 ? -1 : static_cast<int64_t>(key_index(key)) - offset;
      if (0 <= i && i < n && i != mine) heap.push(pack_key(ub[i], static_cast<uint32_t>(i)));
    }
  }

  // 3. This rank's next offer (none after the last step).
  if (step + 1 < k) {
    SubspaceBound bound;
    bound.on = meta[0] != 0.0;
    bound.y = state[3].data_ptr<float>();
    bound.eta = meta[1];
    bound.slack = meta[2];
    const CentreBlock tab{centres, d, lead, tail};
    std::atomic<ArgmaxKey> best{0};  // no other rank's key is known within a step
    const int32_t i = shard_argmax(xp, d, bound, step + 1, tab, heap, ub, seen, best);
    if (i >= 0) offer(i, ub[i]);
  }
  heap_store[0] = static_cast<int64_t>(heap.size());
  return record;
}

}  // namespace
}  // namespace patchcore_fast

TORCH_LIBRARY_IMPL(patchcore_fast, CPU, m) {
  m.impl("coreset_shard_state", &patchcore_fast::coreset_shard_state_cpu);
  m.impl("coreset_shard_step", &patchcore_fast::coreset_shard_step_cpu);
}
