"""The installed package carries its compiled kernels (CPU always, CUDA when expected)."""

import os

import torch

import patchcore_fast
from patchcore_fast import ops


def test_kernels_compiled():
    info = patchcore_fast.build_info()
    assert info["compiled"], (
        "patchcore_fast._C is missing: tests are importing a source tree without the built "
        f"extension ({patchcore_fast.__file__}); run `bash .ci/setup` then `.venv/bin/pytest`"
        f" (load error: {info['load_error']})")
    assert sorted(info["cpu"]) == sorted(ops._OPS)


def test_cuda_kernels_compiled_when_expected():
    # CI sets PATCHCORE_FAST_EXPECT_CUDA_BUILD=1: there the CUDA sources must have been
    # compiled and registered, even though this machine has no GPU to run them.
    info = patchcore_fast.build_info()
    if os.environ.get("PATCHCORE_FAST_EXPECT_CUDA_BUILD") == "1":
        assert sorted(info["cuda"]) == sorted(ops._OPS), info
    elif torch.cuda.is_available():
        assert info["cuda"], "a GPU is present but the CUDA kernels were not built"

