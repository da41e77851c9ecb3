"""Adding good images to a fitted model against refitting it (issue #21, ``fit --update``).

Workload: bottle (10 %, default geometry, calibration on, CPU), with EfficientNet-Lite0
(``lite0``) and WideResNet-50 (``wrn50``, the users' default backbone; random weights,
the time does not depend on them). A base model is fitted on train/good (209 images; not
timed). Then, side by
side in one run, each as the command a user types (process start, model load and save
included: what the user waits for):

    refit:  ``fit FOLDER -o refit.safetensors``, FOLDER holding train/good and the 20 new
            images (229 images, from scratch)
    update: ``fit --update base.safetensors 20 new images -o updated.safetensors``

The same two operations are also timed through the Python API in this process
(``test_update_against_refit_in_process``, groups ``...-in-process``), its imports done
and each backbone built once before timing: what a notebook, the service or a line's
controller that keeps Python running pays for them, without the command's start-up
(importing torch, timm and torchvision: about 3 s here, the same for both commands).
Each timed call builds its backbone, reads its images and saves its model file; the
update also loads the base model file.

The 20 new images are the first 20 of test/good. The updated model's bank must start with
the base model's bank, row for row (the benchmark asserts it). The commands' own times
(fit_seconds of the refit, updates[-1].seconds of the update) are printed beside the wall
clock.

Run:  python -m pytest bench/bench_update.py --benchmark-only -s
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common
import pytest
import torch
from safetensors import safe_open

NEW_IMAGES = 20
COMMON = ["--coreset-ratio", "0.1", "--device", "cpu", "--quiet"]
# EfficientNet-Lite0 (ImageNet weights, the offline default of the demo) and WideResNet-50
# (the users' default; random weights here: the time does not depend on them).
BACKBONES = {"lite0": ["--backbone", "efficientnet_lite0"],
             "wrn50": ["--backbone", "wide_resnet50_2", "--pretrained", "false"]}


def _cli(*argv: str) -> float:
    """Run ``patchcore-fast argv`` (this interpreter, this package); its wall time."""
    import patchcore_fast

    env = {**os.environ, "PYTHONPATH": str(Path(patchcore_fast.__file__).resolve().parents[1])}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "patchcore_fast.cli", *argv], check=True, env=env,
                   cwd=Path(os.environ.get("TMPDIR", "/tmp")))
    return time.perf_counter() - t0


def _stats(model: Path) -> dict:
    with safe_open(str(model), "pt") as f:
        return json.loads(f.metadata()["fit_stats"])


def _bank(model: Path) -> torch.Tensor:
    with safe_open(str(model), "pt") as f:
        return f.get_tensor("bank")


@pytest.fixture(scope="module")
def bottle(tmp_path_factory):
    root = _common.mvtec_root() / "bottle"
    new = sorted((root / "test" / "good").glob("*.png"))[:NEW_IMAGES]
    work = tmp_path_factory.mktemp("update")
    # fit takes one folder: the refit's 229 images, copied together (outside the repository).
    together = work / "train-and-new"
    together.mkdir()
    for p in [*sorted((root / "train" / "good").glob("*.png")), *new]:
        shutil.copyfile(p, together / f"{p.parent.parent.name}-{p.name}")
    return root, [str(p) for p in new], together, work


_BASES: dict = {}


def _base(bottle, backbone: str) -> Path:
    """The model fitted on train/good with ``backbone`` (once; not timed)."""
    root, _, _, work = bottle
    if backbone not in _BASES:
        _BASES[backbone] = work / f"base-{backbone}.safetensors"
        _cli("fit", str(root / "train" / "good"), "-o", str(_BASES[backbone]),
             *BACKBONES[backbone], *COMMON)
    return _BASES[backbone]


@pytest.mark.parametrize("how", ["refit", "update"])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_update_against_refit(benchmark, bottle, backbone, how):
    root, new, together, work = bottle
    base = _base(bottle, backbone)
    benchmark.group = f"bottle-update-{NEW_IMAGES}-images-{backbone}"
    out = work / f"{how}-{backbone}.safetensors"
    if how == "refit":
        argv = ["fit", str(together), "-o", str(out), *BACKBONES[backbone], *COMMON]
    else:
        argv = ["fit", "--update", str(base), *new, "-o", str(out), "--device", "cpu",
                "--quiet"]
    wall = benchmark.pedantic(_cli, args=argv, rounds=1, iterations=1)
    stats = _stats(out)
    own = stats["fit_seconds"] if how == "refit" else stats["updates"][-1]["seconds"]
    parts = {k: round(stats[k], 2) for k in ("feature_seconds", "calibration_seconds",
                                             "coreset_seconds") if how == "refit"}
    benchmark.extra_info.update(own_seconds=own, load=os.getloadavg()[0], **parts)
    print(f"\n{how}: wall {wall:.1f} s, the command's own time {own:.1f} s {parts}, "
          f"load {os.getloadavg()[0]:.1f}")
    if how == "update":
        old, updated = _bank(base), _bank(out)
        assert torch.equal(updated[:len(old)], old), "the update did not keep the old bank"
        print(f"update: {len(old):,} rows kept, {len(updated) - len(old):,} added")


# The same settings as the commands above, as PatchCore keywords.
API_BACKBONES = {"lite0": dict(backbone="efficientnet_lite0"),
                 "wrn50": dict(backbone="wide_resnet50_2", pretrained=False)}


def _api_refit(together: Path, out: Path, backbone: str) -> None:
    from patchcore_fast import PatchCore

    PatchCore(coreset_ratio=0.1, device="cpu", **API_BACKBONES[backbone]).fit(
        str(together)).save(out)


def _api_update(base: Path, new: list[str], out: Path) -> None:
    from patchcore_fast import PatchCore

    PatchCore.load(base, device="cpu").update(new).save(out)


@pytest.mark.parametrize("how", ["refit", "update"])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_update_against_refit_in_process(benchmark, bottle, backbone, how):
    from patchcore_fast.backbone import load_backbone

    root, new, together, work = bottle
    base = _base(bottle, backbone)
    cfg = API_BACKBONES[backbone]
    load_backbone(cfg["backbone"], pretrained=cfg.get("pretrained", True))  # imports, once
    benchmark.group = f"bottle-update-{NEW_IMAGES}-images-{backbone}-in-process"
    out = work / f"api-{how}-{backbone}.safetensors"
    if how == "refit":
        benchmark.pedantic(_api_refit, args=(together, out, backbone), rounds=1,
                           iterations=1)
    else:
        benchmark.pedantic(_api_update, args=(base, new, out), rounds=1, iterations=1)
    seconds = benchmark.stats.stats.max
    benchmark.extra_info.update(load=os.getloadavg()[0])
    print(f"\n{how} (in process): {seconds:.1f} s, load {os.getloadavg()[0]:.1f}")
    if how == "update":
        old, updated = _bank(base), _bank(out)
        assert torch.equal(updated[:len(old)], old), "the update did not keep the old bank"

