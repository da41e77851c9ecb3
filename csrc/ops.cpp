// The one TORCH_LIBRARY block of patchcore_fast: every operator schema lives here.
// Backend kernels register themselves in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu with
// TORCH_LIBRARY_IMPL, so a CPU-only build needs no #ifdef.
//
// The shared library is imported from Python only for this side effect (the ops land in
// torch.ops.patchcore_fast); the empty module below lets `import patchcore_fast._C` work.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty Python module: the operators are reached through the dispatcher, not pybind11.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "patchcore_fast compiled operators (registered in torch.ops.patchcore_fast)",
      -1,    // size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(patchcore_fast, m) {
  // Exact greedy k-center (farthest-point) selection.
  //   features: Tensor[N, D] float32, finite; k in [1, N]; start in [0, N).
  //   returns indices: Tensor[k] int64, in selection order, indices[0] == start.
  m.def("greedy_coreset(Tensor features, int k, int start=0) -> Tensor");
  // The state of one rank's shard for the exact distributed coreset (its layout is the
  // kernel's own: csrc/coreset_shard_step.h).
  //   shard: Tensor[N_r, D] float32; k >= 1, the centres the run will select;
  //   lazy: the CPU's lazy evaluation (the default) or the plain pass (every distance of
  //     every step; CUDA has only the plain pass and ignores it);
  //   start: Tensor[N_r] float32 or None, each row's squared distance to centres chosen
  //     before this run (a selection continued from a fitted bank), >= 0 or +inf, not NaN
  //     (not checked: no value is read); None = +inf, a selection from scratch.
  //   returns the state tensors, to pass to every coreset_shard_step of the run.
  m.def("coreset_shard_state(Tensor shard, int k, bool lazy=True, Tensor? start=None) "
        "-> Tensor[]");
  // One step of the exact distributed coreset on one rank's shard of the rows.
  //   shard: Tensor[N_r, D] float32, global rows offset .. offset + N_r - 1;
  //   candidates: Tensor[R, D + 2] int32, every rank's record from the previous step
  //     (words 0-1 a packed (squared distance, global index) key, 0 = none; then the
  //     float32 bits of its row);
  //   state: from coreset_shard_state, updated in place;
  //   indices: Tensor[k] int64, indices[step] = the centre named by candidates.
  //   returns this rank's record for the next step: Tensor[D + 2] int32 (its farthest
  //     unselected row; all zero when none is left; at the last step, k - 1, the record
  //     is not used and the CPU kernel returns zeros).
  m.def("coreset_shard_step(Tensor shard, Tensor candidates, int offset, Tensor(a!)[] state, "
        "Tensor(b!) indices, int step) -> Tensor");
  // Brute-force k nearest neighbours of each query row among the bank rows.
  //   query: Tensor[Q, D] float32; bank: Tensor[M, D] float32; k in [1, M].
  //   returns (distances: Tensor[Q, k] float32, Euclidean (not squared), ascending;
  //            indices: Tensor[Q, k] int64).
  m.def("knn(Tensor query, Tensor bank, int k) -> (Tensor, Tensor)");
  // knn plus how the kernel got there (tests, debugging, benchmarks), with the variant made
  // explicit where knn picks it (pytorch3d's `version`; see check_knn_variant in common.h):
  //   gemm: "auto" | "fp32" | "bf16x3", the CUDA kernel's ranking GEMM;
  //   project: "auto" | "off" | "force", the CPU kernel's projected pre-pass;
  //   project_bound_scale: multiplies the pre-pass's lower bound (1 in use; > 1 invalid).
  //   stats is Tensor[6] int64 = (rows, rows rescored by the second pass, rows that fell
  //   back to a direct-difference scan of the whole bank (expected 0), candidates refined
  //   with direct differences, rows sent through the CPU's projected pre-pass (0 when off;
  //   always 0 on CUDA), rows that pre-pass certified).
  m.def("knn_stats(Tensor query, Tensor bank, int k, str gemm=\"auto\", str project=\"auto\", "
        "float project_bound_scale=1.0) -> (Tensor, Tensor, Tensor)");
  // The bank's side of the kernel, for a bank that answers many queries (the model's):
  // what knn and knn_stats otherwise compute from the bank on every call.
  //   returns Tensor[6]. CPU: (mean [D] float32, centred norms [M] float32, scalars [5]
  //   float64, the projected pre-pass's basis [D, r] float32, projected bank [M, r]
  //   float32 and its norms [M] float32; the last three empty when the pre-pass cannot
  //   run on this bank); see knn_bank_cpu in cpu/knn.cpp. CUDA: (mean, centred norms,
  //   scalars [5] float64 on the CPU, the ranking GEMM's operand: the centred bank split
  //   in bf16 [M, 2D] or centred [M, D] float32, two empty tensors); see knn_bank_cuda in
  //   cuda/knn.cu.
  m.def("knn_bank(Tensor bank) -> Tensor[]");
  // knn_stats (gemm "auto", project_bound_scale 1) with knn_bank's operands of this bank:
  // the same answer and statistics, without their per-call cost.
  m.def("knn_prepared(Tensor query, Tensor bank, int k, Tensor[] prepared, "
        "str project=\"auto\") -> (Tensor, Tensor, Tensor)");
}
