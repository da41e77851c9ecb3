// Exact brute-force k nearest neighbours on the CPU, faiss-style.
//
// Squared L2 = ||q||^2 + ||b||^2 - 2 q.b. Queries are cut into blocks and the bank into
// tiles; each (block, tile) pair is one fp32 GEMM (at::mm_out into a small reused buffer,
// MKL) followed by a fused pass that adds ||b||^2 and keeps each query row's running pool
// of the best candidates: one vectorised min over 16 tile entries compared with the row's
// threshold rejects almost all of them with one compare. The full Q x M matrix never
// exists: scratch is one [rows, tile] buffer and one small pool per row.
//
// Parallelism: with enough queries, each thread owns whole query blocks (a
// single-threaded GEMM on its block then its own selection while the tile is still in
// its L2): no synchronisation between tiles and no threaded-GEMM overhead. With few
// queries, the blocks run one after another with the threaded GEMM and row-parallel
// selection.
//
// Accuracy: the winners (and the few extra candidates) are refined with direct
// differences and certified against the expansion's error bound; rows that fail get an
// exact scan. See csrc/knn_bound.h for the argument.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "../knn_bound.h"
#include "sqdist.h"

namespace patchcore_fast {
namespace {

using knn_detail::ExpansionBound;

constexpr float kInf = std::numeric_limits<float>::infinity();
// Rows per query block when threads own blocks (a [256, D] block is 1 MB at D = 1024).
constexpr int64_t kBlockRows = 256;
// Bank rows per tile when threads own blocks: [256, 1024] fp32 = 1 MB of GEMM output,
// which stays in a core's L2 for the selection pass that follows.
constexpr int64_t kTileCols = 1024;
// Bound on the GEMM output buffer when blocks run one after another (few queries).
constexpr int64_t kTileBudgetBytes = int64_t{64} << 20;
// Bound on the candidate pools of the rows processed at the same time.
constexpr int64_t kPoolBudgetBytes = int64_t{32} << 20;

// One candidate: value (expanded or exact squared distance) and bank row. Ordered by
// (value, index), which is the "lower index first on exact ties" rule.
struct Entry {
  float v;
  int64_t i;
};
inline bool operator<(const Entry& a, const Entry& b) {
  return a.v < b.v || (a.v == b.v && a.i < b.i);
}

// Running pool of one query row: up to cap = 2 kc entries; when full, it is cut back to
// its kc best (nth_element, amortised O(1) per accepted entry) and the threshold becomes
// the kc-th value. Bank rows arrive in increasing index order, so an entry equal to the
// threshold ranks after the kept one and is rightly rejected: invariant, every bank row
// not in the pool has value >= thr (thr only decreases).
struct Pool {
  Entry* e;
  int64_t n;
  float thr;
};

inline void pool_push(Pool& p, int64_t kc, int64_t cap, float v, int64_t i) {
  if (p.n < kc || v < p.thr) {
    p.e[p.n++] = Entry{v, i};
    if (p.n == cap) {
      std::nth_element(p.e, p.e + (kc - 1), p.e + p.n);
      p.n = kc;
      p.thr = p.e[kc - 1].v;
    }
  }
}


inline double sqnorm_double(const float* a, int64_t d) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t t = 0; t < d; ++t) s += static_cast<double>(a[t]) * a[t];
  return s;
}

// Fused selection of one query row over one GEMM tile: e = ||b||^2 - 2 q.b (one fma,
// rounded once, the same in the vector filter and the scalar insert) into the row pool.
//   ip: [nb] inner products q.b of this row; bn: [nb] bank norms of the tile; j0: first
//   bank row of the tile.
inline void select_tile_row(const float* ip, const float* bn, int64_t j0, int64_t nb, Pool& p,
                            int64_t kc, int64_t cap) {
  constexpr int64_t W = 16;
  int64_t j = 0;
  // Fill phase: the first kc entries are always taken.
  for (; j < nb && p.n < kc; ++j) pool_push(p, kc, cap, std::fma(-2.f, ip[j], bn[j]), j0 + j);
  for (; j + W <= nb; j += W) {
    float m = kInf;
#pragma omp simd reduction(min : m)
    for (int64_t t = 0; t < W; ++t) m = std::min(m, std::fma(-2.f, ip[j + t], bn[j + t]));
    if (!(m < p.thr)) continue;  // the common case: nothing in these 16 can enter
    for (int64_t t = 0; t < W; ++t) {
      const float v = std::fma(-2.f, ip[j + t], bn[j + t]);
      if (v < p.thr) pool_push(p, kc, cap, v, j0 + j + t);
    }
  }
  for (; j < nb; ++j) pool_push(p, kc, cap, std::fma(-2.f, ip[j], bn[j]), j0 + j);
}

