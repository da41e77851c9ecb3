#pragma once
// The candidate pool of the CPU k-NN kernels and the fused tile selection that feeds it,
// written once for the exact passes (knn.cpp) and the projected pre-pass (knn_project.cpp):
// faiss's result-handler idea, a running threshold, a push below it, nth_element when full.
//
// A pool collects, for one query row, the bank rows whose value (an expanded or projected
// squared distance, or an exact distance) may still belong to the answer. Invariant: every
// bank row seen and not in the pool has value >= thr, and thr only decreases. Bank rows
// arrive in increasing index order, so a later value equal to thr rightly loses its tie
// ("lower index first").
//
// What the pool keeps above the k-th value v_k is the band: every entry below v_k + band.
//   * band = 0: the k smallest (value, index) seen, in a buffer of 2k (the pre-pass, with
//     k its c candidates, and the last-resort exact scan). A compaction keeps the k
//     smallest and sets thr to the largest of them.
//   * band = the expansion's error band (the first and second passes of knn.cpp): every
//     row that may be among the exact k nearest whatever the rounding, see knn.cpp's header.
//     A fixed-capacity pool whose band still fills more than half of it after a compaction
//     is cut back to its best half and marked cut (its certificate may fail); a growable
//     one doubles.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace patchcore_fast {

// One candidate: a value and its bank row, ordered by (value, index), the "lower index
// first on exact ties" rule.
struct Entry {
  float v;
  int32_t i;
};
inline bool operator<(const Entry& a, const Entry& b) {
  return a.v < b.v || (a.v == b.v && a.i < b.i);
}

struct CandidatePool {
  Entry* e;        // storage for cap entries
  int64_t n;       // entries held
  int64_t cap;     // capacity (a growable pool doubles it)
  int64_t k;       // places that must be kept (the pool never holds fewer once it has seen k)
  float thr;       // admission threshold
  float band;      // width of the band kept above the k-th value
  bool cut;        // the band overflowed a fixed-capacity pool: some band rows were dropped
  std::vector<Entry>* grow;  // storage of a growable pool (nullptr: fixed capacity)

  // Args:
  //   e: storage for cap entries (grow->data() when growable); k >= 1; cap >= 2k.
  static CandidatePool make(Entry* e, int64_t cap, int64_t k, float band,
                            std::vector<Entry>* grow = nullptr) {
    return CandidatePool{e, 0, cap, k, std::numeric_limits<float>::infinity(), band, false,
                         grow};
  }

  // Trims the pool to its band: thr <- min(thr, v_k + band), then drops the entries
  // >= thr. The k smallest entries always stay (with band = 0, or every row at the same
  // point, v_k itself would not be < thr); dropped entries are >= thr, so the invariant holds.
  void trim() {
    if (n <= k) return;
    std::nth_element(e, e + (k - 1), e + n);
    const float t = e[k - 1].v + band;
    if (t < thr) thr = t;
    n = std::partition(e + k, e + n, [&](const Entry& x) { return x.v < thr; }) - e;
  }

  // A full pool: trim; when the band still fills more than half the pool, a growable pool
  // doubles, a fixed one keeps its cap / 2 best entries (thr = the last kept value, so the
  // invariant holds) and is marked cut.
  void compact() {
    trim();
    if (2 * n <= cap) return;
    if (grow != nullptr) {
      cap *= 2;
      grow->resize(static_cast<size_t>(cap));
      e = grow->data();
      return;
    }
    const int64_t keep = cap / 2;
    std::nth_element(e, e + (keep - 1), e + n);
    n = keep;
    thr = e[keep - 1].v;
    cut = true;
  }

  void push(float v, int32_t i) {
    if (v < thr) {
      e[n++] = Entry{v, i};
      if (n == cap) compact();
    }
  }
};

// Fused selection of one query row over one GEMM tile: v = ||b||^2 - 2 q.b (one fma,
// rounded once, the same in the vector filter and in the push: the value the kernels'
// error bounds cover) into the row's pool. A vectorised min over 16 values compared with
// the threshold rejects almost every group with one compare.
//   ip: [nb] inner products q.b of this row (centred or projected rows); bn: [nb] the
//   squared norms of the tile's bank rows, in the same space; j0: first bank row of the tile.
inline void select_tile_row(const float* ip, const float* bn, int64_t j0, int64_t nb,
                            CandidatePool& p) {
  constexpr int64_t W = 16;
  int64_t j = 0;
  for (; j + W <= nb; j += W) {
    float m = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : m)
    for (int64_t t = 0; t < W; ++t) m = std::min(m, std::fma(-2.f, ip[j + t], bn[j + t]));
    if (!(m < p.thr)) continue;  // the common case: nothing in these 16 can enter
    for (int64_t t = 0; t < W; ++t) {
      p.push(std::fma(-2.f, ip[j + t], bn[j + t]), static_cast<int32_t>(j0 + j + t));
    }
  }
  for (; j < nb; ++j) p.push(std::fma(-2.f, ip[j], bn[j]), static_cast<int32_t>(j0 + j));
}

}  // namespace patchcore_fast
