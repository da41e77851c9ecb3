// Exact greedy k-center (farthest-point) selection on the GPU, in one persistent kernel.
//
// The selection is sequential (k steps), and the official implementation pays a few
// kernel launches and a host synchronisation (argmax().item()) at every step. Here the
// whole loop runs inside one cooperative kernel; steps are separated by grid.sync() and
// the host waits once, at the end.
//
// Step t (centre c = out[t]):
//   1. every block copies the row of c into shared memory (D floats);
//   2. every thread lowers min_d of its points with their squared distance to c (direct
//      differences, as the reference) and packs (min_d, index) into a 64-bit key; the
//      features are stored transposed, [D, N], so a warp reads 32 consecutive points of
//      one coordinate (coalesced), and min_d[N] stays in L2;
//   3. block arg-max of the keys (warp shuffles), then one atomicMax per block into
//      keys[t], a fresh zero-initialised slot per step, so no reset is needed;
//   4. grid.sync(); every block reads keys[t]: the next centre is its index.
// Selected points hold min_d = -1: min() keeps them negative, and they contribute key 0,
// below every real key, so they are never selected again (k == N gives a permutation).
// The packed key makes the single unsigned max an arg-max with the reference's tie rule
// (largest distance, then lowest index); see reduce.cuh.

// c10/cuda rather than ATen/cuda/CUDAContext.h: the latter pulls in cuSPARSE/cuBLAS
// headers that a bare CUDA toolkit may lack, and this file needs none of them.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common.h"
#include "../coreset_shard_step.h"
#include "reduce.cuh"

namespace patchcore_fast {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;

// Args:
//   x: [n, d] row-major features (centre rows are read from here, coalesced).
//   xt: [d, n] the same features transposed (streamed every step, coalesced over points).
//   min_d: [n] workspace; keys: [k] zero-initialised workspace.
//   out: [k] int64 selected indices; out[0] = start.
// Launched cooperatively with d floats of dynamic shared memory.
__global__ void __launch_bounds__(kThreads)
    greedy_coreset_kernel(const float* __restrict__ x, const float* __restrict__ xt,
                          float* __restrict__ min_d, unsigned long long* __restrict__ keys,
                          int64_t* __restrict__ out, int64_t n, int64_t d, int64_t k,
                          int64_t start) {
  extern __shared__ float centre[];  // [d]
  __shared__ unsigned long long scratch[kThreads / 32];
  cg::grid_group grid = cg::this_grid();

  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (blockIdx.x == 0 && threadIdx.x == 0) out[0] = start;

  int64_t cur = start;
  for (int64_t t = 0; t + 1 < k; ++t) {
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) centre[j] = x[cur * d + j];
    __syncthreads();

    unsigned long long best = 0ull;
    for (int64_t i = first; i < n; i += stride) {
      const float* p = xt + i;
      float s = 0.f;
#pragma unroll 8
      for (int j = 0; j < static_cast<int>(d); ++j, p += n) {
        const float v = *p - centre[j];
        s = fmaf(v, v, s);
      }
      // Step 0 has no previous minimum; afterwards min() keeps selected points at -1.
      float m = t == 0 ? s : fminf(min_d[i], s);
      if (i == cur) m = -1.f;
      min_d[i] = m;
      if (m >= 0.f) {
        const unsigned long long key = pack_key(m, static_cast<uint32_t>(i));
        best = key > best ? key : best;
      }
    }
    best = cuda::block_max_key(best, scratch);
    if (threadIdx.x == 0 && best != 0ull) atomicMax(keys + t, best);
    // The barrier orders every block's atomicMax before any block reads keys[t]; it also
    // orders this step's reads of `centre` before the next step overwrites it.
    grid.sync();
    // keys[t] was only ever written by atomics (in L2); read it past the L1 cache.
    const unsigned long long key = __ldcg(keys + t);
    cur = static_cast<int64_t>(key_index(key));
    if (blockIdx.x == 0 && threadIdx.x == 0) out[t + 1] = cur;
  }
}

// Lets `kernel` use `smem` bytes of dynamic shared memory (plus `static_smem` of its own),
// opting in above the 48 KiB default; `what` and `hint` word the error when the device
// cannot give that much.
template <typename Kernel>
void reserve_dynamic_smem(Kernel kernel, size_t smem, size_t static_smem, int device,
                          const char* what, const char* hint) {
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        device));
  TORCH_CHECK(smem + static_smem <= static_cast<size_t>(smem_optin), what,
              " on CUDA keeps a feature row in shared memory: ", smem / sizeof(float),
              " columns (", smem, " bytes) but device ", device, " allows ", smem_optin,
              " bytes per block; ", hint);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
}

