"""patchcore-fast: exact PatchCore with C++/CUDA coreset and k-NN kernels.

Importing the package loads the compiled kernels, so ``torch.ops.patchcore_fast.*`` exist
once ``import patchcore_fast`` has run.
"""

from ._version import __version__
from .ops import build_info, greedy_coreset, knn
from .errors import PatchCoreError
from .config import PatchCoreConfig
from .model import PatchCore, Prediction

__all__ = ["build_info", "greedy_coreset", "knn", "PatchCore", "PatchCoreConfig",
           "PatchCoreError", "Prediction", "__version__"]
