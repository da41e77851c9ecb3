"""patchcore-fast: exact PatchCore with C++/CUDA coreset and k-NN kernels.

The public names are imported on first use (PEP 562), so ``import patchcore_fast`` (and
the console script, :mod:`patchcore_fast.cli`) starts without importing torch.
"""

from __future__ import annotations

import importlib

from ._version import __version__

# name -> module that holds it
_PUBLIC = {"build_info": "ops", "greedy_coreset": "ops", "knn": "ops",
           "PatchCoreError": "errors", "PatchCore": "model", "PatchCoreConfig": "model",
           "Prediction": "model"}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