at::Tensor greedy_coreset_cuda(const at::Tensor& features, int64_t k, int64_t start) {
  check_greedy_coreset_args(features, k, start);
  TORCH_CHECK(features.is_cuda(), "features should be a CUDA tensor, got ",
              features.device());
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0);
  const int64_t d = features.size(1);
  // Keys pack the index into 32 bits with 0xFFFFFFFF reserved; check_greedy_coreset_args
  // already limits n to int32, this states the kernel's own requirement.
  TORCH_CHECK(n < (int64_t{1} << 32) - 1, "greedy_coreset on CUDA supports fewer than 2^32 - 1 "
              "rows, got ", n);

  int device = features.get_device();
  int coop = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  TORCH_CHECK(coop == 1, "greedy_coreset needs a GPU that supports cooperative launches; "
              "device ", device, " does not (run it on the CPU instead)");

  // The centre row lives in dynamic shared memory.
  const size_t smem = static_cast<size_t>(d) * sizeof(float);
  reserve_dynamic_smem(greedy_coreset_kernel, smem, sizeof(unsigned long long) * (kThreads / 32),
                       device, "greedy_coreset",
                       "reduce the width (e.g. a random projection) or use the CPU");

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, greedy_coreset_kernel,
                                                               kThreads, smem));
  TORCH_CHECK(per_sm > 0, "greedy_coreset: the kernel cannot be resident on device ", device,
              " with ", smem, " bytes of shared memory per block");
  // Every block must be resident at once for grid.sync(); no more blocks than points
  // need (fewer blocks also make each grid-wide barrier cheaper).
  const int64_t needed = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(needed, static_cast<int64_t>(per_sm) * sms)));

  const at::Tensor x = features.contiguous();
  const at::Tensor xt = x.t().contiguous();  // [d, n]
  at::Tensor min_d = at::empty({n}, x.options());
  at::Tensor keys = at::zeros({k}, x.options().dtype(at::kLong));
  at::Tensor out = at::empty({k}, x.options().dtype(at::kLong));

  const float* x_ptr = x.data_ptr<float>();
  const float* xt_ptr = xt.data_ptr<float>();
  float* min_d_ptr = min_d.data_ptr<float>();
  auto* keys_ptr = reinterpret_cast<unsigned long long*>(keys.data_ptr<int64_t>());
  int64_t* out_ptr = out.data_ptr<int64_t>();
  void* args[] = {&x_ptr, &xt_ptr, &min_d_ptr, &keys_ptr, &out_ptr,
                  const_cast<int64_t*>(&n), const_cast<int64_t*>(&d), &k, &start};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(greedy_coreset_kernel),
                                             dim3(blocks), dim3(kThreads), args, smem,
                                             stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------------------------------
// One step of the distributed coreset on one rank's shard (see csrc/coreset_shard_step.h
// for the record and the state, and patchcore_fast/distributed.py for the loop). On CUDA
// the step is the plain pass, not the CPU's lazy heap: a pass over a shard is what a GPU
// does fast (one read of the rows, thousands of threads), while the lazy loop is a chain of
// dependent heap moves, one thread's work; so the state is min_d alone. Two kernels on
// the current stream and no host synchronisation, so the host only enqueues work and the
// step's collective (NCCL, also on the device) follows without a round trip:
//   1. every block finds the largest candidate key (a handful of records), loads that
//      row into shared memory, lowers min_d of its points with their squared distance to
//      it, summed exactly as greedy_coreset_kernel sums it (fmaf over the coordinates in
//      order, so a sharded run reproduces the fused kernel's values bit for bit), and
//      atomicMax-es its block's best packed key into best_key (zeroed before);
//   2. one block writes the record: best_key and the row it names (or a zero record).
// The shard is read row-major, one thread per point (strided loads: this step is built
// for exactness across processes, not tuned like the fused kernel's transposed layout).

__device__ __forceinline__ unsigned long long record_key(const int32_t* record) {
  // Records are D + 2 words: a row's start is only 4-byte aligned for odd D.
  return (static_cast<unsigned long long>(static_cast<uint32_t>(record[1])) << 32) |
         static_cast<uint32_t>(record[0]);
}

