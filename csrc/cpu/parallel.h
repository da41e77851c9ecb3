#pragma once
// at::parallel_for that carries the caller's thread-local state into its worker threads.
//
// at::parallel_for runs chunks on OpenMP worker threads, which do not inherit the calling
// thread's PyTorch thread-local state (grad mode, inference mode, dispatch-key sets).
// Under torch.inference_mode every tensor the calling thread allocates is an inference
// tensor, and an ATen out= op on it from a worker (outside inference mode there) raises
// "Inplace update to inference tensor outside InferenceMode"; a worker's own allocations
// would also be normal tensors where the caller's are inference tensors. Every parallel
// region of the k-NN kernels that calls ATen (GEMMs into shared buffers, scratch tiles)
// goes through this wrapper, so a chunk runs in the caller's state whichever thread takes
// it (the ThreadLocalStateGuard pattern of at::launch and the autograd engine). Regions
// that touch raw pointers only may call at::parallel_for directly.

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace patchcore_fast {

template <class F>
inline void parallel_for_tls(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;  // captured once, on the calling thread
  at::parallel_for(begin, end, grain, [&](int64_t a, int64_t b) {
    at::ThreadLocalStateGuard guard(state);
    f(a, b);
  });
}

}  // namespace patchcore_fast
