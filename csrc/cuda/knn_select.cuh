#pragma once
// Device helpers of the k-NN selection kernels (csrc/cuda/knn.cu).
//
// A candidate is (value, bank index); candidates are ordered lexicographically by
// (value, index), so equal values keep the lower bank index first and every reduction
// below gives the same answer whatever the thread layout.

#include <cuda_runtime.h>

#include <climits>
#include <cmath>

namespace patchcore_fast {
namespace knn_select {

constexpr unsigned kFullMask = 0xffffffffu;
// Index of an empty slot: ranks after every real bank row (M < INT_MAX is checked).
constexpr int kNoIndex = INT_MAX;

__device__ __forceinline__ bool cand_less(float va, int ia, float vb, int ib) {
  return va < vb || (va == vb && ia < ib);
}

// Per-thread sorted list of the KC best candidates, in registers (KC is a compile-time
// constant and every loop below is unrolled, so no dynamic register indexing).
template <int KC>
struct TopList {
  float v[KC];
  int i[KC];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int t = 0; t < KC; ++t) {
      v[t] = INFINITY;
      i[t] = kNoIndex;
    }
  }

  // Inserts (val, idx) if it beats the last entry: one compare rejects most candidates;
  // an accepted one replaces the last entry and bubbles to its place.
  __device__ __forceinline__ void push(float val, int idx) {
    if (!cand_less(val, idx, v[KC - 1], i[KC - 1])) return;
    v[KC - 1] = val;
    i[KC - 1] = idx;
#pragma unroll
    for (int t = KC - 1; t > 0; --t) {
      if (cand_less(v[t], i[t], v[t - 1], i[t - 1])) {
        const float tv = v[t];
        v[t] = v[t - 1];
        v[t - 1] = tv;
        const int ti = i[t];
        i[t] = i[t - 1];
        i[t - 1] = ti;
      }
    }
  }

  // Drops the head (the list's best), shifting the rest forward.
  __device__ __forceinline__ void pop_front() {
#pragma unroll
    for (int t = 0; t < KC - 1; ++t) {
      v[t] = v[t + 1];
      i[t] = i[t + 1];
    }
    v[KC - 1] = INFINITY;
    i[KC - 1] = kNoIndex;
  }
};

// Warp-wide arg-min of (value, index, owner): after the butterfly every lane holds the
// warp's smallest triple. The owner (thread id) makes the order total even between empty
// slots, so exactly one thread recognises itself as the winner.
__device__ __forceinline__ void warp_argmin(float& v, int& i, int& owner) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, v, off);
    const int oi = __shfl_xor_sync(kFullMask, i, off);
    const int oo = __shfl_xor_sync(kFullMask, owner, off);
    if (cand_less(ov, oi, v, i) || (ov == v && oi == i && oo < owner)) {
      v = ov;
      i = oi;
      owner = oo;
    }
  }
}

// Top-2 of two sorted pairs (a0 <= a1) and (b0 <= b1), written into (a0, a1).
__device__ __forceinline__ void merge_top2(float& a0, int& ia0, float& a1, int& ia1, float b0,
                                           int ib0, float b1, int ib1) {
  if (cand_less(b0, ib0, a0, ia0)) {
    // b0 is the best; the second is the better of a0 and b1.
    if (cand_less(b1, ib1, a0, ia0)) {
      a1 = b1;
      ia1 = ib1;
    } else {
      a1 = a0;
      ia1 = ia0;
    }
    a0 = b0;
    ia0 = ib0;
  } else if (cand_less(b0, ib0, a1, ia1)) {
    // a0 stays the best; b0 beats a1.
    a1 = b0;
    ia1 = ib0;
  }
}

}  // namespace knn_select
}  // namespace patchcore_fast
