"""Metrics against hand-computed cases."""

import numpy as np
import pytest

from patchcore_fast import metrics, outputs


def test_pro_hand_computed():
    # One image, two regions: A = 2 pixels, B = 1 pixel; 5 normal pixels.
    mask = np.array([[[1, 1, 0, 0], [0, 0, 0, 1]]], dtype=bool)
    amap = np.array([[[0.9, 0.4, 0.5, 0.1], [0.2, 0.3, 0.05, 0.7]]])
    fpr, pro = metrics.pro_curve(mask, amap)
    # Thresholds by decreasing score: .9(A) .7(B) .5(n) .4(A) .3(n) .2(n) .1(n) .05(n)
    np.testing.assert_allclose(fpr, [0, 0, 0, .2, .2, .4, .6, .8, 1.0])
    np.testing.assert_allclose(pro, [0, .25, .75, .75, 1, 1, 1, 1, 1])
    # Up to FPR 0.3: [0, .2] at PRO .75, then .2 -> .3 at PRO 1 (vertical step at .2).
    want = (0.2 * 0.75 + 0.1 * 1.0) / 0.3
    assert metrics.pro_score(mask, amap, 0.3) == pytest.approx(want)


def test_pro_interpolates_at_max_fpr():
    mask = np.array([[[1, 0, 0]]], dtype=bool)
    amap = np.array([[[0.1, 0.5, 0.0]]])
    # Curve: (0,0) -> (.5, 0) -> (.5, 1) -> (1, 1); area to .3 is 0.
    assert metrics.pro_score(mask, amap, 0.3) == pytest.approx(0.0)
    # Perfect separation: PRO is 1 from FPR 0.
    assert metrics.pro_score(mask, np.array([[[1.0, 0.2, 0.1]]]), 0.3) == pytest.approx(1.0)


def test_pro_ties_are_not_split():
    mask = np.array([[[1, 0]]], dtype=bool)
    amap = np.array([[[0.5, 0.5]]])
    fpr, pro = metrics.pro_curve(mask, amap)
    np.testing.assert_allclose(fpr, [0, 1])
    np.testing.assert_allclose(pro, [0, 1])


def test_pro_regions_are_8_connected_and_per_image():
    mask = np.zeros((2, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True        # diagonal: one region
    mask[1, 3, 3] = True                        # another image: another region
    amap = np.zeros((2, 4, 4))
    amap[0, 0, 0] = 1.0                         # half of region 1 found first
    fpr, pro = metrics.pro_curve(mask, amap)
    assert pro[1] == pytest.approx(0.25)        # (1/2) / 2 regions


def test_f1_max():
    labels = [0, 0, 1, 1, 1]
    scores = [0.1, 0.6, 0.5, 0.7, 0.9]
    f1, thr = metrics.f1_max(labels, scores)
    # t = 0.5 gives tp 3, fp 1 -> P .75, R 1, F1 6/7; t = .7: P 1 R 2/3 F1 .8.
    assert f1 == pytest.approx(6 / 7) and thr == pytest.approx(0.5)


def test_evaluate_perfect_and_per_defect():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 8, 8), dtype=bool)
    masks[2, 2:4, 2:4] = True
    masks[3, 5:7, 1:3] = True
    maps = rng.random((4, 8, 8)) * 0.1 + masks
    r = metrics.evaluate([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], ["good", "good", "a", "b"],
                         masks, maps)
    assert r["image_auroc"] == 1.0 and r["pixel_auroc"] == 1.0
    assert r["pro"] == pytest.approx(1.0) and r["f1_max"] == 1.0
    assert set(r["per_defect"]) == {"a", "b"} and r["per_defect"]["a"]["count"] == 1
    assert r["counts"] == {"images": 4, "good": 2, "defective": 2}


def test_roc_plot(tmp_path):
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, 0, 0] = True
    hist = metrics.PixelHistogram()
    for m in masks:
        hist.add(m * 1.0, m)
    outputs.save_roc_plot(tmp_path / "roc.png", [0, 1], [0.1, 0.9], hist)
    assert (tmp_path / "roc.png").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]


# ----- PixelHistogram: pixel AUROC and PRO in bounded memory, against the exact oracle ----

