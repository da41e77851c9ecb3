"""Defect regions: connected parts of an anomaly map above the model's pixel threshold.

A line's reject rule is "a defect larger than N pixels" or "any defect in this zone"; a
heatmap does not answer it, regions do. The map (at the photo's size) is cut at the pixel
threshold (strictly above, as the image label), its 8-connected components are the
regions, and components smaller than ``min_area`` pixels (speckle) are dropped. The default
minimum area is chosen by measurement (bench/RESULTS.md, "Calibration from good images").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: ``--min-region-area``'s default, in pixels of the photo (bench/RESULTS.md,
#: "Calibration from good images").
DEFAULT_MIN_REGION_AREA = 0

# 8-connectivity: pixels touching by a corner belong to one region (a thin diagonal
# scratch stays one region).
_EIGHT = np.ones((3, 3), dtype=bool)


def check_min_area(value, option: str = "--min-region-area") -> int:
    """``value`` as a non-negative int, or ValueError naming ``option``."""
    try:
        area = int(value)
        if area != float(value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{option} should be a whole number of pixels >= 0, "
                         f"got {value!r}") from None
    if area < 0:
        raise ValueError(f"{option} should be >= 0 pixels, got {area}")
    return area


def find_regions(amap: np.ndarray, threshold: float, min_area: int = 0
                 ) -> tuple[list[dict], np.ndarray]:
    """The defect regions of one map.

    Args:
        amap (float array[H, W]): anomaly map at the photo's size.
        threshold: pixel threshold; a pixel is defective when its value is above it.
        min_area: regions of fewer pixels are dropped.

    Returns:
        (regions, mask): regions by decreasing peak, each a dict with ``area`` (pixels),
        ``bbox`` [x0, y0, x1, y1] (x1, y1 exclusive: the box's right and bottom edges, as
        slicing and PIL boxes), ``centroid`` [x, y] (mean pixel position, pixel centres at
        integers), ``peak`` and ``mean`` (map values); and the bool array[H, W] of the
        pixels of the kept regions.
    """
    from scipy import ndimage

    amap = np.asarray(amap)
    if amap.ndim != 2:
        raise ValueError(f"amap should be a 2-D map, got shape {amap.shape}")
    above = amap > threshold
    labels, n = ndimage.label(above, structure=_EIGHT)
    if n == 0:
        return [], above
    # The statistics run over the pixels above the threshold only (a few percent of a
    # defective photo's map, none of most good ones'), in flat order: each region's sums
    # add its pixels in the same order as over the whole map.
    h, w = amap.shape
    where = np.flatnonzero(above)
    lab = labels.ravel()[where]
    area = np.bincount(lab, minlength=n + 1)
    keep = np.flatnonzero(area[1:] >= max(int(min_area), 1)) + 1
    if keep.size == 0:
        return [], np.zeros_like(above)
    ys, xs = np.divmod(where, w)
    values = amap.ravel()[where].astype(np.float64)
    sum_x = np.bincount(lab, weights=xs, minlength=n + 1)
    sum_y = np.bincount(lab, weights=ys, minlength=n + 1)
    total = np.bincount(lab, weights=values, minlength=n + 1)
    peak = np.full(n + 1, -np.inf)
    np.maximum.at(peak, lab, values)
    boxes = ndimage.find_objects(labels)
    regions = []
    for lab in keep:
        sy, sx = boxes[lab - 1]
        a = int(area[lab])
        regions.append({"area": a, "bbox": [int(sx.start), int(sy.start), int(sx.stop),
                                            int(sy.stop)],
                        "centroid": [float(sum_x[lab] / a), float(sum_y[lab] / a)],
                        "peak": float(peak[lab]), "mean": float(total[lab] / a)})
    regions.sort(key=lambda r: -r["peak"])
    if keep.size == n:
        return regions, above
    kept = np.zeros(n + 1, dtype=bool)
    kept[keep] = True
    return regions, kept[labels]


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The border pixels of a mask's regions (inside the regions, ``width`` pixels thick).

    Args:
        mask (bool array[H, W]): region pixels.
        width: thickness of the outline in pixels.

    Returns:
        bool array[H, W].
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    line = np.zeros_like(mask)
    if rows.size == 0:
        return line
    # Eroded within the regions' bounding box only: outside it the mask is all False,
    # as the erosion's border value, so the box's erosion is the whole mask's.
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    inner = ndimage.binary_erosion(mask[box], structure=_EIGHT, iterations=int(width),
                                   border_value=0)
    line[box] = mask[box] & ~inner
    return line


class RegionCounts:
    """Verdict metrics at fixed thresholds, accumulated image by image (bounded memory).

    Image level: false rejects among good images, misses among defective ones. Pixel level,
    over the defective images that have a ground-truth mask: true / false positive and
    false negative pixels (precision, recall, IoU of all their pixels together), and the
    ground-truth regions (8-connected) that at least one predicted pixel touches.
    """

    def __init__(self) -> None:
        self.good = self.false_rejects = 0
        self.defective = self.misses = 0
        self.tp = self.fp = self.fn = 0
        self.gt_regions = self.gt_hit = 0
        self.good_with_regions = 0

    def add(self, is_defective: bool, predicted_defective: bool,
            predicted_mask: np.ndarray | None = None, truth: np.ndarray | None = None) -> None:
        """Count one image.

        Args:
            is_defective: its ground-truth label.
            predicted_defective: its label at the image threshold.
            predicted_mask (bool array[H, W] | None): its region pixels.
            truth (bool array[H, W] | None): its ground-truth mask (defective images).
        """
        from scipy import ndimage

        if not is_defective:
            self.good += 1
            self.false_rejects += bool(predicted_defective)
            if predicted_mask is not None:
                self.good_with_regions += bool(np.any(predicted_mask))
            return
        self.defective += 1
        self.misses += not predicted_defective
        if predicted_mask is None or truth is None:
            return
        pred, truth = np.asarray(predicted_mask, bool), np.asarray(truth, bool)
        if pred.shape != truth.shape:
            raise ValueError(f"predicted mask {pred.shape} and ground truth {truth.shape} "
                             f"differ in shape")
        tp = int(np.count_nonzero(pred & truth))
        self.tp += tp
        self.fp += int(np.count_nonzero(pred)) - tp
        self.fn += int(np.count_nonzero(truth)) - tp
        labels, n = ndimage.label(truth, structure=_EIGHT)
        self.gt_regions += n
        if n:
            self.gt_hit += int(np.unique(labels[pred & truth]).size)

    def merge(self, other: "RegionCounts") -> None:
        """Add another accumulator's counts (e.g. another rank's)."""
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)

    def result(self) -> dict:
        """The rates (None where the denominator is 0) and the counts behind them."""

        def ratio(a: int, b: int) -> float | None:
            return a / b if b else None

        return {"false_reject_rate": ratio(self.false_rejects, self.good),
                "miss_rate": ratio(self.misses, self.defective),
                "pixel_precision": ratio(self.tp, self.tp + self.fp),
                "pixel_recall": ratio(self.tp, self.tp + self.fn),
                "pixel_iou": ratio(self.tp, self.tp + self.fp + self.fn),
                "region_hit_rate": ratio(self.gt_hit, self.gt_regions),
                "good_with_regions": ratio(self.good_with_regions, self.good),
                "counts": {k: int(v) for k, v in vars(self).items()}}


def regions_json(regions: Sequence[dict]) -> list[dict]:
    """Regions with their floats rounded for files (6 significant digits)."""
    def r6(v: float) -> float:
        return float(f"{v:.6g}")

    return [{"area": r["area"], "bbox": list(r["bbox"]),
             "centroid": [r6(c) for c in r["centroid"]], "peak": r6(r["peak"]),
             "mean": r6(r["mean"])} for r in regions]


__all__ = ["DEFAULT_MIN_REGION_AREA", "RegionCounts", "check_min_area", "find_regions",
           "outline", "regions_json"]
