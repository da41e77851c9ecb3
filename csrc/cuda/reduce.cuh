#pragma once
// Device helpers for arg-max reductions over (value, index) pairs.
//
// A pair is packed into one 64-bit key so that a single unsigned max (a shuffle, or one
// atomicMax on global memory) is an arg-max with the lowest-index tie rule:
//   key = (float bits of value) << 32 | (0xFFFFFFFF - index).
// For value >= 0 the IEEE bits order like the value, so a larger key is a larger value,
// then a lower index. Key 0 means "no candidate" (it is smaller than any real key as long
// as index < 2^32 - 1).

#include <cstdint>

namespace patchcore_fast {
namespace cuda {

// Packs a non-negative value and its index (index < 2^32 - 1).
__device__ __forceinline__ unsigned long long pack_argmax_key(float value, uint32_t index) {
  return (static_cast<unsigned long long>(__float_as_uint(value)) << 32) |
         static_cast<unsigned long long>(0xFFFFFFFFu - index);
}

__device__ __forceinline__ uint32_t argmax_key_index(unsigned long long key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFull);
}

__device__ __forceinline__ float argmax_key_value(unsigned long long key) {
  return __uint_as_float(static_cast<uint32_t>(key >> 32));
}

// Maximum of `key` over the 32 lanes of a full warp; every lane gets the result.
__device__ __forceinline__ unsigned long long warp_max_key(unsigned long long key) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xFFFFFFFFu, key, offset);
    key = other > key ? other : key;
  }
  return key;
}

// Maximum of `key` over the block (blockDim.x a multiple of 32, at most 1024). `scratch`
// is shared memory of at least blockDim.x / 32 entries. Every thread must call it; the
// result is valid in every thread. Ends with a barrier, so scratch can be reused after.
__device__ __forceinline__ unsigned long long block_max_key(unsigned long long key,
                                                            unsigned long long* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  key = warp_max_key(key);
  if (lane == 0) scratch[warp] = key;
  __syncthreads();
  key = lane < nwarps ? scratch[lane] : 0ull;
  key = warp_max_key(key);  // every warp reduces the per-warp maxima itself
  __syncthreads();
  return key;
}

}  // namespace cuda
}  // namespace patchcore_fast
