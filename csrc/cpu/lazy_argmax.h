#pragma once
// The lazy arg-max of the CPU coreset, shared by its two kernels: greedy_coreset (one
// process, one shard per thread; csrc/cpu/greedy_coreset.cpp explains the method and why
// it is exact) and coreset_shard_step (one shard per rank of a distributed run;
// csrc/cpu/coreset_shard.cpp). A shard keeps a heap of upper bounds of its points' min_d
// and refreshes only the top point, against only the centres it has not seen, skipping
// the centres the subspace bound proves too far.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../pack_key.h"
#include "coreset_bound.h"
#include "key_heap.h"
#include "sqdist.h"

namespace patchcore_fast {

// When at least this many of a group's 8 centres pass the bound's first stage, the
// group's exact distances are computed together (sqdist_group) instead of filtering
// further: on data the bound cannot prune (isotropic Gaussian) the kernel then costs what
// it cost without the filter, plus the first stage (1/16 of the arithmetic).
constexpr int kGroupExact = 4;

// Writes centre t's bound coordinates y [kBoundDims] into the lead / tail layout of the
// centre tables below.
inline void put_centre_coords(float* lead, float* tail, int64_t t, const float* y) {
  for (int j = 0; j < kBoundLead; ++j) lead[(t / 8 * kBoundLead + j) * 8 + t % 8] = y[j];
  std::memcpy(tail + t * kBoundTail, y + kBoundLead, sizeof(float) * kBoundTail);
}

// What a lazy arg-max knows of the centres, in selection order. refresh() and
// shard_argmax() read them through row(t), lead_data() and tail_data():
//   row(t): the centre's features [dim];
//   lead: axes 0..7 of the centres' bound coordinates (coreset_bound.h), laid out
//         [t / 8][axis][t % 8] so that one vector holds one axis of 8 consecutive centres;
//   tail: axes 8..31, [t][24].
// Two holders of that layout: CentreTables below (one thread of greedy_coreset: each
// thread writes its own copy after the step's barrier, so no thread reads what another is
// writing; rows[t] points into the kernel's `centres`, or into x for the newest) and
// CentreBlock (one rank of the distributed coreset: views of its state tensors, the rows
// contiguous).
struct CentreTables {
  std::vector<const float*> rows;
  std::vector<float> lead, tail;

