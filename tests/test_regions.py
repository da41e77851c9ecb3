"""Defect regions at the pixel threshold and the at-threshold metrics (issue #21)."""

import numpy as np
import pytest

from patchcore_fast.regions import (RegionCounts, check_min_area, find_regions, outline,
                                    regions_json)


def two_blobs() -> np.ndarray:
    amap = np.zeros((20, 30), dtype=np.float32)
    amap[2:5, 3:9] = 2.0      # 18 pixels
    amap[3, 4] = 2.5
    amap[10, 10] = 3.0        # one pixel
    amap[15, 20] = amap[16, 21] = 1.5  # diagonal neighbours: one region (8-connected)
    return amap


def test_regions_have_area_box_centroid_peak_mean():
    regions, mask = find_regions(two_blobs(), 1.0)
    assert [r["peak"] for r in regions] == [3.0, 2.5, 1.5]  # by decreasing peak
    single, blob, diagonal = regions
    assert single == {"area": 1, "bbox": [10, 10, 11, 11], "centroid": [10.0, 10.0],
                      "peak": 3.0, "mean": 3.0}
    assert blob["area"] == 18 and blob["bbox"] == [3, 2, 9, 5]
    assert blob["centroid"] == [5.5, 3.0]
    assert blob["mean"] == pytest.approx((17 * 2.0 + 2.5) / 18)
    assert diagonal["area"] == 2 and diagonal["bbox"] == [20, 15, 22, 17]
    assert mask.sum() == 21 and mask.dtype == bool


def test_threshold_is_strict_and_min_area_drops_speckle():
    amap = two_blobs()
    assert find_regions(amap, 3.0)[0] == []  # nothing strictly above the largest value
    regions, mask = find_regions(amap, 1.0, min_area=2)
    assert [r["area"] for r in regions] == [18, 2]
    assert not mask[10, 10] and mask[3, 4]
    regions, mask = find_regions(amap, 1.0, min_area=19)
    assert regions == [] and not mask.any()
    regions, mask = find_regions(np.zeros((5, 5)), 0.0)
    assert regions == [] and mask.shape == (5, 5)
    with pytest.raises(ValueError, match="2-D"):
        find_regions(np.zeros((2, 3, 3)), 0.0)


def _regions_one_by_one(amap, threshold, min_area):
    """Oracle: each 8-connected component's statistics from its own boolean mask."""
    from scipy import ndimage

    labels, n = ndimage.label(amap > threshold, structure=np.ones((3, 3), bool))
    regions, mask = [], np.zeros(amap.shape, bool)
    for lab in range(1, n + 1):
        ys, xs = np.nonzero(labels == lab)
        if ys.size < max(min_area, 1):
            continue
        mask[ys, xs] = True
        vals = amap[ys, xs].astype(np.float64)
        regions.append({"area": int(ys.size),
                        "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                 int(ys.max()) + 1],
                        "centroid": [xs.mean(), ys.mean()], "peak": float(vals.max()),
                        "mean": vals.mean()})
    return sorted(regions, key=lambda r: -r["peak"]), mask


@pytest.mark.parametrize("seed", range(4))
def test_regions_equal_one_by_one_on_smooth_maps(seed):
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(12, 16))
    # A smooth map at a photo's size (bilinear-like: each coarse cell repeated, then
    # averaged), with many regions of many sizes at these thresholds.
    amap = np.kron(coarse, np.ones((15, 15)))
    amap = (amap[:-2, :-2] + amap[1:-1, 2:] + amap[2:, 1:-1]) / 3
    amap = (amap + rng.normal(scale=0.05, size=amap.shape)).astype(np.float32)
    for threshold, min_area in ((0.5, 0), (1.0, 0), (1.0, 40), (2.5, 5), (9.0, 0)):
        got, mask = find_regions(amap, threshold, min_area)
        want, want_mask = _regions_one_by_one(amap, threshold, min_area)
        np.testing.assert_array_equal(mask, want_mask)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert (g["area"], g["bbox"], g["peak"]) == (w["area"], w["bbox"], w["peak"])
            assert g["centroid"] == pytest.approx(w["centroid"], rel=1e-12)
            assert g["mean"] == pytest.approx(w["mean"], rel=1e-12)


def test_regions_json_is_plain():
    out = regions_json(find_regions(two_blobs() * np.float32(1.0 / 3), 0.1)[0])
    assert out[0]["peak"] == 1.0 and isinstance(out[0]["area"], int)
    assert out[1]["mean"] == float(f"{(17 * 2.0 + 2.5) / 18 / 3:.6g}")


@pytest.mark.parametrize("value", [-1, 2.5, "x", None, float("inf")])
def test_min_area_must_be_a_count(value):
    with pytest.raises(ValueError, match="--min-region-area"):
        check_min_area(value)
    assert check_min_area("16") == 16 and check_min_area(0) == 0


def test_outline_is_the_border_inside():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 2:6] = True
    line = outline(mask)
    assert line.sum() == 12 and not line[3:5, 3:5].any() and (line <= mask).all()
    assert outline(mask, width=2).sum() == 16
    assert not outline(np.zeros((3, 3), dtype=bool)).any()


@pytest.mark.parametrize("width", [1, 3])
def test_outline_equals_the_whole_masks_erosion(width):
    from scipy import ndimage

    rng = np.random.default_rng(width)
    for _ in range(5):
        mask = np.zeros((60, 80), dtype=bool)
        for _ in range(rng.integers(1, 4)):  # blobs inside and touching the edges
            y, x = rng.integers(-5, 60), rng.integers(-5, 80)
            mask[max(y, 0):y + rng.integers(2, 20), max(x, 0):x + rng.integers(2, 20)] = True
        inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool),
                                       iterations=width, border_value=0)
        np.testing.assert_array_equal(outline(mask, width), mask & ~inner)


def test_region_counts():
    rc = RegionCounts()
    truth = np.zeros((10, 10), dtype=bool)
    truth[0:2, 0:2] = True     # region A, 4 pixels
    truth[7:9, 7:9] = True     # region B, 4 pixels (missed)
    pred = np.zeros_like(truth)
    pred[1:3, 1:3] = True      # 1 pixel on A, 3 beside it
    rc.add(True, True, pred, truth)
    rc.add(True, False, np.zeros_like(truth), np.zeros_like(truth))  # a miss
    rc.add(False, True, pred)                                         # a false reject
    rc.add(False, False, np.zeros_like(truth))
    r = rc.result()
    assert r["false_reject_rate"] == 0.5 and r["miss_rate"] == 0.5
    assert r["pixel_precision"] == 0.25 and r["pixel_recall"] == 1 / 8
    assert r["pixel_iou"] == 1 / (4 + 8 - 1)
    assert r["region_hit_rate"] == 0.5 and r["good_with_regions"] == 0.5
    other = RegionCounts()
    other.merge(rc)
    assert other.result() == r
    assert RegionCounts().result()["pixel_iou"] is None
    with pytest.raises(ValueError, match="shape"):
        rc.add(True, True, pred, truth[:5])
