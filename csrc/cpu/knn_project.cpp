// The projected lower-bound pre-pass of the CPU k-NN kernel (knn_project.h): on low-rank
// data (real patch features) it finds each query's k nearest bank rows with a GEMM on
// r = 32 projected coordinates instead of D = 1,024, and proves the answer exact.
//
// The bound. Let U be a D x r matrix, mu the bank's mean, x = q - mu, y = b - mu. For any
// U with sigma_max(U) <= 1 + delta,
//     ||q - b|| = ||x - y|| >= ||U^T (x - y)|| / (1 + delta),
// and the right side costs r coordinates. With U an (almost) orthonormal basis of the
// centred bank's leading principal axes it is also tight: on CNN patch features a few
// dozen axes hold nearly all the variance, and per query only a few bank rows have a
// projected distance below the true nearest distance.
//
// r = 32 and c = k + 48 candidates were chosen by measurement: bench/RESULTS.md, "Choice
// of r and c" under "Projected lower-bound pre-pass" (more axes certify more rows but the
// GEMM grows; fewer candidates leave more rows to the exact passes).
//
// The pre-pass, per query row (threads own chunks of query rows, as in knn.cpp):
//   1. pq = fl(U^T fl(q - mu)), projected bank pb = fl(U^T fl(b - mu)) (one GEMM each);
//   2. v(b) = fl(||pb||^2 - 2 pq.pb) for every bank row (a [rows, r] x [r, tile] GEMM per
//      tile, then a fused selection) keeping the c rows with the smallest v (ties by
//      index), and T with v(b) >= T for every row not kept;
//   3. the kept rows in increasing v are refined with sqdist (direct differences of the
//      rows as given: the same float32 values the exact path returns), keeping the k best
//      by (distance, index); it stops once the current k-th distance is strictly below the
//      lower bound L(v) of the next candidate (L grows with v, so it holds for every later
//      candidate and, since T >= v, for every row not kept). Without such a stop, the
//      certificate for the rows not kept is  kth < L(T).
//   4. a row whose certificate fails (L(T) too low: more near-ties than c, duplicated bank
//      rows, a direction the subspace misses) goes to the existing exact path unchanged.
//
// The rigorous lower bound L(v) (u = 2^-24, gamma_n = n u / (1 - n u)):
//   * v + ||pq||^2 differs from ||pq - pb||^2 by at most E_r = ExpansionBound(r, 0) with
//     norms ||pq|| and max ||pb|| (knn_bound.h's argument in r dimensions: the GEMM's
//     dot-product error, the norms rounded once, the fma rounded once);
//   * the computed projection p(x) of a row differs from U^T x by at most
//     eps(x) = (1 + delta) ||xc|| (sqrt(r) gamma_{D+2} + 2u), xc = fl(x) the centred row:
//     centring rounds each coordinate by u |x_i| (||fl(x) - x|| <= u ||x||, moved by U^T
//     at most (1 + delta) times), and each of the r GEMM outputs is off by at most
//     gamma_D ||u_j|| ||xc|| <= gamma_D (1 + delta) ||xc||, whatever the summation order;
//   * so by the triangle inequality, with eps_b taken at max_b ||b - mu||,
//       ||U^T (x - y)|| >= sqrt(max(0, v + ||pq||^2 - E_r)) - eps_q - eps_b,
//       ||q - b||       >= that / (1 + delta) =: L(v);
//   * the returned distance of a row b is fl(sqrt(sqdist(q, b))) >= ||q - b|| (1 - u)
//     sqrt(1 - gamma_{D+2}) (sqdist sums non-negative terms: relative error <= gamma_D).
//     The kernel compares the current k-th returned distance with
//     L(v) (1 - u) sqrt(1 - gamma_{D+2}) (1 - 2^-20) (the last factor covers the double
//     arithmetic of the bound itself): strictly below it, every row behind the bound has a
//     strictly larger returned distance, so it cannot enter the k best, ties included: the
//     answer is the exact path's, bit for bit.
//   * delta is measured, not assumed: with G = U^T U computed in double from the float32
//     U, sigma_max(U)^2 = ||G||_2 <= 1 + ||G - I||_F, plus 1e-10 for the double sums.
// Only the speed depends on U: any U gives a valid bound, so U comes from a cheap
// randomized range finder on a sample of bank rows (seeded Gaussian G [D, r],
// Y = S G, one power step Z = S^T Y, QR in double, cast to float32), S the centred sample.
//
// When the pre-pass is taken (make_projection, then the pilot in prepass), Mode::kAuto:
//   * D >= 256: below it the projected GEMM saves too little, since the selection pass
//     over every (query, bank row) pair costs as much as in the D-dim path;
//   * Q M D >= 2^28 and M >= 8 c: too little work, or too few rows to skip;
//   * the GEMM runs in true fp32 (matmul_input_roundoff() == 0; TF32 / bf16 would need
//     another bound);
//   * the r axes hold >= 90 % of the centred sample's squared norm (kMinCaptured). On
//     isotropic data they hold r / D, the projected distances then say little about the
//     true ones, the certificate would fail for nearly every row and the pre-pass would
//     only add its cost; the estimate costs two GEMMs on a sample of at most 4,096 rows,
//     while real features hold 99 % or more;
//   * a pilot: the first 256 query rows run the pre-pass first; unless it certifies 30 %
//     of them (kMinPilot), the other rows skip it. The captured share alone does not say
//     whether the residual variance is small against the nearest-neighbour distances; the
//     pilot measures exactly that, for at most 256 rows' pre-pass. The 30 % and the
//     width limit are measured: bench/RESULTS.md, "Pilot threshold and width limit" under
//     "Projected lower-bound pre-pass".
// Mode::kForce takes it whenever it is valid (D >= 32, M > c, fp32 GEMM, LAPACK), with no
// width, work, variance or pilot rule; Mode::kOff never.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "knn_project.h"

