// Exact brute-force k nearest neighbours on the CPU, faiss-style, with no slow path.
//
// Squared L2 = ||q||^2 + ||b||^2 - 2 q.b on query and bank *centred on the bank's mean*
// (distances do not change under a common translation, while the expansion's error bound
// shrinks from the data's norms to its spread; see csrc/knn_bound.h). Queries are cut into
// chunks and the bank into tiles; each tile is centred into a reused scratch buffer, and
// each (query block, tile) pair is one fp32 GEMM (at::mm_out into a small reused buffer)
// followed by a fused pass that adds ||b||^2 and feeds each query row's candidate pool: one
// vectorised min over 16 tile entries compared with the row's threshold rejects almost all
// of them with one compare. The full Q x M matrix never exists, nor does a centred copy of
// the whole bank (at 16,386 x 1,024 that copy and its first-touch page faults cost more
// than all the selection work): scratch is one centred tile, one [rows, tile] GEMM output,
// the centred query chunk and one pool per row. Only the mean and the centred norms need a
// pass over the whole bank before the tiles.
//
// The pool keeps the *error band* of the k-th place, not a fixed count: every row whose
// expanded value is below  v_k + band,  v_k the k-th smallest value seen so far and
// band = 2 E(q) (E the expansion's error bound for this query). A row outside the pool then
// has true squared distance >= v_k + ||q||^2 + E, at least that of each of the k rows that
// realise v_k, so the exact k nearest are inside the pool, whatever the near-ties: the
// certificate of knn_bound.h holds by construction, and the direct-difference refinement of
// the pool gives the exact answer. The pool has a fixed capacity per row; only a row whose
// band holds more rows than that (massive exact or near ties, e.g. duplicated bank rows) is
// cut back to its best entries, fails the certificate, and goes to the second pass: the
// same tiled GEMM machinery for just those rows, with growable pools and a band of 3 E
// (which also covers the fp32 rounding of the refined distances), certified by
// construction. A last-resort exact scan of the bank stays behind the certificate of the
// second pass, counted separately; it is not expected to run (tests check it does not).
//
// On wide low-rank data (real CNN patch features) a projected lower-bound pre-pass comes
// first (knn_project.h): a GEMM on 32 principal coordinates ranks the bank, the best
// k + 48 rows are refined in that order until a rigorous lower bound proves the rest
// cannot enter, and only the rows it cannot certify go through the passes below. It is
// taken by a rule (width, work, captured variance, a pilot) that keeps it off where it
// would not pay (isotropic data, narrow features); the answer does not depend on it.
//
// Parallelism: with enough queries, each thread owns a chunk of query rows (centring
// each bank tile itself, then single-threaded GEMMs of 256-row blocks against it, each
// followed by its own selection while the output is still in cache): no synchronisation
// between tiles and no threaded-GEMM overhead; the only duplicated work is the centring
// of the tiles, one subtraction per bank element per thread. With few queries, the chunks
// run one after another with the threaded GEMM and row-parallel centring and selection.
//
// Where the time goes (WRN-50 features, 6,272 x 16,386 x 1,024, per-thread CPU time):
// the GEMMs about 96 %, selection 2 %, centring, refinement and setup about 2 % together;
// the kernel runs at the speed of torch's single-threaded sgemm (MKL), as faiss-cpu runs at
// that of its OpenBLAS sgemm.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "../knn_bound.h"
#include "knn_project.h"
#include "parallel.h"
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
// Bound on the GEMM output buffer, and on the centred tile, when chunks run one after
// another (few queries).
constexpr int64_t kTileBudgetBytes = int64_t{64} << 20;
// Bound on each thread's centred tile when threads own chunks ([1024, 1024] fp32 is 4 MB;
// wider rows get fewer tile rows).
constexpr int64_t kThreadTileBytes = int64_t{8} << 20;
// Bound on the candidate pools and centred query rows of the chunks processed at the
// same time (threads own chunks).
constexpr int64_t kChunkBudgetBytes = int64_t{64} << 20;
// Bound on the candidate pools of the rows processed at the same time.
constexpr int64_t kPoolBudgetBytes = int64_t{32} << 20;
// Pool capacity of the first pass: at least this many entries per row.
constexpr int64_t kMinPoolCap = 64;

// Capacity of a first-pass pool (entries per query row).
inline int64_t pool_cap(int64_t k) {
  return std::max<int64_t>(kMinPoolCap, 4 * (k + knn_detail::kExtraCandidates));
}

