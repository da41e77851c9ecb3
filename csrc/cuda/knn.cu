// Exact brute-force k nearest neighbours on the GPU, faiss-style, with no slow path.
//
// Squared L2 = ||q||^2 + ||b||^2 - 2 q.b on query and bank centred on the bank's mean
// (csrc/knn_bound.h, step 0). Queries and bank are cut into tiles sized to a memory
// budget; per (query tile, bank tile): one cuBLAS GEMM (at::mm_out on the current stream)
// gives q.b, then a fused select kernel adds ||b||^2 and merges each query row's running
// best candidates, kept sorted in a global [Q, kc] buffer across bank tiles, with the
// tile's values:
//   - kc <= 2 (banks of 1 or 2 rows): one warp per row; each lane keeps its best two,
//     then a warp-shuffle merge (index tie-break).
//   - kc <= 64: one block per row; each thread keeps a sorted list in registers, then kc
//     rounds of a block-wide arg-min pop the winners in order.
//   - larger kc: at::topk over the tile's values concatenated with the running buffer.
// ||q||^2 is added only to the survivors, in the exact refinement and certificate that
// follow (csrc/cuda/knn_refine.h): the candidates are recomputed with direct differences
// of the rows as given. The first pass keeps k + max(k, 15) candidates; rows whose
// certificate fails are rescored by the same tiled machinery with 8x the candidates, until
// certified (at kc == M the whole bank is refined, which certifies by definition): never a
// per-row full-bank cdist plus sort. Host synchronisations: max ||b - mu|| (the bound's
// scalar) and, per round, the number of rows left.
//
// What has run: this file compiles (CUDA 13, sm_90) in this revision; the centring and
// the widening rounds have NOT yet run on a GPU (the session that wrote them had none).
// The CPU kernel (csrc/cpu/knn.cpp) implements the same promise and is tested on real
// features. No reduced-precision (bf16 / TF32) candidate selection is written here yet:
// with TF32 enabled by the user (torch.backends.cuda.matmul.allow_tf32) the bound
// already widens through matmul_input_roundoff, so the answer stays exact.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "knn_refine.h"
#include "knn_select.cuh"

