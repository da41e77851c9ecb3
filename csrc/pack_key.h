#pragma once
// (value, index) packed into one 64-bit key so that a single unsigned max is an arg-max
// with the lowest-index tie rule, on the host (the CPU coreset's heap) and on the device
// (warp shuffles and one atomicMax per block in the CUDA coreset):
//   key = (float bits of value) << 32 | (0xFFFFFFFF - index).
// For value >= 0 the IEEE bits order like the value, so a larger key is a larger value,
// then a lower index. Key 0 means "no candidate": it is below every real key as long as
// index < 2^32 - 1.

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PATCHCORE_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PATCHCORE_FAST_HOST_DEVICE inline
#endif

namespace patchcore_fast {

// unsigned long long (not uint64_t, which is unsigned long on Linux): the type of CUDA's
// 64-bit atomicMax and shuffles.
using ArgmaxKey = unsigned long long;

// Packs a non-negative value and its index (index < 2^32 - 1).
PATCHCORE_FAST_HOST_DEVICE ArgmaxKey pack_key(float value, uint32_t index) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));  // a bit cast; nvcc and gcc lower it to a move
  return (static_cast<ArgmaxKey>(bits) << 32) | static_cast<ArgmaxKey>(0xFFFFFFFFu - index);
}

PATCHCORE_FAST_HOST_DEVICE uint32_t key_index(ArgmaxKey key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFull);
}

PATCHCORE_FAST_HOST_DEVICE float key_value(ArgmaxKey key) {
  const uint32_t bits = static_cast<uint32_t>(key >> 32);
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

}  // namespace patchcore_fast