__global__ void __launch_bounds__(kThreads)
    coreset_shard_step_kernel(const float* __restrict__ x, const int32_t* __restrict__ cands,
                              int64_t ranks, float* __restrict__ min_d,
                              int64_t* __restrict__ indices, int64_t step,
                              unsigned long long* __restrict__ best_key, int64_t n, int64_t d,
                              int64_t offset) {
  extern __shared__ float centre[];  // [d]
  __shared__ unsigned long long scratch[kThreads / 32];
  __shared__ int64_t owner_s;
  if (threadIdx.x == 0) {
    int64_t owner = 0;
    for (int64_t r = 1; r < ranks; ++r) {
      if (record_key(cands + r * (d + 2)) > record_key(cands + owner * (d + 2))) owner = r;
    }
    owner_s = owner;
  }
  __syncthreads();
  const int32_t* rec = cands + owner_s * (d + 2);
  const int64_t chosen = static_cast<int64_t>(key_index(record_key(rec)));
  if (blockIdx.x == 0 && threadIdx.x == 0) indices[step] = chosen;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) centre[j] = __int_as_float(rec[2 + j]);
  __syncthreads();

  unsigned long long best = 0ull;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    float m = min_d[i];
    if (offset + i == chosen) {
      m = -1.f;
    } else if (m >= 0.f) {
      const float* p = x + i * d;
      float s = 0.f;
      for (int64_t j = 0; j < d; ++j) {
        const float v = p[j] - centre[j];
        s = fmaf(v, v, s);
      }
      m = fminf(m, s);
    }
    min_d[i] = m;
    if (m >= 0.f) {
      const unsigned long long key =
          pack_key(m, static_cast<uint32_t>(offset + i));
      best = key > best ? key : best;
    }
  }
  best = cuda::block_max_key(best, scratch);
  if (threadIdx.x == 0 && best != 0ull) atomicMax(best_key, best);
}

__global__ void coreset_shard_record_kernel(const float* __restrict__ x,
                                            const unsigned long long* __restrict__ best_key,
                                            int32_t* __restrict__ record, int64_t d,
                                            int64_t offset) {
  const unsigned long long key = *best_key;
  if (threadIdx.x == 0) {
    record[0] = static_cast<int32_t>(static_cast<uint32_t>(key & 0xFFFFFFFFull));
    record[1] = static_cast<int32_t>(static_cast<uint32_t>(key >> 32));
  }
  const int64_t row = key == 0ull ? -1
                                  : static_cast<int64_t>(key_index(key)) - offset;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    record[2 + j] = row < 0 ? 0 : __float_as_int(x[row * d + j]);
  }
}

std::vector<at::Tensor> coreset_shard_state_cuda(const at::Tensor& shard, int64_t k,
                                                 bool /*lazy: the plain pass only*/,
                                                 const std::optional<at::Tensor>& start) {
  check_coreset_shard_state_args(shard, k, start);
  TORCH_CHECK(shard.is_cuda(), "shard should be a CUDA tensor, got ", shard.device());
  const c10::cuda::CUDAGuard guard(shard.device());
  return {shard_start(shard, start)};
}

at::Tensor coreset_shard_step_cuda(const at::Tensor& shard, const at::Tensor& candidates,
                                   int64_t offset, at::TensorList state,
                                   const at::Tensor& indices, int64_t step) {
  check_coreset_shard_step_args(shard, candidates, offset, indices, step);
  TORCH_CHECK(shard.is_cuda(), "shard should be a CUDA tensor, got ", shard.device());
  TORCH_CHECK(state.size() == kShardStatePlain, "coreset_shard_step: state should hold ",
              kShardStatePlain, " tensor on CUDA (as coreset_shard_state makes it), got ",
              state.size());
  check_state_tensor(state[0], "min_d", at::kFloat, {shard.size(0)}, shard);
  const at::Tensor& min_d = state[0];
  const c10::cuda::CUDAGuard guard(shard.device());
  const at::Tensor x = shard.contiguous();
  const at::Tensor cands = candidates.contiguous();
  const int64_t n = x.size(0), d = x.size(1), ranks = cands.size(0);
  const int device = shard.get_device();

  const size_t smem = static_cast<size_t>(d) * sizeof(float);
  reserve_dynamic_smem(coreset_shard_step_kernel, smem, 1024, device, "coreset_shard_step",
                       "reduce the width (e.g. a random projection)");
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t needed = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(needed, static_cast<int64_t>(sms) * 4)));

  at::Tensor best_key = at::zeros({1}, x.options().dtype(at::kLong));
  at::Tensor record = at::empty({d + 2}, cands.options());
  auto* best_ptr = reinterpret_cast<unsigned long long*>(best_key.data_ptr<int64_t>());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  coreset_shard_step_kernel<<<blocks, kThreads, smem, stream>>>(
      x.data_ptr<float>(), cands.data_ptr<int32_t>(), ranks, min_d.data_ptr<float>(),
      indices.data_ptr<int64_t>(), step, best_ptr, n, d, offset);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  coreset_shard_record_kernel<<<1, kThreads, 0, stream>>>(
      x.data_ptr<float>(), best_ptr, record.data_ptr<int32_t>(), d, offset);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return record;
}

}  // namespace
}  // namespace patchcore_fast

TORCH_LIBRARY_IMPL(patchcore_fast, CUDA, m) {
  m.impl("greedy_coreset", &patchcore_fast::greedy_coreset_cuda);
  m.impl("coreset_shard_state", &patchcore_fast::coreset_shard_state_cuda);
  m.impl("coreset_shard_step", &patchcore_fast::coreset_shard_step_cuda);
}
