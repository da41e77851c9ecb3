"""Fixtures of the pipeline tests (data locations only)."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    """The MVTec AD root (holding ``bottle/``): $PATCHCORE_FAST_DATA or ../shared/data/mvtec."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec"
    root = Path(os.environ.get("PATCHCORE_FAST_DATA", default))
    if not (root / "bottle" / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle not found under {root} (set PATCHCORE_FAST_DATA to the "
                    f"MVTec AD root that contains bottle/)")
    return root