// One candidate, (value, bank row), ordered by (value, index): knn_project.h's.
using knn_project::Entry;

// Candidate pool of one query row. Invariant: every bank row seen and not in the pool has
// value >= thr (thr only decreases). Bank rows arrive in increasing index order, so an
// entry equal to thr is rightly rejected.
struct Pool {
  Entry* e;       // storage for cap entries
  int64_t n;      // entries held
  int64_t cap;    // capacity (a growable pool doubles it)
  float thr;      // admission threshold
  float band;     // width of the error band kept above the k-th value
  bool cut;       // the band overflowed a fixed-capacity pool: some band rows were dropped
};

// Storage of the pools of one block: fixed-capacity slices of one array (first pass), or
// one growable vector per row (second pass).
struct PoolStore {
  std::vector<Entry> flat;
  std::vector<std::vector<Entry>> grow;
};

// Trims a pool to its error band: thr <- min(thr, v_k + band), then drops the entries
// >= thr. The k smallest entries always stay (with band = 0, e.g. every row at the same
// point, v_k itself would not be < thr), so a pool never holds fewer than k entries once it
// has seen k; dropped entries are >= thr, so the invariant holds.
inline void pool_trim(Pool& p, int64_t k) {
  if (p.n <= k) return;
  std::nth_element(p.e, p.e + (k - 1), p.e + p.n);
  const float t = p.e[k - 1].v + p.band;
  if (t < p.thr) p.thr = t;
  p.n = std::partition(p.e + k, p.e + p.n, [&](const Entry& x) { return x.v < p.thr; }) - p.e;
}

// Compaction of a full pool: thr <- min(thr, v_k + band), drop entries >= thr. When the
// band still fills more than half the pool, a growable pool doubles; a fixed one keeps
// its cap / 2 best entries (thr = the last kept value, so the invariant holds) and is
// marked cut: the certificate may fail, and the row goes to the second pass.
inline void pool_compact(Pool& p, int64_t k, std::vector<Entry>* grow) {
  pool_trim(p, k);
  if (2 * p.n <= p.cap) return;
  if (grow != nullptr) {
    p.cap *= 2;
    grow->resize(static_cast<size_t>(p.cap));
    p.e = grow->data();
    return;
  }
  const int64_t keep = p.cap / 2;
  std::nth_element(p.e, p.e + (keep - 1), p.e + p.n);
  p.n = keep;
  p.thr = p.e[keep - 1].v;
  p.cut = true;
}

inline void pool_push(Pool& p, int64_t k, float v, int32_t i, std::vector<Entry>* grow) {
  if (v < p.thr) {
    p.e[p.n++] = Entry{v, i};
    if (p.n == p.cap) pool_compact(p, k, grow);
  }
}

// Fused selection of one query row over one GEMM tile: e = ||b||^2 - 2 q.b (one fma,
// rounded once, the same in the vector filter and the scalar insert) into the row pool.
//   ip: [nb] inner products q.b of this row; bn: [nb] bank norms of the tile; j0: first
//   bank row of the tile.
inline void select_tile_row(const float* ip, const float* bn, int64_t j0, int64_t nb, Pool& p,
                            int64_t k, std::vector<Entry>* grow) {
  constexpr int64_t W = 16;
  int64_t j = 0;
  for (; j + W <= nb; j += W) {
    float m = kInf;
#pragma omp simd reduction(min : m)
    for (int64_t t = 0; t < W; ++t) m = std::min(m, std::fma(-2.f, ip[j + t], bn[j + t]));
    if (!(m < p.thr)) continue;  // the common case: nothing in these 16 can enter
    for (int64_t t = 0; t < W; ++t) {
      const float v = std::fma(-2.f, ip[j + t], bn[j + t]);
      if (v < p.thr) pool_push(p, k, v, static_cast<int32_t>(j0 + j + t), grow);
    }
  }
  for (; j < nb; ++j) {
    pool_push(p, k, std::fma(-2.f, ip[j], bn[j]), static_cast<int32_t>(j0 + j), grow);
  }
}

// Euclidean distance from an exact squared distance, clamped at 0 (direct differences
// never go negative, but keep the guard). Ranking happens on these values, so that "lower
// index first" holds for the distances as returned, even where two squared distances
// round to the same float after the square root.
inline float euclid(float sq) { return std::sqrt(std::max(sq, 0.f)); }