def _random_set(seed=0, n=24, size=48, levels=None):
    """Maps and masks with several regions per image, some images defect-free."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 3, n):
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, size - 12, 2)
            masks[i, y:y + rng.integers(1, 12), x:x + rng.integers(1, 12)] = True
    maps = rng.normal(size=masks.shape) + masks * rng.uniform(0, 2, (n, 1, 1))
    if levels:  # many exact ties
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(np.float32)


def _hist(masks, maps, max_bins=None):
    h = metrics.PixelHistogram(max_bins)
    for m, a in zip(masks, maps):
        h.add(a, m)
    return h


@pytest.mark.parametrize("levels", [None, 8])
def test_histogram_is_exact_below_max_bins(levels):
    masks, maps = _random_set(levels=levels)
    h = _hist(masks, maps)
    assert h.exact and h.auroc_error() == 0.0 and h.pro_error() == 0.0
    assert h.auroc() == pytest.approx(metrics.pixel_auroc(masks, maps), abs=1e-12)
    assert h.pro() == pytest.approx(metrics.pro_score(masks, maps), abs=1e-12)
    for max_fpr in (0.05, 1.0):
        assert h.pro(max_fpr) == pytest.approx(metrics.pro_score(masks, maps, max_fpr),
                                               abs=1e-12)


@pytest.mark.parametrize("max_bins", [64, 1000, 20_000])
def test_histogram_coarse_bins_stay_within_their_bound(max_bins):
    masks, maps = _random_set(seed=1)
    h = _hist(masks, maps, max_bins)
    assert not h.exact and h.keys.size <= max_bins
    a_err, p_err = h.auroc_error(), h.pro_error()
    assert 0 < a_err and 0 < p_err
    assert abs(h.auroc() - metrics.pixel_auroc(masks, maps)) <= a_err + 1e-12
    assert abs(h.pro() - metrics.pro_score(masks, maps)) <= p_err + 1e-12


def test_histogram_bound_shrinks_with_more_bins():
    masks, maps = _random_set(seed=2)
    bounds = [_hist(masks, maps, b).auroc_error() for b in (100, 1000, 10_000)]
    assert bounds[0] > bounds[1] > bounds[2]


def test_histogram_negative_scores_and_signed_zero():
    masks, maps = _random_set(seed=3)
    maps = maps - 1.0                   # half the scores negative
    maps[0, :4, :4] = -0.0              # ties with +0.0
    maps[1, :4, :4] = 0.0
    h = _hist(masks, maps)
    assert h.auroc() == pytest.approx(metrics.pixel_auroc(masks, maps), abs=1e-12)
    assert h.pro() == pytest.approx(metrics.pro_score(masks, maps), abs=1e-12)


def test_histogram_combined_equals_one_histogram_in_any_order():
    masks, maps = _random_set(seed=4)
    whole = _hist(masks, maps, 5000)
    parts = [_hist(masks[i::3], maps[i::3], b) for i, b in zip(range(3), (5000, 800, 5000))]
    merged = metrics.PixelHistogram.combined(parts)
    # A part with coarser bins coarsens the rest: compare with the whole at that shift.
    assert merged.shift >= max(p.shift for p in parts)
    assert merged.auroc() == pytest.approx(metrics.pixel_auroc(masks, maps),
                                           abs=merged.auroc_error() + 1e-12)
    exact = metrics.PixelHistogram.combined([_hist(masks[i::3], maps[i::3]) for i in range(3)])
    assert exact.exact
    assert exact.auroc() == pytest.approx(metrics.pixel_auroc(masks, maps), abs=1e-12)
    assert exact.pro() == pytest.approx(metrics.pro_score(masks, maps), abs=1e-12)
    assert whole.regions == merged.regions == exact.regions


def test_histogram_quantile():
    _, maps = _random_set(seed=5)
    h = metrics.PixelHistogram()
    for a in maps:
        h.add(a)
    values = np.sort(maps.ravel())
    for q in (0.0, 0.01, 0.5, 0.999, 1.0):
        j = min(int(np.ceil(q * values.size)) - 1, values.size - 1)
        assert h.quantile(q) == values[max(j, 0)]   # an exact order statistic
    coarse = metrics.PixelHistogram(256)
    for a in maps:
        coarse.add(a)
    # A coarse bin's lower edge: within one bin width below the exact value.
    assert coarse.quantile(0.5) <= h.quantile(0.5) < coarse.quantile(0.5) + 0.1


def test_histogram_single_class_and_bad_input():
    h = metrics.PixelHistogram()
    h.add(np.ones((4, 4), np.float32))
    assert h.auroc() is None and h.pro() is None
    with pytest.raises(ValueError, match="differ in shape"):
        h.add(np.ones((4, 4)), np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="NaN"):
        h.add(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="max_bins"):
        metrics.PixelHistogram(1)


def test_evaluate_from_histograms_equals_whole_arrays():
    masks, maps = _random_set(seed=6, n=12)
    defects = ["good"] * 4 + ["a"] * 4 + ["b"] * 4
    labels = [0] * 4 + [1] * 8
    scores = maps.reshape(12, -1).max(1)
    hists = metrics.pixel_histograms(masks, maps, defects)
    r = metrics.evaluate(labels, scores, defects, pixels=hists)
    assert r["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(masks, maps), abs=1e-12)
    assert r["pro"] == pytest.approx(metrics.pro_score(masks, maps), abs=1e-12)
    assert r["pixel_binning"]["exact"] and r["pixel_binning"]["pixel_auroc_error_bound"] == 0
    sel = np.array([d in ("good", "a") for d in defects])
    assert r["per_defect"]["a"]["pixel_auroc"] == pytest.approx(
        metrics.pixel_auroc(masks[sel], maps[sel]), abs=1e-12)
    assert r["per_defect"]["a"]["pro"] == pytest.approx(
        metrics.pro_score(masks[sel], maps[sel]), abs=1e-12)
    assert metrics.evaluate(labels, scores, defects, masks, maps) == r