// Writes the k best of pool entries e[0, n), whose values are Euclidean distances:
// ascending, exact ties (equal returned distances) by the lower bank index.
inline void write_best(Entry* e, int64_t n, int64_t k, float* od, int64_t* oi) {
  std::partial_sort(e, e + k, e + n);
  for (int64_t t = 0; t < k; ++t) {
    od[t] = e[t].v;
    oi[t] = e[t].i;
  }
}

// Euclidean distance from an exact squared distance, clamped at 0 (direct differences
// never go negative, but keep the guard). Ranking happens on these values, so that "lower
// index first" holds for the distances as returned, even where two squared distances
// round to the same float after the square root.
inline float euclid(float sq) { return std::sqrt(std::max(sq, 0.f)); }

// Exact scan of the whole bank with direct differences, for rows the certificate could
// not settle. scratch: room for 2 k entries.
void exact_scan_row(const float* q, const float* bank, int64_t m, int64_t d, int64_t k,
                    Entry* scratch, float* od, int64_t* oi) {
  Pool p{scratch, 0, kInf};
  for (int64_t j = 0; j < m; ++j) {
    pool_push(p, k, 2 * k, euclid(sqdist(q, bank + j * d, d)), j);
  }
  write_best(p.e, p.n, k, od, oi);
}

struct Problem {
  const float* query;  // [Q, D]
  const float* bank;   // [M, D]
  const float* bn;     // [M] ||b||^2 (computed in double, rounded once)
  int64_t m, d, k, kc, cap;
  double bmax;  // max ||b||
  ExpansionBound bound;
  float* out_d;    // [Q, k]
  int64_t* out_i;  // [Q, k]
};

// Refine, certify and write one query row from its pool (see knn_bound.h, steps 2-4).
void finish_row(const Problem& P, int64_t row, Pool& p, std::vector<Entry>& scan_scratch) {
  const float* q = P.query + row * P.d;
  float* od = P.out_d + row * P.k;
  int64_t* oi = P.out_i + row * P.k;
  const float thr = p.thr;  // every bank row outside the pool has e(q, b) >= thr
  for (int64_t t = 0; t < p.n; ++t) {
    p.e[t].v = euclid(sqdist(q, P.bank + p.e[t].i * P.d, P.d));
  }
  std::partial_sort(p.e, p.e + P.k, p.e + p.n);
  bool certified = p.n == P.m;  // the pool holds the whole bank
  if (!certified) {
    const double qn = sqnorm_double(q, P.d);
    const double lower = static_cast<double>(thr) + qn - P.bound(std::sqrt(qn), P.bmax);
    // The k-th winner's squared distance (recomputed: the same deterministic value).
    const float kth_sq = sqdist(q, P.bank + p.e[P.k - 1].i * P.d, P.d);
    certified = static_cast<double>(kth_sq) <= lower;
  }
  if (certified) {
    for (int64_t t = 0; t < P.k; ++t) {
      od[t] = p.e[t].v;
      oi[t] = p.e[t].i;
    }
  } else {
    scan_scratch.resize(2 * P.k);
    exact_scan_row(q, P.bank, P.m, P.d, P.k, scan_scratch.data(), od, oi);
  }
}

