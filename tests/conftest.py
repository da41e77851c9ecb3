"""Fixtures of the pipeline tests: data locations and a small fitted demo model."""

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    """The MVTec AD root (holding ``bottle/``): $PATCHCORE_FAST_DATA or ../shared/data/mvtec."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec"
    root = Path(os.environ.get("PATCHCORE_FAST_DATA", default))
    if not (root / "bottle" / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle not found under {root} (set PATCHCORE_FAST_DATA to the "
                    f"MVTec AD root that contains bottle/)")
    return root


@pytest.fixture
def two_threads():
    """At least 2 intra-op threads, so that parallel regions run chunks on a worker thread
    (OpenMP makes the team whatever the host's core count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fit_demo(tmp_path_factory):
    """Factory: a seeded synthetic data set (category ``widget``) and a model fitted on it
    through the CLI (efficientnet_lite0, 64 px, CPU).

    Call ``fit_demo(name, seed=..., n_train=..., n_test_good=..., n_test_defect=...,
    ratio=0.25)``; it returns (data root, model file).
    """
    from patchcore_fast.cli import main
    from patchcore_fast.demo import write_demo_data

    def make(name: str, ratio: float = 0.25, **demo) -> tuple[Path, Path]:
        root = tmp_path_factory.mktemp(name)
        write_demo_data(root, **demo)
        model = root / "m.safetensors"
        assert main(["fit", str(root), "--category", "widget", "-o", str(model),
                     "--backbone", "efficientnet_lite0", "--coreset-ratio", str(ratio),
                     "--image-size", "64", "--crop", "64", "--device", "cpu",
                     "--quiet"]) == 0
        return root, model

    return make
