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
// first (knn_project.cpp): a GEMM on 32 principal coordinates ranks the bank, the best
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
// Nearly all the time is in the GEMMs (bench/RESULTS.md, "Where the CPU k-NN's time goes").

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
#include "candidate_pool.h"
#include "knn_project.h"
#include "parallel.h"
#include "sqdist.h"

namespace patchcore_fast {
namespace {

using knn_detail::ExpansionBound;

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

// Storage of the pools of one block: fixed-capacity slices of one array (first pass), or
// one growable vector per row (second pass).
struct PoolStore {
  std::vector<Entry> flat;
  std::vector<std::vector<Entry>> grow;
};

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
  CandidatePool p = CandidatePool::make(e.data(), 2 * k, k, /*band=*/0.f);
  for (int64_t j = 0; j < m; ++j) {
    const float v = euclid(sqdist(q, bank + j * d, d));
    if (p.n < k && !(v < p.thr)) {
      p.e[p.n++] = Entry{v, static_cast<int32_t>(j)};  // +inf (an overflow) still fills a place
    } else {
      p.push(v, static_cast<int32_t>(j));
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
bool finish_row(const Problem& P, int64_t row, CandidatePool& p, double qn, double e_bound) {
  const float* q = P.query + row * P.d;
  float* od = P.out_d + row * P.k;
  int64_t* oi = P.out_i + row * P.k;
  // A pool is trimmed only when it fills up, so it still holds the entries admitted under
  // an older, higher threshold: trim it to the final band first, which leaves only the rows
  // the certificate needs to see refined (on Gaussian data, 1-2 per row instead of ~20).
  p.trim();
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
  std::vector<CandidatePool> pools(tq);
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
    pools[r] = CandidatePool::make(e, cap, P.k, static_cast<float>(band),
                                   second ? &store.grow[r] : nullptr);
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
        select_tile_row(ipp + (r - r0) * nb, P.bn + j0, j0, nb, pools[r]);
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

// The bank's side of the expansion: its mean, its centred norms and their maximum.
struct BankSide {
  at::Tensor mean;      // [D] float32
  at::Tensor bn;        // [M] float32: ||fl(b - mu)||^2 in double, rounded once
  double bmax2 = 0.0;   // max ||fl(b - mu)||^2 (in double, before rounding)
};

BankSide bank_side(const at::Tensor& bank) {
  const int64_t m = bank.size(0), d = bank.size(1);
  BankSide S;
  S.mean = at::empty({d}, bank.options());
  S.bn = at::empty({m}, bank.options());
  // The centre: the bank's mean, accumulated in double and rounded once. Threads own
  // columns and add the rows in order, so the mean does not depend on the thread count.
  // Any centre gives exact distances; the mean makes the norms in the error bound the
  // bank's spread.
  const float* bp = bank.data_ptr<float>();
  float* mean = S.mean.data_ptr<float>();
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
  // The bank's NaN / Inf check rides on this pass (check_knn_args leaves it here): NaN and
  // Inf propagate into the mean and the norms, so all norms finite proves the bank finite;
  // otherwise (a bad value, or finite values whose centred difference overflows) the rows
  // are inspected.
  float* bn = S.bn.data_ptr<float>();
  const float* mu = mean;
  std::vector<double> local_max(std::max(1, at::get_num_threads()), 0.0);
  std::atomic<bool> all_finite{true};
  at::parallel_for(0, m, 256, [&](int64_t a, int64_t e) {
    double mx = 0.0;
    bool finite = true;
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
      finite = finite && std::isfinite(s);
    }
    double& slot = local_max[at::get_thread_num() % local_max.size()];
    slot = std::max(slot, mx);
    if (!finite) all_finite.store(false, std::memory_order_relaxed);
  });
  for (double v : local_max) S.bmax2 = std::max(S.bmax2, v);
  if (!all_finite.load()) check_finite_rows(bank, "bank");
  return S;
}

// What knn_bank returns, and knn_prepared takes back: the BankSide and the pre-pass's
// Basis of one bank, as tensors.
//   (mean [D] float32, norms [M] float32, scalars [5] float64 = (max ||fl(b - mu)||^2,
//    basis ok (1 or 0), captured share, 1 + delta, max ||pb||), U [D, r] float32,
//    pb [M, r] float32, pbn [M] float32); U, pb and pbn are empty when the basis is not ok.
constexpr int64_t kPrepared = 6;

std::vector<at::Tensor> knn_bank_cpu(const at::Tensor& bank_in) {
  check_knn_bank_args(bank_in);
  TORCH_CHECK_VALUE(bank_in.device().is_cpu(), "bank should be a CPU tensor, got ",
                    bank_in.device());
  at::NoGradGuard no_grad;
  const at::Tensor bank = bank_in.contiguous();
  const int64_t m = bank.size(0), d = bank.size(1);
  BankSide S = bank_side(bank);
  // The basis whatever its captured share: knn_prepared applies the rule per call, as knn.
  knn_project::Basis B = knn_project::make_basis(bank.data_ptr<float>(),
                                                 S.mean.data_ptr<float>(), m, d, 0.0);
  const auto f32 = bank.options();
  at::Tensor scalars = at::empty({5}, f32.dtype(at::kDouble));
  double* sc = scalars.data_ptr<double>();
  sc[0] = S.bmax2;
  sc[1] = B.ok ? 1.0 : 0.0;
  sc[2] = B.captured;
  sc[3] = B.one_delta;
  sc[4] = B.pbmax;
  if (!B.ok) {
    B.U = at::empty({0, 0}, f32);
    B.pb = at::empty({0, 0}, f32);
    B.pbn = at::empty({0}, f32);
  }
  return {S.mean, S.bn, scalars, B.U, B.pb, B.pbn};
}

// The prepared operands back from tensors, checked against the bank's shape (they cannot
// be checked against its values: the caller keeps them with the bank they were made from).
void unpack_prepared(at::TensorList prepared, int64_t m, int64_t d, BankSide& S,
                     knn_project::Basis& B) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(prepared.size()) == kPrepared,
                    "prepared should be knn_bank's ", kPrepared, " tensors, got ",
                    prepared.size());
  const auto is = [](const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape) {
    return t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == shape &&
           t.is_contiguous();
  };
  TORCH_CHECK_VALUE(is(prepared[0], at::kFloat, {d}) && is(prepared[1], at::kFloat, {m}) &&
                        is(prepared[2], at::kDouble, {5}),
                    "prepared does not belong to a bank of shape [", m, ", ", d,
                    "]: make it with knn_bank(bank) for this bank");
  S.mean = prepared[0];
  S.bn = prepared[1];
  const double* sc = prepared[2].data_ptr<double>();
  S.bmax2 = sc[0];
  B.ok = sc[1] == 1.0;
  B.captured = sc[2];
  B.one_delta = sc[3];
  B.pbmax = sc[4];
  if (B.ok) {
    const int64_t r = prepared[3].dim() == 2 ? prepared[3].size(1) : -1;
    TORCH_CHECK_VALUE(r > 0 && is(prepared[3], at::kFloat, {d, r}) &&
                          is(prepared[4], at::kFloat, {m, r}) &&
                          is(prepared[5], at::kFloat, {m}),
                      "prepared does not belong to a bank of shape [", m, ", ", d,
                      "]: make it with knn_bank(bank) for this bank");
    B.U = prepared[3];
    B.pb = prepared[4];
    B.pbn = prepared[5];
  }
}

// knn with statistics: (distances [Q, k], indices [Q, k], stats [6] int64 = rows,
// rows of the second pass, rows of the last-resort exact scan, candidates refined (all
// passes), rows sent through the projected pre-pass (0 when it is off), rows it
// certified; the others went through the first pass).
//   project: when the projected pre-pass runs; project_bound_scale: multiplies its lower
//   bound (1 in use; see knn_project.h).
//   prepared: the bank's side and basis (knn_bank), or null: computed here. Both give the
//   same answer and statistics (the same values, the same rule).
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_cpu_impl(
    const at::Tensor& query_in, const at::Tensor& bank_in, int64_t k,
    knn_project::Mode project, double project_bound_scale,
    const at::TensorList* prepared = nullptr) {
  check_knn_args(query_in, bank_in, k);
  TORCH_CHECK_VALUE(query_in.device().is_cpu(), "query should be a CPU tensor, got ",
                    query_in.device());
  at::NoGradGuard no_grad;  // the GEMMs below write into buffers (out= ops)
  const at::Tensor query = query_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const int64_t nq = query.size(0), m = bank.size(0), d = bank.size(1);
  BankSide S;
  knn_project::Basis B;
  if (prepared != nullptr) unpack_prepared(*prepared, m, d, S, B);
  at::Tensor out_d = at::empty({nq, k}, query.options());
  at::Tensor out_i = at::empty({nq, k}, query.options().dtype(at::kLong));
  at::Tensor stats = at::zeros({6}, query.options().dtype(at::kLong));
  if (nq == 0) {
    // No pass over the bank below to fold its check into (a prepared bank was checked
    // by knn_bank's pass).
    if (prepared == nullptr) check_finite_lowmem(bank, "bank");
    return {out_d, out_i, stats};
  }
  if (prepared == nullptr) S = bank_side(bank);
  std::atomic<int64_t> second_pass{0}, exact_scans{0}, refined{0};
  Problem P{query.data_ptr<float>(),
            bank.data_ptr<float>(),
            S.mean.data_ptr<float>(),
            S.bn.data_ptr<float>(),
            m,
            d,
            k,
            std::sqrt(S.bmax2),
            ExpansionBound(d, knn_detail::matmul_input_roundoff(/*cuda=*/false)),
            out_d.data_ptr<float>(),
            out_i.data_ptr<int64_t>(),
            &second_pass,
            &exact_scans,
            &refined};

  // Projected pre-pass (knn_project.h) when the mode and its rule take it: the rows it
  // certifies are done; the others go through the passes below, unchanged.
  knn_project::Result pre = knn_project::prepass(
      P.query, P.bank, P.mean, nq, m, d, k, P.bmax, project, project_bound_scale, P.out_d,
      P.out_i, prepared != nullptr ? &B : nullptr);
  refined += pre.refined;
  std::vector<int64_t>& all = pre.rest;
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
  s[4] = pre.rows;
  s[5] = pre.certified;
  return {out_d, out_i, stats};
}

// The knn_stats op (schema in csrc/ops.cpp); gemm is the CUDA kernel's variant.
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_stats_cpu(
    const at::Tensor& query, const at::Tensor& bank, int64_t k, c10::string_view gemm,
    c10::string_view project, double project_bound_scale) {
  check_knn_variant(gemm, project, project_bound_scale);
  return knn_cpu_impl(query, bank, k, knn_project::parse_mode(project), project_bound_scale);
}

// The knn_prepared op: knn_stats on the CPU with the bank's operands from knn_bank.
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_prepared_cpu(
    const at::Tensor& query, const at::Tensor& bank, int64_t k, at::TensorList prepared,
    c10::string_view project) {
  check_knn_variant("auto", project, 1.0);
  return knn_cpu_impl(query, bank, k, knn_project::parse_mode(project), 1.0, &prepared);
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& query, const at::Tensor& bank,
                                           int64_t k) {
  auto r = knn_cpu_impl(query, bank, k, knn_project::Mode::kAuto, 1.0);
  return {std::get<0>(r), std::get<1>(r)};
}

}  // namespace
}  // namespace patchcore_fast

TORCH_LIBRARY_IMPL(patchcore_fast, CPU, m) {
  m.impl("knn", &patchcore_fast::knn_cpu);
  m.impl("knn_stats", &patchcore_fast::knn_stats_cpu);
  m.impl("knn_bank", &patchcore_fast::knn_bank_cpu);
  m.impl("knn_prepared", &patchcore_fast::knn_prepared_cpu);
}
