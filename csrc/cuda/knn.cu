// Exact brute-force k nearest neighbours on the GPU, faiss-style, with no slow path, with
// the candidate selection on tensor cores.
//
// Squared L2 = ||q||^2 + ||b||^2 - 2 q.b on query and bank centred on the bank's mean
// (csrc/knn_bound.h, step 0). Queries and bank are cut into tiles sized to a memory
// budget; per (query tile, bank tile) the GEMM gives q.b, then a fused select kernel adds
// ||b||^2 and merges each query row's running best candidates, kept sorted in a global
// [Q, kc] buffer across bank tiles, with the tile's values:
//   - kc <= 2 (banks of 1 or 2 rows): one warp per row; each lane keeps its best two,
//     then a warp-shuffle merge (index tie-break).
//   - kc <= 64: one warp per row; each lane keeps a short sorted list in registers, then
//     kc rounds of a warp arg-min pop the winners in order (a lane's overflow only lowers
//     the row's certificate threshold, see select_warp_kernel).
//   - larger kc: at::topk over the tile's values concatenated with the running buffer.
//
// The GEMM (the whole cost at width 1,024) runs on tensor cores in bf16 with fp32
// accumulation, in the split form "bf16x3" (as cuVS's 3xTF32, with bf16): each centred
// row x = hi + lo + r, hi = bf16(x), lo = bf16(x - hi), and
//     q.b ~ hi(q).hi(b)  +  [hi(q) | lo(q)] . [lo(b) | hi(b)]
// as two GEMMs (lengths d and 2d; the operands are stored once as [hi | lo] for queries
// and [lo | hi] for the bank, so hi(q) and hi(b) are strided views), the second
// accumulating into the first's fp32 output (cuBLAS beta = 1; on a torch without
// aten::addmm.dtype_out the select kernel adds the two outputs, the same rounding). The dropped terms are O(2^-16) of ||q|| ||b||: about 4x the error
// bound of an fp32 GEMM once tensor-core accumulation is taken conservatively
// (ExpansionBound::bf16x3, knn_bound.h), at 3 bf16 GEMM lengths, i.e. well under the time
// of one fp32 SIMT GEMM (H100 SXM peaks: ~990 dense bf16 TFLOP/s, ~67 fp32). A single
// bf16 GEMM would be 3x cheaper again, but its error (2^-8 ||q|| ||b||) is larger than the
// nearest-neighbour distance itself on real patch features (centred norms ~11x that
// distance): the band would hold hundreds of rows. knn_stats's gemm="fp32"
// selects the fp32 GEMM (at::mm, cuBLAS SIMT unless TF32 is allowed) instead, for tests
// and comparison; so does a torch without aten::mm.dtype_out (looked up at run time).
//
// ||q||^2 is added only to the survivors, in the exact refinement and certificate that
// follow: the candidates within the error band of the k-th value (v_k + 2 E) are
// recomputed with direct differences of the rows as given by a warp per query row
// (refine_kernel below; the others cannot reach the k nearest), the k-th exact distance is
// certified against the threshold (knn_bound.h, step 3). The first pass keeps
// max(64, k + 31) candidates (k + max(k, 15) with the fp32 GEMM); rows whose certificate
// fails are rescored by the same tiled machinery with 8x the candidates, until certified
// (at kc == M the whole bank is refined, which certifies by definition): never a per-row
// full-bank cdist plus sort. Host synchronisations: the query's NaN / Inf check (its sum,
// csrc/common.h), max ||b - mu|| (the bound's scalar: once per bank when the bank's side
// is made by knn_bank and given back to knn_prepared) and, per round, the number of rows
// left (scalars or sizes the host needs).

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "knn_refine.h"
#include "knn_select.cuh"

