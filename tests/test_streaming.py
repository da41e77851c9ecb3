"""Streaming fit: the same coreset and bank as the in-memory path, in bounded memory."""

import os

import pytest
import torch

from patchcore_fast import PatchCore, PatchCoreConfig, coreset
from patchcore_fast.coreset import (StreamingCoreset, coreset_start_and_projection,
                                    select_coreset)

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]


@pytest.mark.parametrize("n", [1, 2, 163_856, 784_000, 7_840_000, coreset.START_DRAW_LIMIT - 1])
def test_projection_does_not_depend_on_n(n):
    # The streaming fit draws the projection before it knows N.
    _, ref = coreset_start_and_projection(None, 300, 128, seed=7)
    start, got = coreset_start_and_projection(n, 300, 128, seed=7)
    assert torch.equal(ref, got) and 0 <= start < n


def test_projection_matches_select_coreset_draw():
    # select_coreset's old inline draw: start first, then the projection, same generator.
    g = torch.Generator().manual_seed(3)
    start = int(torch.randint(5000, (1,), generator=g))
    proj = coreset.gaussian_projection(200, 128, g)
    got_start, got_proj = coreset_start_and_projection(5000, 200, 128, 3)
    assert got_start == start and torch.equal(got_proj, proj)


def _stream(x, batches, ratio, proj_dim=128, seed=0, expected=None):
    with StreamingCoreset(ratio, proj_dim, seed, expected_rows=expected) as sc:
        lo = 0
        for b in batches:
            sc.add(x[lo:lo + b])
            lo += b
        assert lo == len(x)
        bank, idx = sc.bank()
    return bank, idx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [200, 64])          # with and without the projection
@pytest.mark.parametrize("expected", [None, 5000, 10])  # preallocated, none, too small
def test_streaming_equals_in_memory(monkeypatch, dim, expected, device):
    # Small projection blocks so that batches straddle block boundaries.
    monkeypatch.setattr(coreset, "PROJECTION_CHUNK", 333)
    x = torch.randn(2500, dim, generator=torch.Generator().manual_seed(1)).to(device)
    batches = [100, 1, 333, 700, 7, 1000, 359]
    idx_ref = select_coreset(x, 0.05, 128, seed=4)
    bank, idx = _stream(x, batches, 0.05, 128, 4, expected)
    assert torch.equal(idx, idx_ref)
    assert torch.equal(bank, x[idx_ref])


def test_streaming_ratio_one_and_single_row():
    x = torch.randn(50, 160)
    bank, idx = _stream(x, [20, 30], 1.0)
    assert torch.equal(idx, torch.arange(50)) and torch.equal(bank, x)
    bank, idx = _stream(x[:1], [1], 0.01)
    assert torch.equal(bank, x[:1])


def test_gather_any_order_with_repeats():
    x = torch.randn(1000, 130)
    with StreamingCoreset(0.1) as sc:
        sc.add(x[:400])
        sc.add(x[400:])
        idx = torch.tensor([999, 0, 5, 6, 7, 5, 500, 0])
        assert torch.equal(sc.gather(idx), x[idx])
        with pytest.raises(IndexError):
            sc.gather(torch.tensor([1000]))


def test_temp_file_is_removed(tmp_path):
    with StreamingCoreset(0.5, temp_dir=tmp_path) as sc:
        sc.add(torch.randn(10, 140))
        # Anonymous (unlinked at creation): nothing to clean up even after a kill.
        assert list(tmp_path.iterdir()) == []
        assert os.fstat(sc._spool._file.fileno()).st_size == 10 * 140 * 4
    assert sc._spool._file is None


def _bottle_cfg(**kw):
    return PatchCoreConfig(**{"backbone": "efficientnet_lite0", "coreset_ratio": 0.01,
                              "device": "cpu", **kw})


@pytest.mark.slow
def test_bottle_streaming_bank_identical_to_in_memory(mvtec_root):
    # 209 images x 784 patches = 163,856 rows: 20 projection blocks of 8,192 and 16 rows.
    train = mvtec_root / "bottle" / "train" / "good"
    ref = PatchCore(_bottle_cfg()).fit(train, streaming=False)
    got = PatchCore(_bottle_cfg()).fit(train, streaming=True)
    assert got.fit_stats["patches"] == ref.fit_stats["patches"] == 209 * 784
    assert got.bank.dtype == ref.bank.dtype == torch.float32
    assert got.bank.shape == ref.bank.shape
    assert got.bank.numpy().tobytes() == ref.bank.numpy().tobytes()
    assert torch.equal(got.neighbors, ref.neighbors)


@pytest.mark.slow
def test_bottle_fit_twice_byte_identical(mvtec_root, tmp_path):
    from safetensors import safe_open

    files = sorted((mvtec_root / "bottle" / "train" / "good").glob("*.png"))[:24]
    out = []
    for i in range(2):
        model = PatchCore(_bottle_cfg(seed=5, coreset_ratio=0.05)).fit(files)
        model.save(tmp_path / f"{i}.safetensors")
        with safe_open(str(tmp_path / f"{i}.safetensors"), "pt") as fh:
            out.append({k: fh.get_tensor(k).numpy().tobytes() for k in fh.keys()})
    assert out[0].keys() == out[1].keys() and "bank" in out[0]
    for k in out[0]:
        assert out[0][k] == out[1][k], k


def test_select_again_at_other_ratios():
    # The study selects at several ratios on one set of projections.
    x = torch.randn(3000, 200, generator=torch.Generator().manual_seed(2))
    with StreamingCoreset(0.01, 128, seed=3) as sc:
        sc.add(x[:1234])
        sc.add(x[1234:])
        for ratio in (0.2, 0.01, 0.05):
            idx = sc.select(ratio, keep_projections=True)
            assert torch.equal(idx, select_coreset(x, ratio, 128, seed=3))
            assert torch.equal(sc.gather(idx), x[idx])
        sc.select()
        with pytest.raises(RuntimeError, match="keep_projections"):
            sc.select(0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_fit_each_ratio_gives_the_banks_of_fit(tmp_path, device):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(3):
        img = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    cfg = PatchCoreConfig(backbone="resnet18", pretrained=False, image_size=64, crop=64,
                          device=device, pretrain_embed_dim=256, target_embed_dim=256)
    model = PatchCore(cfg)
    banks = {r: model.bank.cpu() for r in model.fit_each_ratio(tmp_path, [0.5, 0.02, 0.2])}
    assert list(banks) == [0.5, 0.02, 0.2]
    for ratio, bank in banks.items():
        for streaming_fit in (True, False):
            ref = PatchCore(cfg, coreset_ratio=ratio).fit(tmp_path, streaming=streaming_fit)
            assert ref.bank.cpu().numpy().tobytes() == bank.numpy().tobytes(), ratio
