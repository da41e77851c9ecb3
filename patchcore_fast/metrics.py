"""Step 11: the metrics of the paper and the MVTec AD benchmark.

* image AUROC: area under the ROC of image scores (defective = positive);
* pixel AUROC: the same over every test pixel at crop resolution;
* PRO: the per-region overlap curve (mean over ground-truth connected components of the
  fraction of the component above the threshold) against the false-positive rate on
  normal pixels, integrated up to FPR 0.3 and divided by 0.3, so 1 is perfect;
* F1-max: the best F1 over all image-score thresholds, and that threshold.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if labels.size == 0 or labels.min() == labels.max():
        return None  # one class only: undefined
    return float(roc_auc_score(labels, scores))


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
    structure = np.ones((3, 3), dtype=int)
    sizes = []
    for i in range(masks.shape[0]):
        labels, n = ndimage.label(masks[i], structure=structure)
        if n == 0:
            continue
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        w = np.zeros(n + 1)
        w[1:] = 1.0 / counts[1:]
        weights_pro[i] = w[labels]
        sizes.append(n)
    n_regions = int(sum(sizes))
    n_normal = int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        raise ValueError("PRO needs at least one defect region and one normal pixel")
    order = np.argsort(-maps.ravel(), kind="stable")
    s = maps.ravel()[order]
    fpr = np.cumsum((~masks).ravel()[order]) / n_normal
    pro = np.cumsum(weights_pro.ravel()[order]) / n_regions
    last_of_run = np.r_[s[1:] != s[:-1], True]
    return np.r_[0.0, fpr[last_of_run]], np.r_[0.0, pro[last_of_run]]


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
    # fpr is non-decreasing; keep the points up to max_fpr and close the area there.
    end = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:end], pro[:end]
    if end < fpr.size and x[-1] < max_fpr:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        x, y = np.r_[x, max_fpr], np.r_[y, y_end]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return area / max_fpr


def f1_max(labels: Sequence[int], scores: Sequence[float]) -> tuple[float | None, float | None]:
    """The best F1 over all thresholds ``score >= t``, and that threshold.

    Returns:
        (F1-max, threshold), or (None, None) without a positive example.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.sum() == 0:
        return None, None
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores))
    # The last (precision 1, recall 0) point has no threshold.
    p, r = precision[:-1], recall[:-1]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _clean(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def evaluate(labels: Sequence[int], scores: Sequence[float], defects: Sequence[str],
             masks: np.ndarray | None, maps: np.ndarray | None) -> dict:
    """All metrics, overall and per defect type (that type against the good images).

    Args:
        labels: 0 good / 1 defective, per image.
        scores: image scores.
        defects: defect type per image (``good`` for good ones).
        masks (bool array[N, H, W] or None): ground truth; None skips pixel metrics.
        maps (float array[N, H, W] or None): anomaly maps.

    Returns:
        dict with ``image_auroc``, ``pixel_auroc``, ``pro``, ``f1_max``,
        ``f1_threshold``, ``counts`` and ``per_defect`` (one dict per defect type).
    """
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    defects = np.asarray(defects)
    pixel = masks is not None and maps is not None

    def block(sel: np.ndarray) -> dict:
        out = {"image_auroc": _clean(image_auroc(labels[sel], scores[sel]))}
        if pixel:
            out["pixel_auroc"] = _clean(pixel_auroc(masks[sel], maps[sel]))
            out["pro"] = _clean(pro_score(masks[sel], maps[sel]))
        return out

    everything = np.ones(labels.size, dtype=bool)
    result = block(everything)
    if not pixel:
        result["pixel_auroc"] = result["pro"] = None
    f1, thr = f1_max(labels, scores)
    result["f1_max"], result["f1_threshold"] = f1, thr
    result["counts"] = {"images": int(labels.size), "good": int((labels == 0).sum()),
                        "defective": int((labels == 1).sum())}
    table = {}
    for name in sorted(set(defects.tolist()) - {"good"}):
        sel = (defects == name) | (labels == 0)
        row = {"count": int((defects == name).sum())}
        row.update(block(sel))
        table[name] = row
    result["per_defect"] = table
    return result


def save_roc_plot(path: str | os.PathLike, labels: Sequence[int], scores: Sequence[float],
                  masks: np.ndarray | None = None, maps: np.ndarray | None = None,
                  title: str = "") -> None:
    """Write the image (and pixel) ROC curves as a PNG, atomically.

    Args:
        path: PNG file.
        labels, scores: image labels and scores.
        masks, maps: optional pixel ground truth and maps.
        title: plot title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_path

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    labels = np.asarray(labels)
    if labels.min() != labels.max():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"image (AUROC {roc_auc_score(labels, scores):.4f})")
    if masks is not None and maps is not None and masks.any() and not masks.all():
        fpr, tpr, _ = roc_curve(masks.ravel(), maps.ravel())
        auc = np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr)
        ax.plot(fpr, tpr, label=f"pixel (AUROC {auc:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
           ylim=(0, 1.01), title=title or "ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