namespace patchcore_fast {
namespace {

using knn_select::cand_less;
using knn_select::TopList;

// Scratch budget of one step (GEMM tiles, refinement chunk, exact-scan chunk).
constexpr int64_t kBudgetBytes = int64_t{256} << 20;
// Largest candidate count handled by the register-list kernel.
constexpr int64_t kMaxFastCandidates = 64;
// Largest k of the warp-per-row refinement (else the ATen one).
constexpr int64_t kMaxRefineK = 16;
constexpr int kTop2Threads = 256;    // 8 rows (warps) per block
constexpr int kRefineThreads = 256;  // 8 rows (warps) per block

// ----- the GEMM scheme ------------------------------------------------------------------

enum class Gemm { kFp32, kBf16x3 };

// An ATen op overload looked up through the dispatcher (nullopt when this torch lacks it),
// so that the kernel builds and runs against torch versions with or without it.
template <class Fn>
std::optional<c10::TypedOperatorHandle<Fn>> find_op(const char* name, const char* overload) {
  auto h = c10::Dispatcher::singleton().findSchema({name, overload});
  if (!h.has_value()) return std::nullopt;
  return h->typed<Fn>();
}

// aten::mm.dtype_out (bf16 inputs, fp32 output and accumulation), looked up once: torch
// versions without it fall back to the fp32 GEMM.
using MmDtypeOut = at::Tensor&(const at::Tensor&, const at::Tensor&, c10::ScalarType,
                               at::Tensor&);
const c10::TypedOperatorHandle<MmDtypeOut>* mm_dtype_op() {
  static const auto op = find_op<MmDtypeOut>("aten::mm", "dtype_out");
  return op.has_value() ? &*op : nullptr;
}

// aten::addmm.dtype_out: the second split GEMM accumulates into the first's output
// (cuBLAS beta = 1), so that selection reads one fp32 buffer instead of two. Looked up
// once; without it the two outputs are added in the select kernel (the same rounding).
using AddmmDtypeOut = at::Tensor&(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  c10::ScalarType, const c10::Scalar&, const c10::Scalar&,
                                  at::Tensor&);
const c10::TypedOperatorHandle<AddmmDtypeOut>* addmm_dtype_op() {
  static const auto op = find_op<AddmmDtypeOut>("aten::addmm", "dtype_out");
  return op.has_value() ? &*op : nullptr;
}

// knn_stats's `gemm` ("auto", "fp32" or "bf16x3", checked by check_knn_variant); auto
// and bf16x3 fall back to fp32 where this torch lacks the dtype-out GEMM of the split.
Gemm gemm_scheme(c10::string_view gemm) {
  if (gemm == "fp32" || mm_dtype_op() == nullptr) return Gemm::kFp32;
  return Gemm::kBf16x3;
}

// Split operand of centred rows x [n, d] fp32: [n, 2d] bf16, [hi | lo] (queries) or
// [lo | hi] (bank), hi = bf16(x), lo = bf16(x - hi); see the file header.
at::Tensor split_bf16(const at::Tensor& x, bool lo_first) {
  const at::Tensor hi = x.to(at::kBFloat16);
  const at::Tensor lo = at::sub(x, hi.to(at::kFloat)).to(at::kBFloat16);
  return lo_first ? at::cat({lo, hi}, 1) : at::cat({hi, lo}, 1);
}

// ----- candidate selection ----------------------------------------------------------------

// Value of the expanded form for one entry: ||b||^2 - 2 q.b, where q.b is one GEMM output
// (fp32 scheme) or the sum of the two split GEMMs' outputs (bf16x3).
template <bool kTwo>
__device__ __forceinline__ float expanded(const float* __restrict__ r,
                                          const float* __restrict__ r2, int j, float bnj) {
  const float ip = kTwo ? r[j] + r2[j] : r[j];
  return fmaf(-2.f, ip, bnj);
}

// k == 1 selection: one warp per query row, each lane keeps its best two candidates.
//   ip (ip2): [rows, nb] inner products q.b (second split part); bn: [nb] ||b||^2 of the
//   tile; j0: first bank row; best_v / best_i: [rows, kc] running sorted candidates
//   (kc = 1 or 2); has_old: the buffer already holds candidates from earlier tiles.
template <bool kTwo>
__global__ void __launch_bounds__(kTop2Threads)
    select_top2_kernel(const float* __restrict__ ip, const float* __restrict__ ip2, int nb,
                       const float* __restrict__ bn, int j0, int rows,
                       float* __restrict__ best_v, int64_t* __restrict__ best_i, int kc,
                       bool has_old) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (kTop2Threads / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;  // warp-uniform
  const float* r = ip + static_cast<int64_t>(row) * nb;
  const float* r2 = kTwo ? ip2 + static_cast<int64_t>(row) * nb : nullptr;
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
  for (int j = lane; j < nb; j += 32) push(expanded<kTwo>(r, r2, j, bn[j]), j0 + j);
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

// 2 < kc <= 64 selection: one warp per query row. Lane l keeps, sorted in registers, the
// KT best entries among its share of the tile (columns j = l mod 32) and of the running
// buffer (slots t = l mod 32); then kc rounds of a warp arg-min pop the row's new sorted
// best kc. Per-lane lists are short (KT = 8: one compare rejects almost every entry, an
// insert costs at most 8 swaps), so a lane may have to drop an entry that belongs to the
// row's best kc (more than KT of them in its share; with kc = 64 over 32 lanes, rare).
// That never costs exactness: everything a lane dropped is >= the last entry of its
// list, so the row's threshold thr (every bank row that is not a candidate has a value
// >= thr, knn_bound.h step 3) becomes min(thr, last entry of each lane that dropped one),
// which the certificate uses (a smaller thr can only fail it: the row is redone wider).
// Before this kernel, a block per row with 64-entry lists per thread and block-wide
// rounds spent longer in selection than the tensor cores in the GEMM (H200).
//   thr: [rows] running threshold (+inf before the first tile).
constexpr int kLaneList = 8;

template <bool kTwo, bool kVec>
__global__ void __launch_bounds__(kTop2Threads)
    select_warp_kernel(const float* __restrict__ ip, const float* __restrict__ ip2, int nb,
                       const float* __restrict__ bn, int j0, int rows,
                       float* __restrict__ best_v, int64_t* __restrict__ best_i,
                       float* __restrict__ thr, int kc, bool has_old) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (kTop2Threads / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;  // warp-uniform
  const float* r = ip + static_cast<int64_t>(row) * nb;
  const float* r2 = kTwo ? ip2 + static_cast<int64_t>(row) * nb : nullptr;
  float* bv = best_v + static_cast<int64_t>(row) * kc;
  int64_t* bi = best_i + static_cast<int64_t>(row) * kc;

  TopList<kLaneList> list;
  list.init();
  int pushed = 0;  // entries offered to this lane's list; more than kLaneList: some dropped
  if (has_old) {
    for (int t = lane; t < kc; t += 32, ++pushed) list.push(bv[t], static_cast<int>(bi[t]));
  }
  int j = lane;
  if (kVec) {
    // 16-byte loads (rows, tile norms aligned: checked at launch): lane l takes columns
    // 4 t .. 4 t + 3 for t = l mod 32; the same entries, pushed in another order (the
    // lists order by (value, index), so the result does not depend on it).
    const float4* r4 = reinterpret_cast<const float4*>(r);
    const float4* r24 = reinterpret_cast<const float4*>(r2);
    const float4* bn4 = reinterpret_cast<const float4*>(bn);
    for (int t = lane; t < nb / 4; t += 32, pushed += 4) {
      const float4 a = r4[t], c = __ldg(bn4 + t);
      float4 b = make_float4(0.f, 0.f, 0.f, 0.f);
      if (kTwo) b = r24[t];
      const int jj = j0 + 4 * t;
      list.push(fmaf(-2.f, kTwo ? a.x + b.x : a.x, c.x), jj);
      list.push(fmaf(-2.f, kTwo ? a.y + b.y : a.y, c.y), jj + 1);
      list.push(fmaf(-2.f, kTwo ? a.z + b.z : a.z, c.z), jj + 2);
      list.push(fmaf(-2.f, kTwo ? a.w + b.w : a.w, c.w), jj + 3);
    }
    j = nb / 4 * 4 + lane;  // the tail
  }
  for (; j < nb; j += 32, ++pushed) {
    list.push(expanded<kTwo>(r, r2, j, bn[j]), j0 + j);
  }
  // This lane's bound on what it dropped, reduced over the warp into the row's threshold.
  float floor = pushed > kLaneList ? list.v[kLaneList - 1] : INFINITY;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    floor = fminf(floor, __shfl_xor_sync(knn_select::kFullMask, floor, off));
  }
  // Reads of the old buffer (above) happen before the writes (below) of the same warp.
  __syncwarp();
  for (int round = 0; round < kc; ++round) {
    float v = list.v[0];
    int i = list.i[0];
    int owner = lane;
    knn_select::warp_argmin(v, i, owner);
    if (lane == owner) list.pop_front();
    if (lane == 0) {
      bv[round] = v;
      bi[round] = i;
    }
  }
  if (lane == 0) {
    const float old = has_old ? thr[row] : INFINITY;
    thr[row] = fminf(old, floor);
  }
}

template <bool kTwo>
void select_tile_impl(const float* ipp, const float* ip2p, int64_t rows, int64_t nb,
                      const float* bnp, int64_t j0, float* bvp, int64_t* bip, float* thrp,
                      int64_t kc, bool has_old) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int per_block = kTop2Threads / 32;
  const dim3 grid(static_cast<unsigned>((rows + per_block - 1) / per_block));
  if (kc <= 2) {
    select_top2_kernel<kTwo><<<grid, kTop2Threads, 0, stream>>>(
        ipp, ip2p, static_cast<int>(nb), bnp, static_cast<int>(j0), static_cast<int>(rows),
        bvp, bip, static_cast<int>(kc), has_old);
  } else {
    auto aligned = [](const float* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    const bool vec = nb % 4 == 0 && aligned(ipp) && aligned(bnp) && (!kTwo || aligned(ip2p));
    auto go = [&](auto v) {
      select_warp_kernel<kTwo, decltype(v)::value><<<grid, kTop2Threads, 0, stream>>>(
          ipp, ip2p, static_cast<int>(nb), bnp, static_cast<int>(j0), static_cast<int>(rows),
          bvp, bip, thrp, static_cast<int>(kc), has_old);
    };
    if (vec) {
      go(std::true_type{});
    } else {
      go(std::false_type{});
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the selection of one (query tile, bank tile).
//   ip: [rows, nb] q.b; ip2: the second split part (undefined with the fp32 GEMM); bn:
//   [nb]; best_v / best_i: [rows, kc] views of the running buffer; thr: [rows] its
//   threshold (see select_warp_kernel; the exact kernels leave it alone).
void select_tile(const at::Tensor& ip, const at::Tensor& ip2, const at::Tensor& bn,
                 int64_t j0, at::Tensor& best_v, at::Tensor& best_i, at::Tensor& thr,
                 int64_t kc, bool has_old) {
  const float* ip2p = ip2.defined() ? ip2.data_ptr<float>() : nullptr;
  auto go = [&](auto two) {
    select_tile_impl<decltype(two)::value>(ip.data_ptr<float>(), ip2p, ip.size(0), ip.size(1),
                                           bn.data_ptr<float>(), j0, best_v.data_ptr<float>(),
                                           best_i.data_ptr<int64_t>(), thr.data_ptr<float>(),
                                           kc, has_old);
  };
  if (ip2p != nullptr) {
    go(std::true_type{});
  } else {
    go(std::false_type{});
  }
}

// kc > 64: merge the tile into the running buffer with at::topk (ties at the cut may go
// either way; the certificate only needs every dropped value to be >= the kept kc-th).
void select_tile_topk(const at::Tensor& ip, const at::Tensor& ip2, const at::Tensor& bn,
                      int64_t j0, at::Tensor& best_v, at::Tensor& best_i, int64_t kc,
                      bool has_old) {
  const int64_t rows = ip.size(0), nb = ip.size(1);
  const at::Tensor dot = ip2.defined() ? at::add(ip, ip2) : ip;
  at::Tensor vals = at::sub(bn.unsqueeze(0), dot, /*alpha=*/2);  // ||b||^2 - 2 q.b
  at::Tensor idx = at::arange(j0, j0 + nb, best_i.options()).unsqueeze(0).expand({rows, nb});
  if (has_old) {
    vals = at::cat({best_v, vals}, 1);
    idx = at::cat({best_i, idx}, 1);
  }
  auto top = at::topk(vals, kc, /*dim=*/1, /*largest=*/false, /*sorted=*/true);
  best_v.copy_(std::get<0>(top));
  best_i.copy_(idx.gather(1, std::get<1>(top)));
}

// The GEMM side of the selection.
//   fp32: bank = centred bank [M, d] float32, queries centred [n, d] float32.
//   bf16x3: bank = [M, 2d] bf16 [lo | hi], queries [n, 2d] bf16 [hi | lo] (split_bf16).
struct Operands {
  Gemm gemm;
  at::Tensor bank;
  at::Tensor bn;  // [M] ||b - mu||^2 float32
};

// ip (, ip2) <- q.b of a query tile and a bank tile (see Operands).
void tile_gemm(const Operands& ops, const at::Tensor& qtile, const at::Tensor& btile,
               at::Tensor& ip, at::Tensor& ip2) {
  if (ops.gemm == Gemm::kFp32) {
    at::mm_out(ip, qtile, btile.t());  // cuBLAS, current stream
    return;
  }
  const int64_t d = btile.size(1) / 2;
  const auto& mm = *mm_dtype_op();
  mm.call(qtile.narrow(1, 0, d), btile.narrow(1, d, d).t(), at::kFloat, ip);  // hi . hi
  if (ip2.defined()) {
    mm.call(qtile, btile.t(), at::kFloat, ip2);  // hi(q) . lo(b) + lo(q) . hi(b)
  } else {
    // ip <- ip + hi(q) . lo(b) + lo(q) . hi(b): fl(acc + C), the select kernel's own sum.
    try {
      addmm_dtype_op()->call(ip, qtile, btile.t(), at::kFloat, 1, 1, ip);
    } catch (const c10::Error& e) {
      // A torch whose addmm.dtype_out refuses the in-place form: the same sum, unfused.
      TORCH_WARN_ONCE("patchcore_fast knn: addmm.dtype_out failed (", e.what_without_backtrace(),
                      "); adding the split GEMMs' outputs separately");
      at::Tensor lo = at::empty_like(ip);
      mm.call(qtile, btile.t(), at::kFloat, lo);
      ip.add_(lo);
    }
  }
}

// Bank rows per tile, from the budget's tb: the bank in tiles of equal size (a multiple of
// 128), one tile when the bank exceeds tb by at most 1/16 (the budget is a soft limit: a
// bank of 16,386 rows against a budget of 16,384 took a second GEMM and a merge round for
// its last 2 rows); never fewer than tb_min rows.
inline int64_t bank_tile_rows(int64_t m, int64_t tb, int64_t tb_min) {
  const int64_t tiles = std::max<int64_t>(1, (16 * m + 17 * tb - 1) / (17 * tb));
  const int64_t even = ((m + tiles - 1) / tiles + 127) / 128 * 128;
  return std::min(m, std::max(even, tb_min));
}

// Candidate selection for query rows qrows (GEMM operand of the centred rows) over the
// bank, in tiles: returns (values [n, kc] sorted ascending, bank rows [n, kc], the
// certificate's threshold T [n]: every bank row that is not a candidate has value >= T).
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_candidates(const at::Tensor& qrows,
                                                     const Operands& ops, int64_t kc) {
  const int64_t nq = qrows.size(0), m = ops.bank.size(0);
  const bool fast = kc <= kMaxFastCandidates;
  // Two GEMM outputs to add in the select kernel: the split scheme without addmm.dtype_out.
  const bool two = ops.gemm == Gemm::kBf16x3 && addmm_dtype_op() == nullptr;
  const auto fopts = ops.bn.options();
  // Tiles: the [tq, tb] GEMM output(s) (plus the topk path's temporaries) within the budget.
  const int64_t bytes_per_entry = (fast ? 4 : 32) * (two ? 2 : 1);
  // A bank tile holds at least kc rows (the topk path needs them) and 128 when it can.
  const int64_t tb_min = std::max<int64_t>(std::min<int64_t>(m, 128), kc);
  // At most 4,096 query rows per tile, so that bank tiles are wide (8,192 rows with the
  // split GEMM's two outputs): each bank tile costs every row a merge of kc rounds.
  const int64_t tq = std::max<int64_t>(
      1, std::min<int64_t>({nq, 4096, kBudgetBytes / (bytes_per_entry * tb_min)}));
  int64_t tb = std::max(kBudgetBytes / (bytes_per_entry * tq) / 128 * 128, tb_min);
  tb = bank_tile_rows(m, tb, tb_min);
  at::Tensor buf = at::empty({tq * tb}, fopts);
  at::Tensor buf2 = two ? at::empty({tq * tb}, fopts) : at::Tensor();
  at::Tensor best_v = at::empty({nq, kc}, fopts);
  at::Tensor best_i = at::empty({nq, kc}, fopts.dtype(at::kLong));
  at::Tensor thr = at::full({nq}, INFINITY, fopts);  // lowered by select_warp_kernel only
  for (int64_t q0 = 0; q0 < nq; q0 += tq) {
    const int64_t rows = std::min(tq, nq - q0);
    at::Tensor qtile = qrows.narrow(0, q0, rows);
    at::Tensor bv = best_v.narrow(0, q0, rows);
    at::Tensor bi = best_i.narrow(0, q0, rows);
    at::Tensor th = thr.narrow(0, q0, rows);
    for (int64_t j0 = 0; j0 < m; j0 += tb) {
      const int64_t nb = std::min(tb, m - j0);
      at::Tensor ip = buf.narrow(0, 0, rows * nb).view({rows, nb});
      at::Tensor ip2 = two ? buf2.narrow(0, 0, rows * nb).view({rows, nb}) : at::Tensor();
      tile_gemm(ops, qtile, ops.bank.narrow(0, j0, nb), ip, ip2);
      at::Tensor bnt = ops.bn.narrow(0, j0, nb);
      if (fast) {
        select_tile(ip, ip2, bnt, j0, bv, bi, th, kc, j0 > 0);
      } else {
        select_tile_topk(ip, ip2, bnt, j0, bv, bi, kc, j0 > 0);
      }
    }
  }
  // The certificate's threshold: no non-candidate lies below the kc-th value or thr.
  thr = at::minimum(thr, best_v.select(1, kc - 1));
  return {best_v, best_i, thr};
}

// ----- exact refinement -------------------------------------------------------------------

// Squared distance of two rows by direct differences, one warp: each lane sums a strided
// part (float4 when kVec), then a butterfly; every lane returns the same value.
template <bool kVec>
__device__ __forceinline__ float warp_sqdist(const float* __restrict__ a,
                                             const float* __restrict__ b, int d, int lane) {
  float s = 0.f;
  if (kVec) {
    const float4* a4 = reinterpret_cast<const float4*>(a);
    const float4* b4 = reinterpret_cast<const float4*>(b);
    for (int t = lane; t < d / 4; t += 32) {
      const float4 x = a4[t], y = __ldg(b4 + t);
      const float e0 = x.x - y.x, e1 = x.y - y.y, e2 = x.z - y.z, e3 = x.w - y.w;
      s = fmaf(e0, e0, s);
      s = fmaf(e1, e1, s);
      s = fmaf(e2, e2, s);
      s = fmaf(e3, e3, s);
    }
  } else {
    for (int t = lane; t < d; t += 32) {
      const float e = a[t] - __ldg(b + t);
      s = fmaf(e, e, s);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(knn_select::kFullMask, s, off);
  return s;
}

// Exact refinement and certificate of one query row per warp (knn_bound.h, steps 2-3),
// for k <= kMaxRefineK. The row's candidates arrive sorted by expanded value v; only those
// with v <= v_k + 2 E(q) are refined: any other has true squared distance
// >= v + ||q||^2 - E > v_k + ||q||^2 + E >= that of each of the k best by v, so it cannot
// be among the k nearest (on Gaussian data this leaves ~k rows to refine of kc). Winners
// are ranked by (distance as returned, index): lower index first on exact ties, as the
// ATen refinement and the CPU kernel do.
//   query: [n, d] rows as given; bank: [m, d]; cand_v / cand_i: [n, kc]; thr: [n] the
//   certificate's threshold (select_candidates); qn: [n] float64
//   ||q - mu||^2; eb: [n] float64 E(q); out_d / out_i: [n, k]; failed: [n] (certificate
//   failed: the row is redone with more candidates); refined: one int64 counter.
template <bool kVec>
__global__ void __launch_bounds__(kRefineThreads)
    refine_kernel(const float* __restrict__ query, const float* __restrict__ bank, int d,
                  const float* __restrict__ cand_v, const int64_t* __restrict__ cand_i,
                  const float* __restrict__ thr, int n, int kc, int k, bool certify,
                  const double* __restrict__ qn,
                  const double* __restrict__ eb, float* __restrict__ out_d,
                  int64_t* __restrict__ out_i, bool* __restrict__ failed,
                  unsigned long long* __restrict__ refined) {
  constexpr int kWarps = kRefineThreads / 32;
  __shared__ float s_d[kWarps][kMaxRefineK];
  __shared__ float s_sq[kWarps][kMaxRefineK];
  __shared__ int s_i[kWarps][kMaxRefineK];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row = blockIdx.x * kWarps + warp;
  if (row >= n) return;  // warp-uniform
  const float* q = query + static_cast<int64_t>(row) * d;
  const float* cv = cand_v + static_cast<int64_t>(row) * kc;
  const int64_t* ci = cand_i + static_cast<int64_t>(row) * kc;
  const double limit = static_cast<double>(cv[k - 1]) + 2.0 * eb[row];
  int held = 0;  // winners held in s_* (sorted by (distance, index)), lane 0 writes
  int t = 0;
  for (; t < kc; ++t) {
    if (t >= k && static_cast<double>(cv[t]) > limit) break;  // the rest lie above the band
    const int j = static_cast<int>(ci[t]);
    const float sq = warp_sqdist<kVec>(q, bank + static_cast<int64_t>(j) * d, d, lane);
    if (lane == 0) {
      const float dist = sqrtf(fmaxf(sq, 0.f));
      // Insertion into the sorted top-k list (drop the entry if it ranks past k).
      int p = held < k ? held : k;
      if (p == k && !cand_less(dist, j, s_d[warp][k - 1], s_i[warp][k - 1])) p = -1;
      if (p >= 0) {
        if (p == k) p = k - 1;
        while (p > 0 && cand_less(dist, j, s_d[warp][p - 1], s_i[warp][p - 1])) {
          s_d[warp][p] = s_d[warp][p - 1];
          s_sq[warp][p] = s_sq[warp][p - 1];
          s_i[warp][p] = s_i[warp][p - 1];
          --p;
        }
        s_d[warp][p] = dist;
        s_sq[warp][p] = sq;
        s_i[warp][p] = j;
        if (held < k) ++held;
      }
    }
  }
  if (lane != 0) return;
  atomicAdd(refined, static_cast<unsigned long long>(t));
  for (int w = 0; w < k; ++w) {
    out_d[static_cast<int64_t>(row) * k + w] = s_d[warp][w];
    out_i[static_cast<int64_t>(row) * k + w] = s_i[warp][w];
  }
  // Certificate (float64): k-th exact squared distance <= T + ||q - mu||^2 - E(q).
  const double lower = static_cast<double>(thr[row]) + qn[row] - eb[row];
  failed[row] = certify && !(static_cast<double>(s_sq[warp][k - 1]) <= lower);
}

// Refines the candidates of n query rows; returns Tensor[n] bool, the rows whose
// certificate failed. See refine_kernel (any kc: it stops at the band's end); the ATen
// refinement (all kc candidates) for k > kMaxRefineK.
at::Tensor refine(const at::Tensor& q, const at::Tensor& qn, const at::Tensor& bank,
                  const at::Tensor& cand_v, const at::Tensor& cand_i, const at::Tensor& thr,
                  int64_t k,
                  const knn_detail::ExpansionBound& bound, double bmax, at::Tensor& od,
                  at::Tensor& oi, at::Tensor& refined, int64_t& refined_host) {
  const int64_t n = q.size(0), m = bank.size(0), d = bank.size(1), kc = cand_i.size(1);
  if (k > kMaxRefineK) {
    refined_host += n * kc;
    return knn_detail::refine_candidates_aten(q, qn, bank, cand_i, thr, k, bound, bmax,
                                              kBudgetBytes, od, oi);
  }
  const at::Tensor eb = bound(qn.sqrt(), bmax).contiguous();  // [n] float64 E(q)
  at::Tensor failed = at::empty({n}, q.options().dtype(at::kBool));
  const bool vec = d % 4 == 0 && reinterpret_cast<uintptr_t>(q.data_ptr<float>()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(bank.data_ptr<float>()) % 16 == 0;
  const int per_block = kRefineThreads / 32;
  const dim3 grid(static_cast<unsigned>((n + per_block - 1) / per_block));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto go = [&](auto v) {
    refine_kernel<decltype(v)::value><<<grid, kRefineThreads, 0, stream>>>(
        q.data_ptr<float>(), bank.data_ptr<float>(), static_cast<int>(d),
        cand_v.data_ptr<float>(), cand_i.data_ptr<int64_t>(), thr.data_ptr<float>(),
        static_cast<int>(n),
        static_cast<int>(kc), static_cast<int>(k), kc < m, qn.data_ptr<double>(),
        eb.data_ptr<double>(), od.data_ptr<float>(), oi.data_ptr<int64_t>(),
        failed.data_ptr<bool>(),
        reinterpret_cast<unsigned long long*>(refined.data_ptr<int64_t>()));
  };
  if (vec) {
    go(std::true_type{});
  } else {
    go(std::false_type{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return failed;
}

// First-pass candidate count. fp32 GEMM: k + max(k, 15), from the error-band populations
// the CPU kernel measures on WideResNet-50 random-weight features after centring (rows
// within 2 E of the k-th value: p99 14 at k = 1, 27 at k = 9). bf16x3: its bound is ~4x
// wider; the same measurement with it (1,000 WRN-50 queries against 16,386 rows, float64
// emulation) gives p90 29 / p99 57 at k = 1 and p90 48 / p99 79 at k = 9, hence
// max(64, k + 31): the register-list kernel's largest list, which settles ~99 % (k = 1)
// and ~95 % (k = 9) of such rows in the first pass (Gaussian data: p99 3 and 14).
inline int64_t first_candidates(int64_t k, int64_t m, Gemm gemm) {
  const int64_t kc = gemm == Gemm::kBf16x3 ? std::max<int64_t>(kMaxFastCandidates, k + 31)
                                           : k + std::max<int64_t>(k, 15);
  return std::min<int64_t>(m, kc);
}

// The bank's side of the kernel, made on every call or once per bank (knn_bank): the
// mean of the expansion, the ranking operand and norms of the centred rows, and the
// error bound's scalar.
struct BankSide {
  at::Tensor mean;  // [D] float32
  Operands ops;
  double bmax = 0.0;  // max ||b - mu|| as computed in fp32, before its widening
};

// Centre the bank on its mean (knn_bound.h, step 0) and build the ranking operand (split
// when the scheme is bf16x3; the refinement uses the rows as given). Host sync: max
// ||b - mu||, the bound's scalar. The bank's NaN / Inf check rides on this sync
// (check_knn_args leaves it here): NaN and Inf propagate into the mean and the norms, so a
// finite max proves the bank finite; otherwise (a bad value, or finite values whose
// centred difference overflows) the rows are inspected.
BankSide bank_side(const at::Tensor& bank, Gemm gemm) {
  const int64_t m = bank.size(0);
  BankSide S;
  S.mean = bank.sum(0, /*keepdim=*/false, at::kDouble).div_(m).to(at::kFloat);
  S.ops = Operands{gemm, bank - S.mean, at::Tensor()};
  at::Tensor bnorm =
      at::linalg_vector_norm(S.ops.bank, 2, at::IntArrayRef{1}, false, std::nullopt);
  S.ops.bn = bnorm.square();  // [M] ||b - mu||^2
  if (gemm == Gemm::kBf16x3) S.ops.bank = split_bf16(S.ops.bank, /*lo_first=*/true);
  S.bmax = bnorm.max().item<double>();
  if (!std::isfinite(S.bmax)) check_finite_rows(bank, "bank");
  return S;
}

// What knn_bank returns on CUDA, and knn_prepared takes back (the CPU kernel's layout,
// csrc/cpu/knn.cpp, with the ranking operand where the CPU keeps its pre-pass's basis):
//   (mean [D] float32, norms [M] float32 ||b - mu||^2, scalars [5] float64 on the CPU =
//    (max ||b - mu||^2, then zeros: no pre-pass), the ranking operand: [M, 2D] bf16
//    [lo | hi] (bf16x3) or [M, D] float32 (fp32 GEMM), and two empty tensors).
// The scalars live on the host, so a prepared call needs no synchronisation for them.
// max ||b - mu|| is a float32 value: its square is exact in float64, and so is the square
// root taken back, so the prepared bound is the unprepared one bit for bit.
constexpr int64_t kPrepared = 6;

std::vector<at::Tensor> knn_bank_cuda(const at::Tensor& bank_in) {
  check_knn_bank_args(bank_in);
  TORCH_CHECK_VALUE(bank_in.is_cuda(), "bank should be a CUDA tensor, got ", bank_in.device());
  c10::cuda::CUDAGuard guard(bank_in.device());
  at::NoGradGuard no_grad;
  const BankSide S = bank_side(bank_in.contiguous(), gemm_scheme("auto"));
  at::Tensor scalars = at::zeros({5}, at::TensorOptions().dtype(at::kDouble));
  scalars.data_ptr<double>()[0] = S.bmax * S.bmax;
  const auto f32 = bank_in.options().dtype(at::kFloat);
  return {S.mean, S.ops.bn, scalars, S.ops.bank, at::empty({0, 0}, f32), at::empty({0}, f32)};
}

// The prepared operands back, checked against the bank's shape and device (they cannot
// be checked against its values: the caller keeps them with the bank they were made
// from) and against this torch's ranking scheme.
BankSide unpack_prepared(at::TensorList prepared, const at::Tensor& bank) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(prepared.size()) == kPrepared,
                    "prepared should be knn_bank's ", kPrepared, " tensors, got ",
                    prepared.size());
  const int64_t m = bank.size(0), d = bank.size(1);
  const Gemm gemm = gemm_scheme("auto");
  const auto on = [](const at::Tensor& t, const at::Device& dev, at::ScalarType dtype,
                     at::IntArrayRef shape) {
    return t.device() == dev && t.scalar_type() == dtype && t.sizes() == shape &&
           t.is_contiguous();
  };
  const at::Device dev = bank.device(), cpu(at::kCPU);
  const bool ok =
      on(prepared[0], dev, at::kFloat, {d}) && on(prepared[1], dev, at::kFloat, {m}) &&
      on(prepared[2], cpu, at::kDouble, {5}) &&
      (gemm == Gemm::kBf16x3 ? on(prepared[3], dev, at::kBFloat16, {m, 2 * d})
                             : on(prepared[3], dev, at::kFloat, {m, d}));
  TORCH_CHECK_VALUE(ok, "prepared does not belong to a bank of shape [", m, ", ", d, "] on ",
                    dev, ": make it with knn_bank(bank) for this bank");
  BankSide S;
  S.mean = prepared[0];
  S.ops = Operands{gemm, prepared[3], prepared[1]};
  S.bmax = std::sqrt(prepared[2].data_ptr<double>()[0]);
  return S;
}

// knn with statistics (see the schema in csrc/ops.cpp).
//   prepared: the bank's side (knn_bank), or null: made here. Both give the same answer
//   and statistics (the same values).
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_cuda_impl(
    const at::Tensor& query_in, const at::Tensor& bank_in, int64_t k, Gemm gemm,
    const at::TensorList* prepared = nullptr) {
  check_knn_args(query_in, bank_in, k);
  TORCH_CHECK_VALUE(query_in.is_cuda(), "query should be a CUDA tensor, got ",
                    query_in.device());
  c10::cuda::CUDAGuard guard(query_in.device());
  at::NoGradGuard no_grad;
  const at::Tensor query = query_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const int64_t nq = query.size(0), m = bank.size(0), d = bank.size(1);
  at::Tensor out_d = at::empty({nq, k}, query.options());
  at::Tensor out_i = at::empty({nq, k}, query.options().dtype(at::kLong));
  // rows, rows of the second pass, last-resort exact scans (none here: stays 0), refined,
  // and the CPU kernel's projected pre-pass (none here: 4 and 5 stay 0); the refinement
  // kernel counts on the device (no sync), the ATen one on the host.
  int64_t stats[6] = {nq, 0, 0, 0, 0, 0};
  at::Tensor refined = at::zeros({1}, out_i.options());
  auto stats_tensor = [&] {
    // From pinned memory, non-blocking: no stream synchronisation (torch's host allocator
    // keeps the block until the copy has run).
    at::Tensor h = at::empty({6}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::copy(stats, stats + 6, h.data_ptr<int64_t>());
    at::Tensor s = h.to(query.device(), /*non_blocking=*/true);
    s.narrow(0, 3, 1).add_(refined);
    return s;
  };
  // A prepared bank was checked by knn_bank's pass.
  const BankSide S = prepared != nullptr ? unpack_prepared(*prepared, bank)
                     : nq == 0           ? BankSide{}
                                         : bank_side(bank, gemm);
  if (nq == 0) {
    // No pass over the bank to fold its check into.
    if (prepared == nullptr) check_finite_lowmem(bank, "bank");
    return {out_d, out_i, stats_tensor()};
  }
  const Gemm scheme = S.ops.gemm;
  const at::Tensor& mean = S.mean;
  const Operands& ops = S.ops;
  // max ||b - mu|| for the error bound, widened for its own fp32 rounding.
  const double bmax = S.bmax * (1.0 + 1e-5);
  const knn_detail::ExpansionBound bound =
      scheme == Gemm::kBf16x3
          ? knn_detail::ExpansionBound::bf16x3(d)
          : knn_detail::ExpansionBound(d, knn_detail::matmul_input_roundoff(/*cuda=*/true));

  // Rows still to settle: all, then those whose certificate failed, with 8x the candidates
  // each round; at kc == M the whole bank is refined, which certifies by definition.
  at::Tensor todo;  // undefined: every row
  int64_t kc = first_candidates(k, m, scheme);
  for (int round = 0;; ++round) {
    const int64_t n = todo.defined() ? todo.numel() : nq;
    // Rows per chunk so that the [rows, kc] candidate lists stay within the budget.
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(n, kBudgetBytes / (kc * 16)));
    std::vector<at::Tensor> failed;
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t c = std::min(chunk, n - s);
      at::Tensor rows = todo.defined() ? todo.narrow(0, s, c) : at::Tensor();
      at::Tensor q = rows.defined() ? query.index_select(0, rows) : query.narrow(0, s, c);
      at::Tensor q_c = q - mean;
      at::Tensor qn = q_c.to(at::kDouble).square().sum(1);
      if (scheme == Gemm::kBf16x3) q_c = split_bf16(q_c, /*lo_first=*/false);
      auto sel = select_candidates(q_c, ops, kc);
      q_c = at::Tensor();
      at::Tensor od = rows.defined() ? at::empty({c, k}, out_d.options()) : out_d.narrow(0, s, c);
      at::Tensor oi = rows.defined() ? at::empty({c, k}, out_i.options()) : out_i.narrow(0, s, c);
      at::Tensor bad = refine(q, qn, bank, std::get<0>(sel), std::get<1>(sel), std::get<2>(sel),
                              k, bound, bmax, od, oi, refined, stats[3]);
      if (rows.defined()) {
        out_d.index_copy_(0, rows, od);
        out_i.index_copy_(0, rows, oi);
        failed.push_back(rows.masked_select(bad));
      } else {
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

// The knn_stats op; project and project_bound_scale are the CPU kernel's pre-pass
// (checked, no effect here).
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_stats_cuda(
    const at::Tensor& query, const at::Tensor& bank, int64_t k, c10::string_view gemm,
    c10::string_view project, double project_bound_scale) {
  check_knn_variant(gemm, project, project_bound_scale);
  return knn_cuda_impl(query, bank, k, gemm_scheme(gemm));
}

// The knn_prepared op: knn_stats (gemm "auto") with knn_bank's operands of this bank.
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_prepared_cuda(
    const at::Tensor& query, const at::Tensor& bank, int64_t k, at::TensorList prepared,
    c10::string_view project) {
  check_knn_variant("auto", project, 1.0);
  return knn_cuda_impl(query, bank, k, gemm_scheme("auto"), &prepared);
}

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& query, const at::Tensor& bank,
                                            int64_t k) {
  auto r = knn_cuda_impl(query, bank, k, gemm_scheme("auto"));
  return {std::get<0>(r), std::get<1>(r)};
}

}  // namespace
}  // namespace patchcore_fast

TORCH_LIBRARY_IMPL(patchcore_fast, CUDA, m) {
  m.impl("knn", &patchcore_fast::knn_cuda);
  m.impl("knn_stats", &patchcore_fast::knn_stats_cuda);
  m.impl("knn_bank", &patchcore_fast::knn_bank_cuda);
  m.impl("knn_prepared", &patchcore_fast::knn_prepared_cuda);
}
