"""Model files as the tests take them apart: the metadata and tensors of a .safetensors
model, and a copy of a model as a version before calibration wrote it."""

from __future__ import annotations

from pathlib import Path


def read_model(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a model file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}


def without_calibration(model: Path, out: Path) -> tuple[dict, dict]:
    """Write ``model`` to ``out`` without its calibration (a file from before issue #21);
    returns what was written, (metadata, tensors)."""
    from safetensors.torch import save_file

    meta, tensors = read_model(model)
    del meta["calibration"]
    save_file(tensors, str(out), metadata=meta)
    return meta, tensors