// Exact scan of the whole bank with direct differences: the last resort behind the second
// pass's certificate (see the file header). Keeps a bounded pool, no full sort.
void exact_scan_row(const float* q, const float* bank, int64_t m, int64_t d, int64_t k,
                    float* od, int64_t* oi) {
  std::vector<Entry> e(static_cast<size_t>(2 * k));
  Pool p{e.data(), 0, 2 * k, kInf, 0.f, false};
  for (int64_t j = 0; j < m; ++j) {
    const float v = euclid(sqdist(q, bank + j * d, d));
    if (p.n < k || v < p.thr) {
      p.e[p.n++] = Entry{v, static_cast<int32_t>(j)};
      if (p.n == p.cap) {
        std::nth_element(p.e, p.e + (k - 1), p.e + p.n);
        p.n = k;
        p.thr = p.e[k - 1].v;
      }
    }
  }
  std::partial_sort(p.e, p.e + k, p.e + p.n);
  for (int64_t t = 0; t < k; ++t) {
    od[t] = p.e[t].v;
    oi[t] = p.e[t].i;
  }
}

struct Problem {
  const float* query;   // [Q, D] as given (refinement; centred per chunk for the GEMM)
  const float* bank;    // [M, D] as given (refinement; centred per tile for the GEMM)
  const float* mean;    // [D] the bank's mean, the centre of the expansion
  const float* bn;      // [M] ||b - mean||^2 (computed in double, rounded once)
  int64_t m, d, k;
  double bmax;          // max ||b - mean||
  ExpansionBound bound;
  float* out_d;         // [Q, k]
  int64_t* out_i;       // [Q, k]
  // Statistics: rows of the second pass, rows of the last-resort exact scan, and the
  // candidates refined with direct differences.
  std::atomic<int64_t>* second_pass;
  std::atomic<int64_t>* exact_scans;
  std::atomic<int64_t>* refined;
};

// Refines, certifies and writes one query row from its pool (knn_bound.h, steps 2-3).
// Returns false when the certificate fails (nothing written).
bool finish_row(const Problem& P, int64_t row, Pool& p, double qn, double e_bound) {
  const float* q = P.query + row * P.d;
  float* od = P.out_d + row * P.k;
  int64_t* oi = P.out_i + row * P.k;
  // A pool is trimmed only when it fills up, so it still holds the entries admitted under
  // an older, higher threshold: trim it to the final band first, which leaves only the rows
  // the certificate needs to see refined (on Gaussian data, 1-2 per row instead of ~20).
  pool_trim(p, P.k);
  const float thr = p.thr;  // every bank row outside the pool has e(q, b) >= thr
  for (int64_t t = 0; t < p.n; ++t) {
    p.e[t].v = euclid(sqdist(q, P.bank + static_cast<int64_t>(p.e[t].i) * P.d, P.d));
  }
  P.refined->fetch_add(p.n, std::memory_order_relaxed);
  std::partial_sort(p.e, p.e + P.k, p.e + p.n);
  if (p.n < P.m) {
    // k-th winner's squared distance, recomputed: the same deterministic value.
    const float kth_sq = sqdist(q, P.bank + static_cast<int64_t>(p.e[P.k - 1].i) * P.d, P.d);
    if (!(static_cast<double>(kth_sq) <= static_cast<double>(thr) + qn - e_bound)) {
      return false;
    }
  }
  for (int64_t t = 0; t < P.k; ++t) {
    od[t] = p.e[t].v;
    oi[t] = p.e[t].i;
  }
  return true;
}