  CentreTables(int64_t k, bool bounded) {
    rows.reserve(static_cast<size_t>(k));
    if (bounded) {
      lead.assign(static_cast<size_t>((k + 7) / 8 * 8 * kBoundLead), 0.f);
      tail.assign(static_cast<size_t>(k * kBoundTail), 0.f);
    }
  }
  // row: the centre's features; y: its kBoundDims bound coordinates (unused when unbounded).
  void add(const float* row, const float* y) {
    const int64_t t = static_cast<int64_t>(rows.size());
    rows.push_back(row);
    if (!lead.empty()) put_centre_coords(lead.data(), tail.data(), t, y);
  }
  const float* row(int64_t t) const { return rows[t]; }
  const float* lead_data() const { return lead.data(); }
  const float* tail_data() const { return tail.data(); }
};

// The same tables over caller-owned memory: rows [k, dim] contiguous, lead
// [ceil(k / 8) * 8 * kBoundLead], tail [k * kBoundTail] (both unused when unbounded).
struct CentreBlock {
  const float* rows;
  int64_t dim;
  const float* lead;
  const float* tail;
  const float* row(int64_t t) const { return rows + t * dim; }
  const float* lead_data() const { return lead; }
  const float* tail_data() const { return tail; }
};

// Brings point i's min_d u up to date with centres s, s + 1, ... of the t there are,
// stopping as soon as the point's key falls below `bar` (it cannot be the arg-max now).
// Returns how many centres it has then seen. Every distance it takes into u is sqdist's,
// so u is the same min_d whichever centres were skipped (only centres that cannot lower
// it are) and however the work was grouped.
//
// Args:
//   xi: the point's row [dim]; yi: its bound coordinates [kBoundDims] (bound.on only).
template <typename Centres>
inline int64_t refresh(const float* xi, const float* yi, int32_t i, int64_t dim,
                       const Centres& tab, const SubspaceBound& bound, int64_t s, int64_t t,
                       float& u, ArgmaxKey bar) {
  using sqdist_detail::Lanes;
  using sqdist_detail::load;
  // Exact distances to the 8 centres from c on, together (sqdist_group: sqdist's bits).
  const auto group_min = [&](int64_t c) {
    const float* rows[kSqdistGroup];
    for (int q = 0; q < kSqdistGroup; ++q) rows[q] = tab.row(c + q);
    float dist[kSqdistGroup];
    sqdist_group(xi, rows, dim, dist);
    for (int q = 0; q < kSqdistGroup; ++q) u = std::min(u, dist[q]);
  };
  if (u == 0.f) return t;  // nothing is closer than 0: up to date whatever the centres
  if (!bound.on) {
    // Centres kSqdistGroup at a time; a group is used whole (a tighter upper bound is
    // still an upper bound, and the return value records exactly what was seen).
    while (s < t) {
      if (t - s >= kSqdistGroup) {
        group_min(s);
        s += kSqdistGroup;
      } else {
        u = std::min(u, sqdist(xi, tab.row(s), dim));
        s += 1;
      }
      if (u == 0.f) return t;
      if (pack_key(u, static_cast<uint32_t>(i)) < bar) break;
    }
    return s;
  }
  float T = bound.threshold(u);
  // Groups of 8 centres aligned on the `lead` table; lanes outside [s, t) are masked.
  for (int64_t g = s / 8; g * 8 < t; ++g) {
    const int64_t lo = std::max<int64_t>(s - g * 8, 0), hi = std::min<int64_t>(t - g * 8, 8);
    const unsigned lanes = (0xFFu << lo) & (0xFFu >> (8 - hi));
    // Stage 1: axes 0..7, one vector per axis over the group's 8 centres.
    const float* lead = tab.lead_data() + g * 8 * kBoundLead;
    Lanes acc[4];
    for (int j = 0; j < 4; ++j) {
      const Lanes d = yi[j] - load(lead + 8 * j);
      acc[j] = d * d;
    }
    for (int j = 4; j < kBoundLead; ++j) {
      const Lanes d = yi[j] - load(lead + 8 * j);
      acc[j - 4] += d * d;
    }
    const Lanes L = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    unsigned pass = 0;
    for (int c = 0; c < 8; ++c) pass |= static_cast<unsigned>(!(L[c] > T)) << c;
    pass &= lanes;
    if (pass != 0) {
      const float before = u;
      if (lanes == 0xFFu && __builtin_popcount(pass) >= kGroupExact) {
        group_min(g * 8);
      } else {
        for (unsigned m = pass; m != 0; m &= m - 1) {
          const int c = __builtin_ctz(m);
          // Stage 2: axes 8..31, added to the first stage's partial sum.
          const float* tc = tab.tail_data() + (g * 8 + c) * kBoundTail;
          Lanes sum = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          for (int j = 0; j < kBoundTail; j += 8) {
            const Lanes d = load(yi + kBoundLead + j) - load(tc + j);
            sum += d * d;
          }
          if (L[c] + sqdist_detail::lane_sum(sum) > T) continue;  // cannot lower u
          u = std::min(u, sqdist(xi, tab.row(g * 8 + c), dim));
        }
      }
      if (u != before) T = bound.threshold(u);
    }
    s = g * 8 + hi;
    if (u == 0.f) return t;
    if (pack_key(u, static_cast<uint32_t>(i)) < bar) break;
  }
  return s;
}

// One shard's lazy arg-max for step t (t centres exist, in `tab`). Refreshes the top
// point of the shard's heap and puts it back lower, until either the top point is up to
// date and still above the rest of the heap (its exact local maximum: returned, out of
// the heap, offered to `best`), or the heap's top falls below `best` (returns -1). See
// the header for why this is exact.
template <typename Centres>
inline int32_t shard_argmax(const float* x, int64_t dim, const SubspaceBound& bound, int64_t t,
                     const Centres& tab, KeyHeap& heap, float* ub, int32_t* last,
                     std::atomic<ArgmaxKey>& best) {
  while (!heap.empty()) {
    const ArgmaxKey known = best.load(std::memory_order_relaxed);
    const ArgmaxKey top = heap.top();
    if (top < known) return -1;  // nothing here can beat a real key
    const int32_t i = key_index(top);
    // The point is behind (cannot be the arg-max now) once below the next heap key or
    // below a key another shard already has.
    const ArgmaxKey bar = std::max(heap.second(), known);
    float u = ub[i];
    const float* yi = bound.on ? bound.y + static_cast<int64_t>(i) * kBoundDims
                               : nullptr;
    const int64_t s = refresh(x + static_cast<int64_t>(i) * dim, yi, i, dim, tab, bound,
                              last[i], t, u, bar);
    ub[i] = u;
    last[i] = static_cast<int32_t>(s);
    const ArgmaxKey key = pack_key(u, static_cast<uint32_t>(i));
    if (key < bar) {
      heap.replace_top(key);
      continue;
    }
    // refresh() stops early only below bar, so the point is up to date, and its key is >=
    // every other key of the shard: its exact local maximum.
    heap.pop_top();
    ArgmaxKey cur = known;
    while (cur < key &&
           !best.compare_exchange_weak(cur, key, std::memory_order_relaxed)) {
    }
    return i;
  }
  return -1;
}

}  // namespace patchcore_fast
