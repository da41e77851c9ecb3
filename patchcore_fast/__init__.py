"""patchcore-fast: exact PatchCore with C++/CUDA coreset and k-NN kernels."""

from .ops import build_info, greedy_coreset, knn

__version__ = "0.1.0"

__all__ = ["build_info", "greedy_coreset", "knn", "__version__"]