#include "../knn_bound.h"
#include "candidate_pool.h"
#include "parallel.h"
#include "sqdist.h"

namespace patchcore_fast {
namespace knn_project {

namespace {

constexpr int64_t kMinDim = 256;
constexpr int64_t kRank = 32;
constexpr int64_t kSampleRows = 4096;
constexpr double kMinCaptured = 0.9;
constexpr double kMinWork = 268435456.0;  // 2^28 multiply-adds: Q M D
constexpr int64_t kExtra = 48;            // candidates kept beyond k
constexpr int64_t kRows = 256;            // query rows per chunk (and of the pilot)
constexpr double kMinPilot = 0.3;         // share of the pilot's rows to certify
constexpr int64_t kTile = 1024;           // projected bank rows per GEMM tile

// Candidates kept per query row.
inline int64_t candidates(int64_t k) { return k + kExtra; }

// The bank's basis (U, the projected bank and its norms, max ||pb||, 1 + delta) and the
// per-call constants of the bound.
struct Projection {
  bool on = false;
  int64_t r = 0;
  Basis basis;
  double eps_rel = 0.0;     // eps(x) = eps_rel ||fl(x - mu)||
  double eps_b = 0.0;       // eps at max ||fl(b - mu)||
  double out_factor = 1.0;  // (1 - u) sqrt(1 - gamma_{D+2}) (1 - 2^-20)
  double scale = 1.0;       // bound_scale of prepass (1 in use)
  knn_detail::ExpansionBound er{1, 0.0};
  bool forced = false;      // Mode::kForce: no pilot