// One chunk of query rows rows[0, tq) against the whole bank, in tiles of tb bank rows.
// Each tile is centred once into a scratch buffer (the bank itself is never copied as a
// whole), then multiplied by the chunk's centred rows gemm_rows at a time.
//   second: second pass (growable pools, band 3 E); failing rows go to the exact scan.
//   parallel_rows: parallelise centring, selection and refinement over rows, with a
//   threaded GEMM (chunks run one after another); false when the caller already runs
//   chunks in parallel (single-threaded GEMM on this thread's chunk).
//   gemm_rows: query rows per GEMM (its output, [gemm_rows, tb], is the only distance
//   scratch).
//   failed: receives the rows whose certificate failed (first pass only).
void knn_block(const Problem& P, const int64_t* rows, int64_t tq, int64_t tb,
               int64_t gemm_rows, bool second, bool parallel_rows,
               std::vector<int64_t>& failed) {
  const int64_t d = P.d;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  // Centred query block (GEMM side) and the per-row bound.
  at::Tensor qblock = at::empty({tq, d}, opts);
  float* qc = qblock.data_ptr<float>();
  std::vector<double> qn(tq), eb(tq);
  auto centre = [&](int64_t r) {
    float* dst = qc + r * d;
    centre_row(P.query + rows[r] * d, P.mean, d, dst);
    qn[r] = sqnorm_double(dst, d);
    eb[r] = P.bound(std::sqrt(qn[r]), P.bmax);
  };

  const int64_t cap = pool_cap(P.k);
  PoolStore store;
  std::vector<Pool> pools(tq);
  if (second) {
    store.grow.resize(tq);
  } else {
    store.flat.resize(static_cast<size_t>(tq * cap));
  }
  auto init = [&](int64_t r) {
    centre(r);
    Entry* e;
    if (second) {
      store.grow[r].resize(static_cast<size_t>(cap));
      e = store.grow[r].data();
    } else {
      e = store.flat.data() + r * cap;
    }
    // band: 2 E in the first pass; 3 E in the second, which also covers the fp32 rounding
    // of the refined k-th distance (gamma_D d^2 <= E). Rounded up by a relative 2^-20
    // so that the float sum v_k + band cannot fall below the exact one.
    const double band = (second ? 3.0 : 2.0) * eb[r] * (1.0 + std::ldexp(1.0, -20));
    pools[r] = Pool{e, 0, cap, kInf, static_cast<float>(band), false};
  };

  auto for_rows = [&](const auto& fn) {
    if (parallel_rows) {
      at::parallel_for(0, tq, 1, [&](int64_t a, int64_t b) {
        for (int64_t r = a; r < b; ++r) fn(r);
      });
    } else {
      for (int64_t r = 0; r < tq; ++r) fn(r);
    }
  };
  for_rows(init);

  const int64_t tb_max = std::min(tb, P.m);
  gemm_rows = std::min(gemm_rows, tq);
  at::Tensor tile = at::empty({tb_max, d}, opts);  // the centred bank tile
  float* tc = tile.data_ptr<float>();
  at::Tensor buf = at::empty({gemm_rows * tb_max}, opts);
  for (int64_t j0 = 0; j0 < P.m; j0 += tb) {
    const int64_t nb = std::min(tb, P.m - j0);
    // fl(b - mu): the same rounding as the norms P.bn were computed from.
    auto centre_tile = [&](int64_t a, int64_t e) {
      for (int64_t j = a; j < e; ++j) centre_row(P.bank + (j0 + j) * d, P.mean, d, tc + j * d);
    };
    if (parallel_rows) {
      at::parallel_for(0, nb, 64, centre_tile);
    } else {
      centre_tile(0, nb);
    }
    const at::Tensor tile_t = tile.narrow(0, 0, nb).t();
    for (int64_t r0 = 0; r0 < tq; r0 += gemm_rows) {
      const int64_t cnt = std::min(gemm_rows, tq - r0);
      at::Tensor ip = buf.narrow(0, 0, cnt * nb).view({cnt, nb});
      at::mm_out(ip, qblock.narrow(0, r0, cnt), tile_t);  // ip[r, j] = q_r . b_j
      const float* ipp = ip.data_ptr<float>();
      auto sel = [&](int64_t r) {
        select_tile_row(ipp + (r - r0) * nb, P.bn + j0, j0, nb, pools[r], P.k,
                        second ? &store.grow[r] : nullptr);
      };
      if (parallel_rows) {
        at::parallel_for(r0, r0 + cnt, 1, [&](int64_t a, int64_t b) {
          for (int64_t r = a; r < b; ++r) sel(r);
        });
      } else {
        for (int64_t r = r0; r < r0 + cnt; ++r) sel(r);
      }
    }
  }
  std::vector<char> ok(tq, 1);
  for_rows([&](int64_t r) {
    const int64_t row = rows[r];
    if (finish_row(P, row, pools[r], qn[r], eb[r])) return;
    ok[r] = 0;
    if (second) {
      P.exact_scans->fetch_add(1, std::memory_order_relaxed);
      exact_scan_row(P.query + row * d, P.bank, P.m, d, P.k, P.out_d + row * P.k,
                     P.out_i + row * P.k);
    }
  });
  if (!second) {
    for (int64_t r = 0; r < tq; ++r) {
      if (!ok[r]) failed.push_back(rows[r]);
    }
  }
}