// One block of query rows [r0, r0 + tq) against the whole bank, in tiles of tb bank rows.
//   query_t / bank_t: the contiguous inputs as tensors (for at::mm_out).
//   parallel_rows: parallelise selection and refinement over rows (blocks run one after
//   another); false when the caller already runs blocks in parallel.
void knn_block(const Problem& P, const at::Tensor& query_t, const at::Tensor& bank_t,
               int64_t r0, int64_t tq, int64_t tb, bool parallel_rows) {
  std::vector<Entry> pool_mem(static_cast<size_t>(tq * P.cap));
  std::vector<Pool> pools(tq);
  for (int64_t r = 0; r < tq; ++r) pools[r] = Pool{pool_mem.data() + r * P.cap, 0, kInf};
  const int64_t tb_max = std::min(tb, P.m);
  at::Tensor buf = at::empty({tq * tb_max}, query_t.options());
  at::Tensor qblock = query_t.narrow(0, r0, tq);

  auto for_rows = [&](const auto& fn) {
    if (parallel_rows) {
      at::parallel_for(0, tq, 1, [&](int64_t a, int64_t b) {
        for (int64_t r = a; r < b; ++r) fn(r);
      });
    } else {
      for (int64_t r = 0; r < tq; ++r) fn(r);
    }
  };

  for (int64_t j0 = 0; j0 < P.m; j0 += tb) {
    const int64_t nb = std::min(tb, P.m - j0);
    at::Tensor ip = buf.narrow(0, 0, tq * nb).view({tq, nb});
    at::mm_out(ip, qblock, bank_t.narrow(0, j0, nb).t());  // ip[r, j] = q_r . b_j
    const float* ipp = ip.data_ptr<float>();
    for_rows([&](int64_t r) {
      select_tile_row(ipp + r * nb, P.bn + j0, j0, nb, pools[r], P.kc, P.cap);
    });
  }
  if (parallel_rows) {
    at::parallel_for(0, tq, 1, [&](int64_t a, int64_t b) {
      std::vector<Entry> scratch;
      for (int64_t r = a; r < b; ++r) finish_row(P, r0 + r, pools[r], scratch);
    });
  } else {
    std::vector<Entry> scratch;
    for (int64_t r = 0; r < tq; ++r) finish_row(P, r0 + r, pools[r], scratch);
  }
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& query_in, const at::Tensor& bank_in,
                                           int64_t k) {
  check_knn_args(query_in, bank_in, k);
  TORCH_CHECK(query_in.device().is_cpu(), "query should be a CPU tensor, got ",
              query_in.device());
  at::NoGradGuard no_grad;  // the GEMMs below write into buffers (out= ops)
  const at::Tensor query = query_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const int64_t nq = query.size(0), m = bank.size(0), d = bank.size(1);
  at::Tensor out_d = at::empty({nq, k}, query.options());
  at::Tensor out_i = at::empty({nq, k}, query.options().dtype(at::kLong));
  if (nq == 0) return {out_d, out_i};

  // Bank norms in double, rounded once to float (the GEMM side of the expansion).
  std::vector<float> bn(m);
  double bmax2 = 0.0;
  {
    const float* b = bank.data_ptr<float>();
    std::vector<double> local_max(std::max(1, at::get_num_threads()), 0.0);
    at::parallel_for(0, m, 256, [&](int64_t a, int64_t e) {
      double mx = 0.0;
      for (int64_t j = a; j < e; ++j) {
        const double s = sqnorm_double(b + j * d, d);
        bn[j] = static_cast<float>(s);
        mx = std::max(mx, s);
      }
      double& slot = local_max[at::get_thread_num() % local_max.size()];
      slot = std::max(slot, mx);
    });
    for (double v : local_max) bmax2 = std::max(bmax2, v);
  }

  const int64_t kc = knn_detail::candidate_count(k, m);
  const int64_t cap = 2 * kc;
  Problem P{query.data_ptr<float>(),
            bank.data_ptr<float>(),
            bn.data(),
            m,
            d,
            k,
            kc,
            cap,
            std::sqrt(bmax2),
            ExpansionBound(d, knn_detail::matmul_input_roundoff(/*cuda=*/false)),
            out_d.data_ptr<float>(),
            out_i.data_ptr<int64_t>()};

  const int64_t nthreads = std::max(1, at::get_num_threads());
  // Rows whose pools fit the pool budget at once (per thread when threads own blocks).
  const int64_t pool_row_bytes = cap * static_cast<int64_t>(sizeof(Entry));
  const bool threads_own_blocks = nthreads > 1 && nq >= 16 * nthreads;
  if (threads_own_blocks) {
    // Equal blocks, a multiple of the thread count, so the static split is balanced.
    const int64_t rows_cap = std::max<int64_t>(
        1, std::min<int64_t>(kBlockRows, kPoolBudgetBytes / nthreads / pool_row_bytes));
    int64_t nblocks = (nq + rows_cap - 1) / rows_cap;
    nblocks = (nblocks + nthreads - 1) / nthreads * nthreads;
    const int64_t tq = (nq + nblocks - 1) / nblocks;
    nblocks = (nq + tq - 1) / tq;
    at::parallel_for(0, nblocks, 1, [&](int64_t a, int64_t b) {
      // Inside the parallel region the GEMM runs single-threaded on this thread's block.
      for (int64_t blk = a; blk < b; ++blk) {
        const int64_t r0 = blk * tq;
        knn_block(P, query, bank, r0, std::min(tq, nq - r0), kTileCols, false);
      }
    });
  } else {
    const int64_t tq = std::max<int64_t>(
        1, std::min<int64_t>(nq, kPoolBudgetBytes / pool_row_bytes));
    for (int64_t r0 = 0; r0 < nq; r0 += tq) {
      const int64_t rows = std::min(tq, nq - r0);
      const int64_t tb = std::max<int64_t>(
          1, std::min<int64_t>(m, kTileBudgetBytes / (4 * rows)));
      knn_block(P, query, bank, r0, rows, tb, true);
    }
  }
  return {out_d, out_i};
}

}  // namespace
}  // namespace patchcore_fast

TORCH_LIBRARY_IMPL(patchcore_fast, CPU, m) {
  m.impl("knn", &patchcore_fast::knn_cpu);
}