  // L(v) (1 - u) sqrt(1 - gamma): a lower bound of the returned distance of every bank row
  // with projected value >= v, for a query with ||pq||^2 = pqn and eps_q.
  double bound(double v, double pqn, double eps_q, double e_r) const {
    const double s = std::sqrt(std::max(0.0, v + pqn - e_r)) - eps_q - eps_b;
    return s <= 0.0 ? 0.0 : scale * s / basis.one_delta * out_factor;
  }
};

}  // namespace

Basis make_basis(const float* bank, const float* mean, int64_t m, int64_t d,
                 double min_captured) {
  Basis B;
  if (d < 32 || m < 1) return B;
  // The bound assumes true fp32 GEMMs, here (the projected bank) and per call (the
  // queries' projections: prepass checks again).
  if (knn_detail::matmul_input_roundoff(/*cuda=*/false) != 0.0) return B;
  const int64_t r = kRank;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor all = at::from_blob(const_cast<float*>(bank), {m, d}, opts);
  const at::Tensor mu = at::from_blob(const_cast<float*>(mean), {d}, opts);

  // Randomized range finder on a strided sample of centred rows.
  const int64_t stride = std::max<int64_t>(1, m / kSampleRows);
  const at::Tensor s = all.slice(0, 0, m, stride) - mu;
  auto gen = at::detail::createCPUGenerator(/*seed_val=*/20261127);
  const at::Tensor g = at::randn({d, r}, gen, opts);
  at::Tensor u;
  try {
    const at::Tensor z = at::mm(s.t(), at::mm(s, g));
    u = std::get<0>(at::linalg_qr(z.to(at::kDouble))).to(at::kFloat).contiguous();
  } catch (const c10::Error&) {
    return B;  // no LAPACK in this build: the existing path
  }
  const double total = s.square().sum().item<double>();
  B.captured = total > 0.0 ? at::mm(s, u).square().sum().item<double>() / total : 0.0;
  if (!(B.captured >= min_captured)) return B;

  // 1 + delta >= sigma_max(U), measured on the float32 U (see the header).
  const at::Tensor ud = u.to(at::kDouble);
  const double f = (at::mm(ud.t(), ud) - at::eye(r, ud.options())).norm().item<double>();
  if (!(f < 1e-3)) return B;  // not near orthonormal (cannot happen with QR): stay off
  B.one_delta = std::sqrt(1.0 + f + 1e-10);

  // Projected bank, tile by tile: fl(b - mu) into a scratch tile (the rounding the bound
  // assumes), then one GEMM into pb's rows.
  B.pb = at::empty({m, r}, opts);
  B.pbn = at::empty({m}, opts);
  float* pbn = B.pbn.data_ptr<float>();
  parallel_for_tls(0, (m + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor tile = at::empty({kTile, d}, opts);
    float* tc = tile.data_ptr<float>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kTile, nb = std::min(kTile, m - j0);
      for (int64_t j = 0; j < nb; ++j) centre_row(bank + (j0 + j) * d, mean, d, tc + j * d);
      at::Tensor out = B.pb.narrow(0, j0, nb);
      at::mm_out(out, tile.narrow(0, 0, nb), u);
      const float* pp = out.data_ptr<float>();
      for (int64_t j = 0; j < nb; ++j) {
        pbn[j0 + j] = static_cast<float>(sqnorm_double(pp + j * r, r));
      }
    }
  });
  double mx = 0.0;
  for (int64_t j = 0; j < m; ++j) mx = std::max(mx, static_cast<double>(pbn[j]));
  // pbn is rounded to float: max ||pb|| from it, nudged up by a relative 1e-6.
  B.pbmax = std::sqrt(mx) * (1.0 + 1e-6);
  B.U = u;
  B.ok = true;
  return B;
}

namespace {

// Decides whether to take the pre-pass and, if so, sets up the bound from the bank's basis
// (`given`, built beforehand on this bank; null: built here, after the rules that do not
// need it, and only when the captured share passes for kAuto).
// Args:
//   bank: [m, d] row-major float32 as given; mean: [d] the centre; bmax: max ||fl(b - mu)||.
//   nq, k: queries and neighbours per query; mode, scale: prepass's.
// Returns: the projection (on == false: use the existing path).
Projection make_projection(const float* bank, const float* mean, int64_t m, int64_t d,
                           double bmax, int64_t nq, int64_t k, Mode mode, double scale,
                           const Basis* given) {
  Projection P;
  if (mode == Mode::kOff || d < 32 || m <= candidates(k)) return P;
  const bool forced = mode == Mode::kForce;
  if (!forced && (d < kMinDim || m < 8 * candidates(k) ||
                  static_cast<double>(nq) * m * d < kMinWork)) {
    return P;
  }
  if (knn_detail::matmul_input_roundoff(/*cuda=*/false) != 0.0) return P;
  Basis local;
  if (given == nullptr) local = make_basis(bank, mean, m, d, forced ? 0.0 : kMinCaptured);
  const Basis& B = given != nullptr ? *given : local;
  if (!B.ok || (!forced && !(B.captured >= kMinCaptured))) return P;
  P.forced = forced;
  const int64_t r = B.U.size(1);
  P.basis = B;

  const double uu = std::ldexp(1.0, -24);
  const double nd = static_cast<double>(d + 2);
  const double gamma_d = nd * uu / (1.0 - nd * uu);
  P.eps_rel = 1.01 * B.one_delta * (std::sqrt(static_cast<double>(r)) * gamma_d + 2.0 * uu);
  P.eps_b = P.eps_rel * bmax * (1.0 + 1e-6);
  P.out_factor = (1.0 - uu) * std::sqrt(1.0 - gamma_d) * (1.0 - std::ldexp(1.0, -20));
  P.er = knn_detail::ExpansionBound(r, 0.0);
  P.scale = scale;
  P.r = r;
  P.on = true;
  return P;
}

// Refinement and certificate of one query row (steps 3-4 of the header).
//   top: its candidates; lb(v): the lower bound of the returned distance of every row with
//   projected value >= v; q: the query row as given; best: scratch of k entries.
// Returns: whether the row is certified (then best[0, k) holds the answer, ascending by
//   (distance, index)); adds the candidates refined to *refined.
template <class Bound>
bool refine_row(CandidatePool& top, const Bound& lb, const float* q, const float* bank, int64_t m,
                int64_t d, int64_t k, std::vector<Entry>& best, int64_t* refined) {
  top.trim();  // the c best (band 0)
  const float T = top.thr;  // every row not kept has v >= T (+inf: none was rejected)
  std::sort(top.e, top.e + top.n);
  // best is a max-heap by (distance, index): best[0] is the current k-th.
  int64_t nbest = 0, x = 0;
  bool ok = false;
  for (; x < top.n; ++x) {
    if (nbest == k && static_cast<double>(best[0].v) < lb(top.e[x].v)) {
      ok = true;  // every later candidate, and every row not kept (v >= T >= this v)
      break;
    }
    const int32_t j = top.e[x].i;
    const float sq = sqdist(q, bank + static_cast<int64_t>(j) * d, d);
    const Entry cand{std::sqrt(std::max(sq, 0.f)), j};  // as the existing path returns it
    if (nbest < k) {
      best[nbest++] = cand;
      std::push_heap(best.begin(), best.begin() + nbest);
    } else if (cand < best[0]) {
      std::pop_heap(best.begin(), best.begin() + k);
      best[k - 1] = cand;
      std::push_heap(best.begin(), best.begin() + k);
    }
  }
  *refined += x;
  if (nbest < k) return false;
  std::sort_heap(best.begin(), best.begin() + k);  // ascending
  if (ok) return true;
  if (T == std::numeric_limits<float>::infinity()) return top.n == m;  // all rows refined
  return static_cast<double>(best[k - 1].v) < lb(T);
}

// One chunk of query rows rows[0, tq) through the pre-pass: writes the certified rows'
// answers and appends the others to failed. Single-threaded GEMMs inside a parallel
// region (threads own chunks), threaded ones outside (the pilot).
// Args:
//   query [Q, d], bank [m, d] as given; mean [d]; out_d, out_i [Q, k].
// Returns: (rows certified, candidates refined).
std::pair<int64_t, int64_t> prepass_chunk(
    const Projection& P, const float* query, const float* bank, const float* mean, int64_t m,
    int64_t d, int64_t k, const int64_t* rows, int64_t tq, float* out_d, int64_t* out_i,
    std::vector<int64_t>& failed) {
  const int64_t r = P.r, c = candidates(k);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  // Centred rows fl(q - mu) (the rounding eps_q covers) and their projections.
  at::Tensor qblock = at::empty({tq, d}, opts);
  float* qc = qblock.data_ptr<float>();
  std::vector<double> eps_q(tq), pqn(tq), e_r(tq);
  for (int64_t t = 0; t < tq; ++t) {
    float* dst = qc + t * d;
    centre_row(query + rows[t] * d, mean, d, dst);
    eps_q[t] = P.eps_rel * std::sqrt(sqnorm_double(dst, d)) * (1.0 + 1e-6);
  }
  const at::Tensor pq = at::mm(qblock, P.basis.U);  // [tq, r]
  const float* pqp = pq.data_ptr<float>();
  for (int64_t t = 0; t < tq; ++t) {
    pqn[t] = sqnorm_double(pqp + t * r, r);
    e_r[t] = P.er(std::sqrt(pqn[t]) * (1.0 + 1e-6), P.basis.pbmax);
  }

  // Candidates: the c smallest projected values per row, tile by tile of the bank.
  std::vector<Entry> store(static_cast<size_t>(tq * 2 * c));
  std::vector<CandidatePool> top(tq);
  for (int64_t t = 0; t < tq; ++t) {
    top[t] = CandidatePool::make(store.data() + t * 2 * c, 2 * c, c, /*band=*/0.f);
  }
  at::Tensor buf = at::empty({tq * kTile}, opts);
  const float* pbn = P.basis.pbn.data_ptr<float>();
  for (int64_t j0 = 0; j0 < m; j0 += kTile) {
    const int64_t nb = std::min(kTile, m - j0);
    at::Tensor ip = buf.narrow(0, 0, tq * nb).view({tq, nb});
    at::mm_out(ip, pq, P.basis.pb.narrow(0, j0, nb).t());  // ip[t, j] = pq_t . pb_j
    const float* ipp = ip.data_ptr<float>();
    for (int64_t t = 0; t < tq; ++t) {
      select_tile_row(ipp + t * nb, pbn + j0, j0, nb, top[t]);
    }
  }

  int64_t certified = 0, refined = 0;
  std::vector<Entry> best(static_cast<size_t>(k));
  for (int64_t t = 0; t < tq; ++t) {
    const auto lb = [&](float v) { return P.bound(v, pqn[t], eps_q[t], e_r[t]); };
    const int64_t row = rows[t];
    if (refine_row(top[t], lb, query + row * d, bank, m, d, k, best, &refined)) {
      for (int64_t y = 0; y < k; ++y) {
        out_d[row * k + y] = best[y].v;
        out_i[row * k + y] = best[y].i;
      }
      ++certified;
    } else {
      failed.push_back(row);
    }
  }
  return {certified, refined};
}

}  // namespace

Result prepass(const float* query, const float* bank, const float* mean, int64_t nq,
               int64_t m, int64_t d, int64_t k, double bmax, Mode mode, double bound_scale,
               float* out_d, int64_t* out_i, const Basis* basis) {
  Result res;
  res.rest.resize(static_cast<size_t>(nq));
  for (int64_t r = 0; r < nq; ++r) res.rest[r] = r;
  const Projection proj = make_projection(bank, mean, m, d, bmax, nq, k, mode, bound_scale,
                                          basis);
  if (!proj.on) return res;
  std::vector<int64_t> all;
  all.swap(res.rest);
  const int64_t nthreads = std::max(1, at::get_num_threads());
  const int64_t tq = std::max<int64_t>(1, std::min<int64_t>(kRows, (nq + nthreads - 1) / nthreads));
  // The pilot: the first rows alone (threaded GEMMs), and the others only if it certified
  // enough of them.
  const int64_t pilot = std::min(nq, kRows);
  const auto first = prepass_chunk(proj, query, bank, mean, m, d, k, all.data(), pilot, out_d,
                                   out_i, res.rest);
  res.refined = first.second;
  res.rows = pilot;
  res.certified = first.first;
  const bool go_on = proj.forced || static_cast<double>(first.first) >= kMinPilot * pilot;
  const int64_t n2 = go_on ? nq - pilot : 0;
  const int64_t nchunks = (n2 + tq - 1) / tq;
  std::vector<std::vector<int64_t>> local(nchunks);
  std::atomic<int64_t> ok_rows{0}, refined{0};
  parallel_for_tls(0, nchunks, 1, [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; ++c) {
      const int64_t r0 = pilot + c * tq;
      const auto chunk = prepass_chunk(proj, query, bank, mean, m, d, k, all.data() + r0,
                                       std::min(tq, nq - r0), out_d, out_i, local[c]);
      ok_rows.fetch_add(chunk.first, std::memory_order_relaxed);
      refined.fetch_add(chunk.second, std::memory_order_relaxed);
    }
  });
  for (auto& v : local) res.rest.insert(res.rest.end(), v.begin(), v.end());
  if (!go_on) res.rest.insert(res.rest.end(), all.begin() + pilot, all.end());
  res.rows += n2;
  res.certified += ok_rows.load();
  res.refined += refined.load();
  return res;
}

}  // namespace knn_project
}  // namespace patchcore_fast