// Runs the rows rows[0, n) through knn_block, choosing the parallel layout.
void run_rows(const Problem& P, const int64_t* rows, int64_t n, bool second,
              std::vector<int64_t>& failed) {
  if (n == 0) return;
  const int64_t nthreads = std::max(1, at::get_num_threads());
  const int64_t pool_row_bytes = pool_cap(P.k) * static_cast<int64_t>(sizeof(Entry));
  const int64_t row_bytes = pool_row_bytes + P.d * static_cast<int64_t>(sizeof(float));
  if (nthreads > 1 && n >= 16 * nthreads) {
    // Equal chunks, a multiple of the thread count, so the static split is balanced;
    // chunk rows bounded so that the pools and centred rows of all threads fit the budget.
    const int64_t rows_cap = std::max<int64_t>(
        kBlockRows, std::min<int64_t>(kPoolBudgetBytes / nthreads / pool_row_bytes,
                                      kChunkBudgetBytes / nthreads / row_bytes));
    int64_t nblocks = (n + rows_cap - 1) / rows_cap;
    nblocks = (nblocks + nthreads - 1) / nthreads * nthreads;
    const int64_t tq = (n + nblocks - 1) / nblocks;
    nblocks = (n + tq - 1) / tq;
    const int64_t tb = std::max<int64_t>(
        1, std::min<int64_t>(kTileCols, kThreadTileBytes / (4 * P.d)));
    std::vector<std::vector<int64_t>> local(nblocks);
    parallel_for_tls(0, nblocks, 1, [&](int64_t a, int64_t b) {
      // Inside the parallel region the GEMM runs single-threaded on this thread's chunk.
      for (int64_t blk = a; blk < b; ++blk) {
        const int64_t r0 = blk * tq;
        knn_block(P, rows + r0, std::min(tq, n - r0), tb, kBlockRows, second, false,
                  local[blk]);
      }
    });
    for (auto& v : local) failed.insert(failed.end(), v.begin(), v.end());
  } else {
    const int64_t tq = std::max<int64_t>(1, std::min<int64_t>(n, kPoolBudgetBytes / pool_row_bytes));
    for (int64_t r0 = 0; r0 < n; r0 += tq) {
      const int64_t cnt = std::min(tq, n - r0);
      const int64_t tb = std::max<int64_t>(
          1, std::min({P.m, kTileBudgetBytes / (4 * cnt), kTileBudgetBytes / (4 * P.d)}));
      knn_block(P, rows + r0, cnt, tb, cnt, second, true, failed);
    }
  }
}