namespace patchcore_fast {
namespace {

using knn_select::cand_less;
using knn_select::TopList;

// Scratch budget of one step (GEMM tile, refinement chunk, exact-scan chunk).
constexpr int64_t kBudgetBytes = int64_t{256} << 20;
// Largest candidate count handled by the register-list kernel.
constexpr int64_t kMaxFastCandidates = 64;
constexpr int kSelectThreads = 128;  // block per row
constexpr int kTop2Threads = 256;    // 8 rows (warps) per block

// k == 1 selection: one warp per query row, each lane keeps its best two candidates.
//   ip: [rows, nb] inner products q.b; bn: [nb] ||b||^2 of the tile; j0: first bank row;
//   best_v / best_i: [rows, kc] running sorted candidates (kc = 1 or 2); has_old: the
//   buffer already holds candidates from earlier tiles.
__global__ void __launch_bounds__(kTop2Threads)
    select_top2_kernel(const float* __restrict__ ip, int nb, const float* __restrict__ bn,
                       int j0, int rows, float* __restrict__ best_v,
                       int64_t* __restrict__ best_i, int kc, bool has_old) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (kTop2Threads / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;  // warp-uniform
  const float* r = ip + static_cast<int64_t>(row) * nb;
  float* bv = best_v + static_cast<int64_t>(row) * kc;
  int64_t* bi = best_i + static_cast<int64_t>(row) * kc;

  float v0 = INFINITY, v1 = INFINITY;
  int i0 = knn_select::kNoIndex, i1 = knn_select::kNoIndex;
  auto push = [&](float v, int i) {
    if (!cand_less(v, i, v1, i1)) return;
    if (cand_less(v, i, v0, i0)) {
      v1 = v0;
      i1 = i0;
      v0 = v;
      i0 = i;
    } else {
      v1 = v;
      i1 = i;
    }
  };
  if (has_old && lane < kc) push(bv[lane], static_cast<int>(bi[lane]));
  for (int j = lane; j < nb; j += 32) push(fmaf(-2.f, r[j], bn[j]), j0 + j);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float w0 = __shfl_xor_sync(knn_select::kFullMask, v0, off);
    const float w1 = __shfl_xor_sync(knn_select::kFullMask, v1, off);
    const int x0 = __shfl_xor_sync(knn_select::kFullMask, i0, off);
    const int x1 = __shfl_xor_sync(knn_select::kFullMask, i1, off);
    knn_select::merge_top2(v0, i0, v1, i1, w0, x0, w1, x1);
  }
  if (lane == 0) {
    bv[0] = v0;
    bi[0] = i0;
    if (kc > 1) {
      bv[1] = v1;
      bi[1] = i1;
    }
  }
}

// kc <= KC <= 64 selection: one block per query row. Each thread scans a strided part of
// the row into its register list (plus one old candidate for threads < kc); then kc
// rounds of a block-wide arg-min over the list heads write the row's new sorted best.
// The union of the per-thread top-KC lists contains the row's top kc, so this is exact.
template <int KC>
__global__ void __launch_bounds__(kSelectThreads)
    select_topk_kernel(const float* __restrict__ ip, int nb, const float* __restrict__ bn,
                       int j0, float* __restrict__ best_v, int64_t* __restrict__ best_i,
                       int kc, bool has_old) {
  constexpr int kWarps = kSelectThreads / 32;
  __shared__ float s_v[kWarps];
  __shared__ int s_i[kWarps];
  __shared__ int s_o[kWarps];
  const int row = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* r = ip + static_cast<int64_t>(row) * nb;
  float* bv = best_v + static_cast<int64_t>(row) * kc;
  int64_t* bi = best_i + static_cast<int64_t>(row) * kc;

  TopList<KC> list;
  list.init();
  if (has_old && tid < kc) list.push(bv[tid], static_cast<int>(bi[tid]));
  for (int j = tid; j < nb; j += kSelectThreads) list.push(fmaf(-2.f, r[j], bn[j]), j0 + j);

  for (int round = 0; round < kc; ++round) {
    float v = list.v[0];
    int i = list.i[0];
    int owner = tid;
    knn_select::warp_argmin(v, i, owner);
    if (lane == 0) {
      s_v[warp] = v;
      s_i[warp] = i;
      s_o[warp] = owner;
    }
    __syncthreads();  // also orders every thread's read of the old row before the writes
    v = s_v[0];
    i = s_i[0];
    owner = s_o[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      if (cand_less(s_v[w], s_i[w], v, i) || (s_v[w] == v && s_i[w] == i && s_o[w] < owner)) {
        v = s_v[w];
        i = s_i[w];
        owner = s_o[w];
      }
    }
    __syncthreads();  // s_* are rewritten next round
    if (tid == owner) list.pop_front();
    if (tid == 0) {
      bv[round] = v;
      bi[round] = i;
    }
  }
}

// Launches the selection of one (query tile, bank tile).
//   ip: [rows, nb] q.b; bn: [nb]; best_v / best_i: [rows, kc] views of the running buffer.
void select_tile(const at::Tensor& ip, const at::Tensor& bn, int64_t j0, at::Tensor& best_v,
                 at::Tensor& best_i, int64_t kc, bool has_old) {
  const int64_t rows = ip.size(0), nb = ip.size(1);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float* ipp = ip.data_ptr<float>();
  const float* bnp = bn.data_ptr<float>();
  float* bvp = best_v.data_ptr<float>();
  int64_t* bip = best_i.data_ptr<int64_t>();
  if (kc <= 2) {
    const int per_block = kTop2Threads / 32;
    const dim3 grid(static_cast<unsigned>((rows + per_block - 1) / per_block));
    select_top2_kernel<<<grid, kTop2Threads, 0, stream>>>(
        ipp, static_cast<int>(nb), bnp, static_cast<int>(j0), static_cast<int>(rows), bvp, bip,
        static_cast<int>(kc), has_old);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const dim3 grid(static_cast<unsigned>(rows));
  const int n = static_cast<int>(nb), j = static_cast<int>(j0), c = static_cast<int>(kc);
  if (kc <= 8) {
    select_topk_kernel<8><<<grid, kSelectThreads, 0, stream>>>(ipp, n, bnp, j, bvp, bip, c,
                                                               has_old);
  } else if (kc <= 16) {
    select_topk_kernel<16><<<grid, kSelectThreads, 0, stream>>>(ipp, n, bnp, j, bvp, bip, c,
                                                                has_old);
  } else if (kc <= 32) {
    select_topk_kernel<32><<<grid, kSelectThreads, 0, stream>>>(ipp, n, bnp, j, bvp, bip, c,
                                                                has_old);
  } else {
    select_topk_kernel<64><<<grid, kSelectThreads, 0, stream>>>(ipp, n, bnp, j, bvp, bip, c,
                                                                has_old);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// kc > 64: merge the tile into the running buffer with at::topk (ties at the cut may go
// either way; the certificate only needs every dropped value to be >= the kept kc-th).
void select_tile_topk(const at::Tensor& ip, const at::Tensor& bn, int64_t j0,
                      at::Tensor& best_v, at::Tensor& best_i, int64_t kc, bool has_old) {
  const int64_t rows = ip.size(0), nb = ip.size(1);
  at::Tensor vals = at::sub(bn.unsqueeze(0), ip, /*alpha=*/2);  // ||b||^2 - 2 q.b
  at::Tensor idx = at::arange(j0, j0 + nb, best_i.options()).unsqueeze(0).expand({rows, nb});
  if (has_old) {
    vals = at::cat({best_v, vals}, 1);
    idx = at::cat({best_i, idx}, 1);
  }
  auto top = at::topk(vals, kc, /*dim=*/1, /*largest=*/false, /*sorted=*/true);
  best_v.copy_(std::get<0>(top));
  best_i.copy_(idx.gather(1, std::get<1>(top)));
}

// Candidate selection for query rows qrows (centred) over the centred bank, in tiles:
// returns (values [n, kc] sorted ascending, bank rows [n, kc]); column kc - 1 is the
// certificate's threshold T.
std::tuple<at::Tensor, at::Tensor> select_candidates(const at::Tensor& qrows,
                                                     const at::Tensor& bank_c,
                                                     const at::Tensor& bn, int64_t kc) {
  const int64_t nq = qrows.size(0), m = bank_c.size(0);
  const bool fast = kc <= kMaxFastCandidates;
  // Tiles: the [tq, tb] GEMM output (plus the topk path's temporaries) within the budget.
  const int64_t bytes_per_entry = fast ? 4 : 32;
  // A bank tile holds at least kc rows (the topk path needs them) and 128 when it can.
  const int64_t tb_min = std::max<int64_t>(std::min<int64_t>(m, 128), kc);
  const int64_t tq = std::max<int64_t>(
      1, std::min<int64_t>({nq, 16384, kBudgetBytes / (bytes_per_entry * tb_min)}));
  int64_t tb = kBudgetBytes / (bytes_per_entry * tq) / 128 * 128;
  tb = std::min(m, std::max(tb, tb_min));
  at::Tensor buf = at::empty({tq * tb}, qrows.options());
  at::Tensor best_v = at::empty({nq, kc}, qrows.options());
  at::Tensor best_i = at::empty({nq, kc}, qrows.options().dtype(at::kLong));
  for (int64_t q0 = 0; q0 < nq; q0 += tq) {
    const int64_t rows = std::min(tq, nq - q0);
    at::Tensor qtile = qrows.narrow(0, q0, rows);
    at::Tensor bv = best_v.narrow(0, q0, rows);
    at::Tensor bi = best_i.narrow(0, q0, rows);
    for (int64_t j0 = 0; j0 < m; j0 += tb) {
      const int64_t nb = std::min(tb, m - j0);
      at::Tensor ip = buf.narrow(0, 0, rows * nb).view({rows, nb});
      at::mm_out(ip, qtile, bank_c.narrow(0, j0, nb).t());  // cuBLAS, current stream
      at::Tensor bnt = bn.narrow(0, j0, nb);
      if (fast) {
        select_tile(ip, bnt, j0, bv, bi, kc, j0 > 0);
      } else {
        select_tile_topk(ip, bnt, j0, bv, bi, kc, j0 > 0);
      }
    }
  }
  return {best_v, best_i};
}

// First-pass candidate count: k + max(k, 15), from the error-band populations the CPU
// kernel measures on WideResNet-50 random-weight features after centring (rows within 2 E
// of the k-th value: p99 14 at k = 1, 27 at k = 9), so that the second pass is rare.
inline int64_t first_candidates(int64_t k, int64_t m) {
  return std::min<int64_t>(m, k + std::max<int64_t>(k, 15));
}

// knn with statistics (see the schema in csrc/ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_stats_cuda(const at::Tensor& query_in,
                                                              const at::Tensor& bank_in,
                                                              int64_t k) {
  check_knn_args(query_in, bank_in, k);
  TORCH_CHECK(query_in.is_cuda(), "query should be a CUDA tensor, got ", query_in.device());
  c10::cuda::CUDAGuard guard(query_in.device());
  at::NoGradGuard no_grad;
  const at::Tensor query = query_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const int64_t nq = query.size(0), m = bank.size(0), d = bank.size(1);
  at::Tensor out_d = at::empty({nq, k}, query.options());
  at::Tensor out_i = at::empty({nq, k}, query.options().dtype(at::kLong));
  // No last-resort exact scan here (stats[2] stays 0), no projected pre-pass (4, 5).
  int64_t stats[6] = {nq, 0, 0, 0, 0, 0};
  auto stats_tensor = [&] {
    return at::tensor(at::IntArrayRef(stats, 6), at::kLong).to(query.device());
  };
  if (nq == 0) return {out_d, out_i, stats_tensor()};

  // Centre on the bank's mean (knn_bound.h, step 0); the refinement uses the rows as given.
  const at::Tensor mean = bank.sum(0, /*keepdim=*/false, at::kDouble).div_(m).to(at::kFloat);
  const at::Tensor bank_c = bank - mean;
  at::Tensor bnorm = at::linalg_vector_norm(bank_c, 2, at::IntArrayRef{1}, false, std::nullopt);
  at::Tensor bn = bnorm.square();  // [M] ||b - mu||^2
  // max ||b - mu|| for the error bound, widened for its own fp32 rounding. Host sync 1 of
  // 2 + rounds: the bound is a host scalar.
  const double bmax = bnorm.max().item<double>() * (1.0 + 1e-5);
  const knn_detail::ExpansionBound bound(d, knn_detail::matmul_input_roundoff(/*cuda=*/true));

  // Rows still to settle: all, then those whose certificate failed, with 8x the candidates
  // each round; at kc == M the whole bank is refined, which certifies by definition.
  at::Tensor todo;  // undefined: every row
  int64_t kc = first_candidates(k, m);
  for (int round = 0;; ++round) {
    const int64_t n = todo.defined() ? todo.numel() : nq;
    stats[3] += n * kc;
    // Rows per chunk so that the [rows, kc] candidate lists stay within the budget.
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(n, kBudgetBytes / (kc * 16)));
    std::vector<at::Tensor> failed;
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t c = std::min(chunk, n - s);
      at::Tensor rows = todo.defined() ? todo.narrow(0, s, c) : at::Tensor();
      at::Tensor q = rows.defined() ? query.index_select(0, rows) : query.narrow(0, s, c);
      at::Tensor q_c = q - mean;
      at::Tensor qn = q_c.to(at::kDouble).square().sum(1);
      auto sel = select_candidates(q_c, bank_c, bn, kc);
      q_c = at::Tensor();
      at::Tensor thresh = std::get<0>(sel).select(1, kc - 1).contiguous();
      at::Tensor od = at::empty({c, k}, query.options());
      at::Tensor oi = at::empty({c, k}, out_i.options());
      at::Tensor bad = knn_detail::refine_candidates_aten(q, qn, bank, std::get<1>(sel), thresh,
                                                          k, bound, bmax, kBudgetBytes, od, oi);
      if (rows.defined()) {
        out_d.index_copy_(0, rows, od);
        out_i.index_copy_(0, rows, oi);
        failed.push_back(rows.masked_select(bad));
      } else {
        out_d.narrow(0, s, c).copy_(od);
        out_i.narrow(0, s, c).copy_(oi);
        failed.push_back(bad.nonzero().reshape({-1}) + s);
      }
    }
    if (kc == m) break;
    todo = at::cat(failed);  // host sync (each round): the number of rows left
    if (todo.numel() == 0) break;
    if (round == 0) stats[1] = todo.numel();
    kc = std::min<int64_t>(m, kc * 8);
  }
  return {out_d, out_i, stats_tensor()};
}

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& query, const at::Tensor& bank,
                                            int64_t k) {
  auto r = knn_stats_cuda(query, bank, k);
  return {std::get<0>(r), std::get<1>(r)};
}

}  // namespace
}  // namespace patchcore_fast

TORCH_LIBRARY_IMPL(patchcore_fast, CUDA, m) {
  m.impl("knn", &patchcore_fast::knn_cuda);
  m.impl("knn_stats", &patchcore_fast::knn_stats_cuda);
}
