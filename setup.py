"""Build the patchcore_fast._C torch extension.

CPU kernels always build (OpenMP, -O3). CUDA kernels build when a CUDA toolkit is found
(CUDA_HOME / nvcc on PATH) or FORCE_CUDA=1, and never when PATCHCORE_FAST_NO_CUDA=1.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default: 8.0;9.0, i.e. A100 and H100).
PATCHCORE_FAST_PORTABLE=1 drops -march=native (for wheels that move between machines).
"""

import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("PATCHCORE_FAST_NO_CUDA"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


def _cuda_library_includes() -> list:
    """Headers of the CUDA math libraries that a bare toolkit may lack.

    ATen's CUDA headers include cusparse.h / cublas_v2.h; a minimal toolkit install (nvcc
    and the runtime only) does not ship them, but the NVIDIA wheels that torch depends on
    do (site-packages/nvidia/<lib or cu13>/include). Add those only when needed.
    """
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    found = []
    for site in sys.path:
        for inc in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")) or os.path.exists(
                    os.path.join(inc, "cublas_v2.h")):
                found.append(inc)
    return found


def extensions():
    cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cxx = ["-O3", "-fopenmp"]
    if not _flag("PATCHCORE_FAST_PORTABLE"):
        cxx.append("-march=native")
    libs = ["gomp"]
    use_cuda = _want_cuda()
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            "patchcore_fast._C",
            cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            include_dirs=_cuda_library_includes(),
            libraries=libs,
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "patchcore_fast._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx},
            libraries=libs,
            py_limited_api=True,
        )
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if use_cuda else ""
    print(
        f"patchcore_fast: building CPU kernels ({len(cpu_sources) - 1} source files)"
        + (f" and CUDA kernels ({len(cuda_sources)} source files; CUDA_HOME={CUDA_HOME}; "
           f"archs {archs})"
           if use_cuda else " only (no CUDA toolkit found, or PATCHCORE_FAST_NO_CUDA=1)"),
        file=sys.stderr,
    )
    return [ext]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
