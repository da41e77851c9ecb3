"""Metrics against hand-computed cases."""

import numpy as np
import pytest

from patchcore_fast import metrics


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
    metrics.save_roc_plot(tmp_path / "roc.png", [0, 1], [0.1, 0.9], masks, masks * 1.0)
    assert (tmp_path / "roc.png").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]
