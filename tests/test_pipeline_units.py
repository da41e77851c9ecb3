"""Unit tests of the method's steps: features, coreset, scoring, maps."""

import math

import pytest
import torch
import torch.nn.functional as F

from patchcore_fast import coreset, features, scoring
from patchcore_fast.backbone import load_backbone


def test_channel_pool_matrix_matches_adaptive_avg_pool():
    for c_in, c_out in [(40, 1024), (112, 1024), (2048, 1024), (1536, 1024), (7, 3), (5, 5)]:
        x = torch.randn(6, c_in, dtype=torch.float64)
        want = F.adaptive_avg_pool1d(x[:, None, :], c_out)[:, 0]
        got = x @ features.channel_pool_matrix(c_in, c_out).T
        torch.testing.assert_close(got, want)


def test_reduction_matrix_is_the_official_two_stage_pooling():
    channels, pdim, tdim = (40, 112), 1024, 1024
    x = [torch.randn(10, c, dtype=torch.float64) for c in channels]
    per_layer = torch.stack([F.adaptive_avg_pool1d(t[:, None], pdim)[:, 0] for t in x], 1)
    want = F.adaptive_avg_pool1d(per_layer.reshape(10, 1, -1), tdim)[:, 0]
    got = torch.cat(x, 1) @ features.reduction_matrix(channels, pdim, tdim).T
    torch.testing.assert_close(got, want)


def test_isometric_basis_keeps_distances():
    w = features.reduction_matrix((40, 112), 1024, 1024)
    r = features.isometric_basis(w)
    assert r.shape == (152, 152)
    x, y = torch.randn(20, 152, dtype=torch.float64), torch.randn(30, 152, dtype=torch.float64)
    torch.testing.assert_close(torch.cdist(x @ r.T, y @ r.T), torch.cdist(x @ w.T, y @ w.T))


def test_aggregate_pools_and_upsamples():
    a = torch.randn(2, 4, 8, 8)
    b = torch.randn(2, 6, 4, 4)
    out = features.aggregate([a, b], patch_size=3)
    assert out.shape == (2, 10, 8, 8)
    # Interior of the first layer: the plain 3x3 mean.
    torch.testing.assert_close(out[:, :4, 3, 4], a[:, :, 2:5, 3:6].mean((-1, -2)))
    # Corner: zero padding, divided by 9 (count_include_pad).
    torch.testing.assert_close(out[:, :4, 0, 0], a[:, :, :2, :2].sum((-1, -2)) / 9)
    pooled_b = F.avg_pool2d(b, 3, 1, 1)
    torch.testing.assert_close(out[:, 4:], F.interpolate(pooled_b, (8, 8), mode="bilinear"))


@pytest.mark.parametrize("compact,dim", [(True, 152), (False, 1024)])
def test_embedder_shapes_random_lite0(compact, dim):
    bb = load_backbone("efficientnet_lite0", pretrained=False)
    assert bb.info.channels == (40, 112) and bb.info.strides == (8, 16)
    emb = features.PatchEmbedder(bb, 1024, 1024, 3, compact=compact)
    with torch.inference_mode():
        out, grid = emb(torch.randn(2, 3, 224, 224))
    assert grid == (28, 28)
    assert out.shape == (2, 784, dim)


def test_compact_embedding_same_distances_as_full_width():
    bb = load_backbone("efficientnet_lite0", pretrained=False)
    full = features.PatchEmbedder(bb, 1024, 1024, 3, compact=False)
    small = features.PatchEmbedder(bb, 1024, 1024, 3, compact=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        a, _ = full(x)
        b, _ = small(x)
    da = torch.cdist(a[0].double(), a[1].double())
    db = torch.cdist(b[0].double(), b[1].double())
    torch.testing.assert_close(db, da, rtol=1e-4, atol=1e-4)


def test_coreset_size_and_keep_all():
    assert coreset.coreset_size(1000, 0.1) == 100
    assert coreset.coreset_size(5, 0.01) == 1
    x = torch.randn(50, 16)
    assert torch.equal(coreset.select_coreset(x, 1.0), torch.arange(50))


def test_coreset_is_seeded_and_unique():
    x = torch.randn(300, 200)
    a = coreset.select_coreset(x, 0.1, 128, seed=3)
    b = coreset.select_coreset(x, 0.1, 128, seed=3)
    assert torch.equal(a, b) and a.numel() == 30 and a.unique().numel() == 30


def test_reweighting_matches_equation_7():
    torch.manual_seed(0)
    bank = torch.randn(40, 8)
    hood = scoring.bank_neighbors(bank, 5)
    assert torch.equal(hood[:, 0], torch.arange(40))  # each row is its own nearest
    patches = torch.randn(3, 12, 8) * 2
    flat_d, flat_i = scoring.nearest_bank_rows(patches.reshape(-1, 8), bank)
    d, i = flat_d.view(3, 12), flat_i.view(3, 12)
    got = scoring.image_scores(patches, d, i, bank, hood)
    for b in range(3):
        p = int(d[b].argmax())
        m_test, s_star = patches[b, p].double(), float(d[b, p])
        m_star = int(i[b, p])
        dists = [float((m_test - bank[j].double()).norm()) for j in hood[m_star].tolist()]
        want = (1 - math.exp(s_star) / sum(math.exp(v) for v in dists)) * s_star
        assert got[b].item() == pytest.approx(want, rel=1e-4)
    off = scoring.image_scores(patches, d, i, bank, None)
    torch.testing.assert_close(off, d.max(1).values)


def test_reweighting_is_stable_for_large_distances():
    m_test = torch.zeros(1, 4)
    nbrs = torch.tensor([[[1000.0, 0, 0, 0], [1001.0, 0, 0, 0], [1003.0, 0, 0, 0]]])
    w = scoring.reweighting_factor(m_test, torch.tensor([1000.0]), nbrs)
    want = 1 - 1 / (1 + math.exp(1) + math.exp(3))
    assert torch.isfinite(w).all() and w.item() == pytest.approx(want, rel=1e-5)


def test_gaussian_blur_matches_torchvision():
    from torchvision.transforms.functional import gaussian_blur

    assert scoring.blur_kernel_size(4.0) == 33
    m = torch.rand(2, 60, 50)
    want = gaussian_blur(m[:, None], [33, 33], [4.0, 4.0])[:, 0]
    torch.testing.assert_close(scoring.gaussian_blur(m, 4.0), want, rtol=1e-5, atol=1e-5)


def test_anomaly_map_shape_and_constant():
    d = torch.full((2, 28 * 28), 3.0)
    maps = scoring.anomaly_maps(d, (28, 28), (224, 224), 4.0)
    assert maps.shape == (2, 224, 224)
    torch.testing.assert_close(maps, torch.full_like(maps, 3.0))


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_batch_norms_folded_into_convolutions(name, tmp_path):
    # The frozen torchvision backbones fold each batch norm into the convolution before it
    # (backbone._fold_batch_norms): no batch norm is left, and the layer maps are the
    # unfolded network's to float32 rounding. Batch-norm statistics far from the identity,
    # so that a fold that dropped or misplaced one could not pass.
    import torchvision.models as tvm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = getattr(tvm, name)(weights=None).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.uniform_(0.3, 1.7)
            m.bias.data.normal_(0, 0.2)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    bb = load_backbone(name, ("layer2", "layer3"), str(weights))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        got = bb(x)
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        l2 = net.layer2(net.layer1(h))
        want = [l2, net.layer3(l2)]
    for g, w in zip(got, want):
        scale = w.abs().max()
        assert float((g - w).abs().max() / scale) < 1e-5
