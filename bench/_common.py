"""Shared helpers of the benchmarks: what machine and versions ran them, and real data.

Benchmarks print what they measured with the machine and versions beside it; figures in
bench/RESULTS.md are copied from such runs, never typed in.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch

import patchcore_fast

CACHE = Path(__file__).resolve().parent / ".cache"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Machine, device and library versions, for the header of every benchmark run."""
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "patchcore_fast": patchcore_fast.__version__,
        "build": patchcore_fast.build_info(),
        "faiss-cpu": _version("faiss-cpu"),
        "anomalib": _version("anomalib"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def describe() -> str:
    i = machine_info()
    b = i["build"]
    gpu = f"{i['gpu']} (CUDA {i['cuda']})" if "gpu" in i else "none"
    return (f"machine: {i['cpu']}, {i['cores']} cores ({i['torch_threads']} torch threads); "
            f"GPU: {gpu}\nversions: python {i['python']}, torch {i['torch']}, patchcore-fast "
            f"{i['patchcore_fast']} (kernels cpu={b['cpu']} cuda={b['cuda']}), faiss-cpu "
            f"{i['faiss-cpu']}, anomalib {i['anomalib']}")


def mvtec_root() -> Path:
    """The MVTec AD root: $PATCHCORE_FAST_DATA, else ../shared/data/mvtec beside the repo."""
    env = os.environ.get("PATCHCORE_FAST_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec"


def bottle_projected(dim: int = 128) -> torch.Tensor:
    """Real PatchCore features: EfficientNet-Lite0 patch embeddings of MVTec AD bottle's
    209 good training images (163,856 x 152), projected to ``dim`` as the pipeline does.

    Computed once (about a minute on 2 cores) and cached in bench/.cache (gitignored).

    Returns:
        Tensor[163856, dim] float32.
    """
    from patchcore_fast.coreset import gaussian_projection
    from patchcore_fast.model import PatchCore, PatchCoreConfig

    path = CACHE / f"bottle_lite0_proj{dim}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    folder = mvtec_root() / "bottle" / "train" / "good"
    if not folder.is_dir():
        import pytest

        pytest.skip(f"MVTec AD bottle not found at {folder} (set PATCHCORE_FAST_DATA)")
    model = PatchCore(PatchCoreConfig(backbone="efficientnet_lite0", device="cpu"))
    patches = torch.cat([p.reshape(-1, p.shape[-1]) for _, p in model.embed_batches(folder)])
    proj = gaussian_projection(patches.shape[1], dim, torch.Generator().manual_seed(0))
    out = (patches @ proj).contiguous()
    CACHE.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out


def _cached(name: str, make) -> torch.Tensor:
    """``make()`` once, then from bench/.cache/<name>.pt (written atomically)."""
    path = CACHE / f"{name}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    out = make().contiguous()
    CACHE.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out


def _embed(folders, **config) -> torch.Tensor:
    from patchcore_fast.model import PatchCore, PatchCoreConfig

    model = PatchCore(PatchCoreConfig(device="cpu", **config))
    return torch.cat([p.reshape(-1, p.shape[-1]) for _, p in model.embed_batches(folders)])


def random_backbone_features(backbone: str, n_images: int, seed: int = 0) -> torch.Tensor:
    """Patch embeddings (width 1,024, 784 per image at 224 px) of ``n_images`` generated
    images (:mod:`patchcore_fast.demo`) through ``backbone`` with random weights: the
    workload of issue #11, whose large norms and many near-ties a Gaussian benchmark hides.

    Cached in bench/.cache (gitignored).

    Returns:
        Tensor[n_images * 784, 1024] float32.
    """
    def make():
        import tempfile

        from patchcore_fast.demo import write_demo_data

        with tempfile.TemporaryDirectory() as tmp:
            write_demo_data(tmp, seed=seed, n_train=n_images, n_test_good=0, n_test_defect=0)
            return _embed(Path(tmp) / "widget" / "train" / "good", backbone=backbone,
                          pretrained=False, seed=seed)

    return _cached(f"{backbone}_random_{n_images}img_seed{seed}", make)


def bottle_features(split: str = "train/good") -> torch.Tensor:
    """EfficientNet-Lite0 patch embeddings (full width) of MVTec AD bottle images in
    ``split`` (``train/good``: 209 images, 163,856 x 152; ``test``: its defect and good
    folders in name order, 83 images). Cached in bench/.cache.

    Returns:
        Tensor[images * 784, 152] float32.
    """
    folder = mvtec_root() / "bottle" / split
    if not folder.is_dir():
        import pytest

        pytest.skip(f"MVTec AD bottle not found at {folder} (set PATCHCORE_FAST_DATA)")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    return _cached(f"bottle_lite0_{split.replace('/', '_')}",
                   lambda: _embed([str(p) for p in subdirs or [folder]],
                                  backbone="efficientnet_lite0"))
