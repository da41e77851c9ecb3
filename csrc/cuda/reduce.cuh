#pragma once
// Device helpers for arg-max reductions over (value, index) pairs packed into one 64-bit
// key (csrc/pack_key.h: a larger key is a larger value, then a lower index; 0 is "no
// candidate"), so that a single unsigned max is the arg-max with the lowest-index rule.

#include <cstdint>

#include "../pack_key.h"

namespace patchcore_fast {
namespace cuda {

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
