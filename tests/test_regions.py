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
