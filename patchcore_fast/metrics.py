"""Step 11: the metrics of the paper and the MVTec AD benchmark.

* image AUROC: area under the ROC of image scores (defective = positive);
* pixel AUROC: the same over every test pixel at crop resolution;
* PRO: the per-region overlap curve (mean over ground-truth connected components of the
  fraction of the component above the threshold) against the false-positive rate on
  normal pixels, integrated up to FPR 0.3 and divided by 0.3, so 1 is perfect;
* F1-max: the best F1 over all image-score thresholds, and that threshold.

Pixel AUROC and PRO rank every test pixel (50,176 per 224 x 224 image: 50 million for 1,000
test images). :func:`pixel_auroc` and :func:`pro_score` sort them all at once and are the
exact oracle; :class:`PixelHistogram` gives the same numbers from per-score-bin counts in
bounded memory, image by image, and says how far from the exact value they can be.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# scikit-learn and scipy are imported by the functions that use them: importing
# sklearn.metrics costs about 1.2 s (it loads scipy.stats), paid by every command's
# start-up (fit, score, serve) when imported here, though only the evaluation's metrics
# need it.


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if labels.size == 0 or labels.min() == labels.max():
        return None  # one class only: undefined
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def image_roc_curve(labels: Sequence[int], scores: Sequence[float]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the image scores, one point per distinct score (both classes needed)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels), scores)
    return fpr, tpr


def image_auroc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Image-level AUROC, or None if only one class is present."""
    return _auroc(np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    """Pixel-level AUROC over all pixels of all images.

    Args:
        masks (bool array[N, H, W]): ground truth.
        maps (float array[N, H, W]): anomaly maps.

    Returns:
        AUROC, or None if the pixels hold one class only.
    """
    return _auroc(np.asarray(masks).ravel().astype(np.int64), np.asarray(maps).ravel())


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The full PRO curve in one sort.

    Lowering the threshold t past a pixel's score adds ``1 / n_normal`` to the FPR if the
    pixel is normal, or ``1 / (R |r|)`` to the PRO if it belongs to region r (R regions in
    all, regions are 8-connected components of the masks). So after sorting all pixels by
    decreasing score both curves are cumulative sums, read at the end of each run of equal
    scores (a threshold cannot split ties).

    Args:
        masks (bool array[N, H, W]): ground truth.
        maps (float array[N, H, W]): anomaly maps.

    Returns:
        (fpr, pro): arrays starting at (0, 0), non-decreasing, ending at (1, 1).
    """
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    weights_pro = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for i in range(masks.shape[0]):
        weights_pro[i], n = region_weights(masks[i])
        n_regions += n
    n_normal = int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        raise ValueError("PRO needs at least one defect region and one normal pixel")
    order = np.argsort(-maps.ravel(), kind="stable")
    s = maps.ravel()[order]
    fpr = np.cumsum((~masks).ravel()[order]) / n_normal
    pro = np.cumsum(weights_pro.ravel()[order]) / n_regions
    last_of_run = np.r_[s[1:] != s[:-1], True]
    return np.r_[0.0, fpr[last_of_run]], np.r_[0.0, pro[last_of_run]]


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Each defect pixel's share of its region: ``1 / |r|`` (0 on normal pixels).

    Regions are the 8-connected components of one image's mask; summing the weights of
    the pixels above a threshold gives the sum over regions of their overlap.

    Args:
        mask (bool array[H, W]): one image's ground truth.

    Returns:
        (float64 array[H, W] weights, number of regions).
    """
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    if n == 0:
        return np.zeros(mask.shape, dtype=np.float64), 0
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    w = np.zeros(n + 1)
    w[1:] = 1.0 / counts[1:]
    return w[labels], int(n)


def _pro_area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoidal area under (fpr, pro) up to ``max_fpr`` (interpolated there), / max_fpr."""
    # fpr is non-decreasing; keep the points up to max_fpr and close the area there.
    end = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:end], pro[:end]
    if end < fpr.size and x[-1] < max_fpr:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        x, y = np.r_[x, max_fpr], np.r_[y, y_end]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return area / max_fpr


def pro_score(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float | None:
    """Area under the PRO curve up to ``max_fpr``, divided by ``max_fpr``.

    The curve is integrated with the trapezoidal rule; its value at ``max_fpr`` is
    interpolated linearly between the two thresholds around it.

    Args:
        masks (bool array[N, H, W]): ground truth.
        maps (float array[N, H, W]): anomaly maps.
        max_fpr: upper integration limit (0.3 in the MVTec AD benchmark).

    Returns:
        Normalised area in [0, 1], or None without defect regions or normal pixels.
    """
    try:
        fpr, pro = pro_curve(masks, maps)
    except ValueError:
        return None
    return _pro_area(fpr, pro, max_fpr)


#: Score bins a :class:`PixelHistogram` keeps at most (32 bytes each: 32 MB).
MAX_BINS = 1 << 20


def _sortable(x: np.ndarray) -> np.ndarray:
    """float32 scores -> int64 keys in the same order (equal scores, equal keys).

    An IEEE float's bits, read as a signed integer, are ordered like the floats when the
    sign bit is clear; for negative floats the other 31 bits count the wrong way, so they
    are flipped. Adding +0.0 first turns -0.0 into +0.0 (they compare equal).
    """
    i = (np.asarray(x, dtype=np.float32) + np.float32(0.0)).view(np.int32).astype(np.int64)
    return np.where(i < 0, i ^ 0x7FFFFFFF, i)


def _unsortable(k: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_sortable`: int64 keys -> float32 values."""
    k = np.asarray(k, dtype=np.int64)
    return np.where(k < 0, k ^ 0x7FFFFFFF, k).astype(np.int32).view(np.float32)


class PixelHistogram:
    """Pixel ROC and PRO curves from per-score counts, in bounded memory.

    Both curves only need, per distinct score s, how many normal pixels, how many defect
    pixels and how much region weight (:func:`region_weights`) score exactly s: lowering
    the threshold past s moves FPR, TPR and PRO by those amounts. The histogram keeps these
    sums per float32 score (images are added one at a time and merged into it), so while
    it has at most ``max_bins`` distinct scores its AUROC and PRO equal the exact ones (up
    to the rounding of sums). Past that, it drops the lowest bit of every score key (bins
    of 2, 4, ... adjacent float32 values: a relative width of 2**(shift - 23)), summing
    bins that meet, until it fits again. Within a bin the ranking of pixels is lost; the
    binned curve takes its chord there, and the largest possible error follows from the
    counts (:meth:`auroc_error`, :meth:`pro_error`), so a result is never silently off.

    Args:
        max_bins: most bins kept (default :data:`MAX_BINS`; memory: 32 bytes a bin, plus
            33 bytes per pixel of at most ``max_bins`` pixels waiting to be merged).

    Example:
        >>> hist = PixelHistogram()
        >>> for mask, amap in zip(masks, maps):   # bool / float32 array[H, W]
        ...     hist.add(amap, mask)
        >>> hist.auroc(), hist.pro()
    """

    def __init__(self, max_bins: int | None = None):
        max_bins = MAX_BINS if max_bins is None else max_bins
        if max_bins < 2:
            raise ValueError(f"max_bins should be at least 2, got {max_bins}")
        self.max_bins = int(max_bins)
        self.shift = 0                               # bits dropped from every key
        self.keys = np.empty(0, dtype=np.int64)      # sorted, unique, at self.shift
        self.normal = np.empty(0, dtype=np.int64)    # normal pixels per bin
        self.defect = np.empty(0, dtype=np.int64)    # defect pixels per bin
        self.weight = np.empty(0, dtype=np.float64)  # region weight per bin
        self.regions = 0
        self.images = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_pixels = 0

    def add(self, amap: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Count one image.

        Args:
            amap (float array[H, W]): anomaly map (cast to float32).
            mask (bool array[H, W] | None): ground truth; None means all pixels normal.
        """
        amap = np.asarray(amap)
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != amap.shape:
                raise ValueError(f"mask {mask.shape} and map {amap.shape} differ in shape")
        keys = _sortable(amap).ravel()
        if keys.size and np.isnan(amap).any():
            raise ValueError("the anomaly map holds NaN")
        if mask is None or not mask.any():
            defect = np.zeros(keys.size, dtype=bool)
            weight = np.zeros(keys.size, dtype=np.float64)
        else:
            w, n = region_weights(mask)
            defect, weight = mask.ravel(), w.ravel()
            self.regions += n
        self._pending.append((keys, defect, weight))
        self._pending_pixels += keys.size
        self.images += 1
        if self._pending_pixels >= self.max_bins:
            self._flush()

    def __getstate__(self) -> dict:
        """Pickled (e.g. sent to the other ranks of a distributed evaluate) as bins only:
        the pixels waiting to be binned are merged first, so the message is bounded by
        ``max_bins``."""
        self._flush()
        return self.__dict__.copy()

    # ----- bins ---------------------------------------------------------------------

    def _flush(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([k for k, _, _ in self._pending]) >> self.shift
        defect = np.concatenate([d for _, d, _ in self._pending])
        weight = np.concatenate([w for _, _, w in self._pending])
        self._pending, self._pending_pixels = [], 0
        self._merge(keys, (~defect).astype(np.int64), defect.astype(np.int64), weight)

    def _merge(self, keys, normal, defect, weight) -> None:
        """Add bins (any order, repeats allowed) at the current shift; re-fit max_bins."""
        keys = np.concatenate([self.keys, keys])
        order = np.argsort(keys, kind="stable")
        self._reduce(keys[order], np.concatenate([self.normal, normal])[order],
                     np.concatenate([self.defect, defect])[order],
                     np.concatenate([self.weight, weight])[order])
        while self.keys.size > self.max_bins:
            self.shift += 1
            self._reduce(self.keys >> 1, self.normal, self.defect, self.weight)

    def _reduce(self, keys, normal, defect, weight) -> None:
        """Sum runs of equal keys (keys sorted)."""
        if keys.size == 0:
            return
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        self.keys = keys[starts]
        self.normal = np.add.reduceat(normal, starts)
        self.defect = np.add.reduceat(defect, starts)
        self.weight = np.add.reduceat(weight, starts)

    @classmethod
    def combined(cls, parts: Sequence["PixelHistogram"]) -> "PixelHistogram":
        """One histogram of all pixels of ``parts`` (they are left unchanged).

        Parts with finer bins are coarsened to the coarsest shift first.
        """
        out = cls(max(p.max_bins for p in parts) if parts else None)
        for p in parts:
            p._flush()
        out.shift = max((p.shift for p in parts), default=0)
        for p in parts:
            out._merge(p.keys >> (out.shift - p.shift), p.normal, p.defect, p.weight)
            out.regions += p.regions
            out.images += p.images
        return out

    @property
    def defect_pixels(self) -> int:
        """Defect pixels counted so far (how much ground truth the metrics rest on)."""
        self._flush()
        return int(self.defect.sum())

    # ----- curves and areas ---------------------------------------------------------

    @property
    def exact(self) -> bool:
        """True while every bin holds a single float32 score (results are exact)."""
        self._flush()
        return self.shift == 0

    def _cumulative(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, tpr, pro) after each bin, by decreasing score, starting at 0."""
        self._flush()
        n_normal, n_defect = int(self.normal.sum()), int(self.defect.sum())

        def cum(x: np.ndarray, total: float) -> np.ndarray:
            return np.r_[0.0, np.cumsum(x[::-1]) / total] if total > 0 \
                else np.zeros(x.size + 1)

        return (cum(self.normal, n_normal), cum(self.defect, n_defect),
                cum(self.weight, self.regions))

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr), one point per bin, from (0, 0) to (1, 1)."""
        fpr, tpr, _ = self._cumulative()
        return fpr, tpr

    def auroc(self) -> float | None:
        """Pixel AUROC (trapezoidal, ties counted half as :func:`pixel_auroc`), or None
        if the pixels hold one class only."""
        self._flush()
        if self.normal.sum() == 0 or self.defect.sum() == 0:
            return None
        fpr, tpr, _ = self._cumulative()
        return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2.0))

    def auroc_error(self) -> float:
        """The largest possible ``|auroc() - pixel_auroc(...)|``.

        A (defect, normal) pixel pair adds 1, 1/2 or 0 to the exact AUROC (times
        1 / (P N)); in a shared bin the histogram counts every pair as a tie (1/2), so it
        is off by at most 1/2 per such pair. Pairs in different bins are ranked exactly.
        """
        self._flush()
        p, n = float(self.defect.sum()), float(self.normal.sum())
        if self.shift == 0 or p == 0 or n == 0:
            return 0.0
        return 0.5 * float(np.dot(self.defect.astype(np.float64), self.normal)) / (p * n)

    def pro(self, max_fpr: float = 0.3) -> float | None:
        """Normalised area under the PRO curve up to ``max_fpr``, as :func:`pro_score`."""
        self._flush()
        if self.regions == 0 or self.normal.sum() == 0:
            return None
        fpr, _, pro = self._cumulative()
        return _pro_area(fpr, pro, max_fpr)

    def pro_error(self, max_fpr: float = 0.3) -> float:
        """The largest possible ``|pro() - pro_score(...)|``.

        Inside one bin the exact curve is a monotone staircase from (F0, P0) to (F1, P1)
        and the histogram takes the chord: the areas differ by at most half the box,
        (F1 - F0)(P1 - P0) / 2. In the bin that holds ``max_fpr`` the curve is cut inside
        the box, so the whole width up to max_fpr times (P1 - P0) is counted.
        """
        self._flush()
        if self.shift == 0 or self.regions == 0 or self.normal.sum() == 0:
            return 0.0
        fpr, _, pro = self._cumulative()
        f0, f1, dp = fpr[:-1], fpr[1:], pro[1:] - pro[:-1]
        inside = f1 <= max_fpr
        err = 0.5 * np.sum((f1 - f0)[inside] * dp[inside])
        cut = (f0 < max_fpr) & (f1 > max_fpr)
        err += np.sum((max_fpr - f0[cut]) * dp[cut])
        return float(err) / max_fpr

    def quantile(self, q: float) -> float:
        """The score below which a fraction ``q`` of all pixels lie (a bin's lower edge).

        Args:
            q: in [0, 1].
        """
        self._flush()
        counts = np.cumsum(self.normal + self.defect)
        if counts.size == 0:
            raise ValueError("no pixels were added")
        j = min(int(np.searchsorted(counts, q * counts[-1], side="left")), counts.size - 1)
        return float(_unsortable(self.keys[j] << self.shift))


def f1_max(labels: Sequence[int], scores: Sequence[float]) -> tuple[float | None, float | None]:
    """The best F1 over all thresholds ``score >= t``, and that threshold.

    Like AUROC it needs both classes: without a good image every threshold below the
    lowest score has precision 1 and recall 1, so F1-max would be 1 whatever the scores.

    Returns:
        (F1-max, threshold), or (None, None) without a positive or a negative example.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0 or labels.min() == labels.max():
        return None, None
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores))
    # The last (precision 1, recall 0) point has no threshold.
    p, r = precision[:-1], recall[:-1]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _clean(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def pixel_histograms(masks: np.ndarray, maps: np.ndarray, defects: Sequence[str],
                     max_bins: int | None = None) -> dict[str, PixelHistogram]:
    """One :class:`PixelHistogram` per defect type from whole arrays.

    Args:
        masks (bool array[N, H, W]): ground truth.
        maps (float array[N, H, W]): anomaly maps.
        defects: defect type per image (``good`` for good ones).

    Returns:
        {defect type: histogram of its images}.
    """
    out: dict[str, PixelHistogram] = {}
    for mask, amap, name in zip(masks, maps, defects):
        out.setdefault(str(name), PixelHistogram(max_bins)).add(amap, mask)
    return out


def evaluate(labels: Sequence[int], scores: Sequence[float], defects: Sequence[str],
             masks: np.ndarray | None = None, maps: np.ndarray | None = None, *,
             pixels: dict[str, PixelHistogram] | None = None) -> dict:
    """All metrics, overall and per defect type (that type against the good images).

    Pixel metrics come from ``pixels`` (histograms per defect type, filled image by image:
    bounded memory) or from whole ``masks`` and ``maps`` arrays.

    Args:
        labels: 0 good / 1 defective, per image.
        scores: image scores.
        defects: defect type per image (``good`` for good ones).
        masks (bool array[N, H, W] or None): ground truth; None skips pixel metrics.
        maps (float array[N, H, W] or None): anomaly maps.
        pixels: {defect type: :class:`PixelHistogram`}, instead of masks and maps.

    Returns:
        dict with ``image_auroc``, ``pixel_auroc``, ``pro``, ``f1_max``,
        ``f1_threshold``, ``counts``, ``per_defect`` (one dict per defect type) and, with
        pixel metrics, ``pixel_binning`` (bins, whether exact, and the error bounds).
    """
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    defects = np.asarray(defects)
    if pixels is None and masks is not None and maps is not None:
        pixels = pixel_histograms(masks, maps, defects.tolist())

    def block(sel: np.ndarray, hist: PixelHistogram | None) -> dict:
        out = {"image_auroc": _clean(image_auroc(labels[sel], scores[sel]))}
        if hist is not None:
            out["pixel_auroc"] = _clean(hist.auroc())
            out["pro"] = _clean(hist.pro())
        return out

    everything = np.ones(labels.size, dtype=bool)
    overall = PixelHistogram.combined(list(pixels.values())) if pixels else None
    result = block(everything, overall)
    if overall is None:
        result["pixel_auroc"] = result["pro"] = None
    f1, thr = f1_max(labels, scores)
    result["f1_max"], result["f1_threshold"] = f1, thr
    result["counts"] = {"images": int(labels.size), "good": int((labels == 0).sum()),
                        "defective": int((labels == 1).sum())}
    table = {}
    for name in sorted(set(defects.tolist()) - {"good"}):
        sel = (defects == name) | (labels == 0)
        row = {"count": int((defects == name).sum())}
        parts = [pixels[k] for k in (name, "good") if k in pixels] if pixels else []
        row.update(block(sel, PixelHistogram.combined(parts) if parts else None))
        table[name] = row
    result["per_defect"] = table
    if overall is not None:
        result["pixel_binning"] = {
            "bins": int(overall.keys.size), "exact": overall.exact,
            "pixel_auroc_error_bound": overall.auroc_error(),
            "pro_error_bound": overall.pro_error()}
    return result
