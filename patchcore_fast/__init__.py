"""patchcore-fast: exact PatchCore with C++/CUDA coreset and k-NN kernels."""

__version__ = "0.1.0"

from .ops import build_info, greedy_coreset, knn  # noqa: E402
from .errors import PatchCoreError  # noqa: E402
from .model import PatchCore, PatchCoreConfig, Prediction  # noqa: E402

__all__ = ["build_info", "greedy_coreset", "knn", "PatchCore", "PatchCoreConfig",
           "PatchCoreError", "Prediction", "__version__"]