// knn with statistics: (distances [Q, k], indices [Q, k], stats [6] int64 = rows,
// rows of the second pass, rows of the last-resort exact scan, candidates refined (all
// passes), rows sent through the projected pre-pass (0 when it is off), rows it
// certified; the others went through the first pass).
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_stats_cpu(const at::Tensor& query_in,
                                                             const at::Tensor& bank_in,
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
  at::Tensor stats = at::zeros({6}, query.options().dtype(at::kLong));
  if (nq == 0) return {out_d, out_i, stats};

  // The centre: the bank's mean, accumulated in double and rounded once. Threads own
  // columns and add the rows in order, so the mean does not depend on the thread count.
  // Any centre gives exact distances; the mean makes the norms in the error bound the
  // bank's spread.
  const float* bp = bank.data_ptr<float>();
  std::vector<float> mean(d);
  at::parallel_for(0, d, 64, [&](int64_t c0, int64_t c1) {
    std::vector<double> acc(c1 - c0, 0.0);
    for (int64_t j = 0; j < m; ++j) {
      const float* row = bp + j * d + c0;
#pragma omp simd
      for (int64_t t = 0; t < c1 - c0; ++t) acc[t] += row[t];
    }
    for (int64_t t = 0; t < c1 - c0; ++t) mean[c0 + t] = static_cast<float>(acc[t] / m);
  });
  // Centred bank norms ||fl(b - mu)||^2 in double, rounded once to float (the GEMM side
  // of the expansion). The centred rows themselves are made tile by tile in knn_block,
  // with the same rounding, so the bank is never copied whole.
  std::vector<float> bn(m);
  double bmax2 = 0.0;
  {
    const float* mu = mean.data();
    std::vector<double> local_max(std::max(1, at::get_num_threads()), 0.0);
    at::parallel_for(0, m, 256, [&](int64_t a, int64_t e) {
      double mx = 0.0;
      for (int64_t j = a; j < e; ++j) {
        const float* row = bp + j * d;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t t = 0; t < d; ++t) {
          const double c = static_cast<double>(row[t] - mu[t]);
          s += c * c;
        }
        bn[j] = static_cast<float>(s);
        mx = std::max(mx, s);
      }
      double& slot = local_max[at::get_thread_num() % local_max.size()];
      slot = std::max(slot, mx);
    });
    for (double v : local_max) bmax2 = std::max(bmax2, v);
  }
  std::atomic<int64_t> second_pass{0}, exact_scans{0}, refined{0};
  Problem P{query.data_ptr<float>(),
            bank.data_ptr<float>(),
            mean.data(),
            bn.data(),
            m,
            d,
            k,
            std::sqrt(bmax2),
            ExpansionBound(d, knn_detail::matmul_input_roundoff(/*cuda=*/false)),
            out_d.data_ptr<float>(),
            out_i.data_ptr<int64_t>(),
            &second_pass,
            &exact_scans,
            &refined};

  std::vector<int64_t> all(nq);
  for (int64_t r = 0; r < nq; ++r) all[r] = r;
  // Projected pre-pass (knn_project.h) when the rule says it pays: the rows it certifies
  // are done; the others go through the passes below, unchanged.
  int64_t projected_rows = 0, projected_ok = 0;
  const knn_project::Projection proj =
      knn_project::make_projection(bp, mean.data(), m, d, std::sqrt(bmax2), nq, k);
  if (proj.on) {
    const int64_t nthreads = std::max(1, at::get_num_threads());
    const int64_t tq = std::max<int64_t>(
        1, std::min<int64_t>(knn_project::kRows, (nq + nthreads - 1) / nthreads));
    // The pilot (knn_project.h): the first rows alone (threaded GEMMs), and the others
    // only if it certified enough of them.
    const int64_t pilot = std::min(nq, knn_project::kRows);
    std::vector<int64_t> rest;
    const auto first = knn_project::prepass_chunk(proj, P.query, P.bank, P.mean, m, d, k,
                                                  all.data(), pilot, P.out_d, P.out_i, rest);
    refined += first.second;
    projected_rows = pilot;
    projected_ok = first.first;
    const bool go_on = proj.forced ||
                       static_cast<double>(first.first) >= knn_project::kMinPilot * pilot;
    const int64_t n2 = go_on ? nq - pilot : 0;
    const int64_t nchunks = (n2 + tq - 1) / tq;
    std::vector<std::vector<int64_t>> local(nchunks);
    std::atomic<int64_t> ok_rows{0};
    parallel_for_tls(0, nchunks, 1, [&](int64_t a, int64_t b) {
      for (int64_t c = a; c < b; ++c) {
        const int64_t r0 = pilot + c * tq;
        const auto res = knn_project::prepass_chunk(
            proj, P.query, P.bank, P.mean, m, d, k, all.data() + r0, std::min(tq, nq - r0),
            P.out_d, P.out_i, local[c]);
        ok_rows.fetch_add(res.first, std::memory_order_relaxed);
        refined.fetch_add(res.second, std::memory_order_relaxed);
      }
    });
    for (auto& v : local) rest.insert(rest.end(), v.begin(), v.end());
    if (!go_on) rest.insert(rest.end(), all.begin() + pilot, all.end());
    projected_rows += n2;
    projected_ok += ok_rows.load();
    all.swap(rest);
  }
  std::vector<int64_t> failed;
  run_rows(P, all.data(), static_cast<int64_t>(all.size()), /*second=*/false, failed);
  std::sort(failed.begin(), failed.end());
  second_pass = static_cast<int64_t>(failed.size());
  std::vector<int64_t> none;
  run_rows(P, failed.data(), static_cast<int64_t>(failed.size()), /*second=*/true, none);

  int64_t* s = stats.data_ptr<int64_t>();
  s[0] = nq;
  s[1] = second_pass.load();
  s[2] = exact_scans.load();
  s[3] = refined.load();
  s[4] = projected_rows;
  s[5] = projected_ok;
  return {out_d, out_i, stats};
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& query, const at::Tensor& bank,
                                           int64_t k) {
  auto r = knn_stats_cpu(query, bank, k);
  return {std::get<0>(r), std::get<1>(r)};
}

}  // namespace
}  // namespace patchcore_fast

TORCH_LIBRARY_IMPL(patchcore_fast, CPU, m) {
  m.impl("knn", &patchcore_fast::knn_cpu);
  m.impl("knn_stats", &patchcore_fast::knn_stats_cpu);
}
