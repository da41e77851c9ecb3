"""A verdict from good images only: out-of-sample scores, thresholds, the normalised score.

PatchCore is fitted on good images, so the threshold that separates good from defective
must come from good images too. Scoring a training image against a bank that holds its own
patches is optimistic (its patches are in the bank: the score is near 0), so the scores of
good images the bank has *not* seen are estimated at fit time, out of sample:

- ``crossfit`` (the default, chosen by measurement: bench/RESULTS.md, "Calibration from
  good images"): the good images are split into ``folds`` seeded random folds; for each
  fold a coreset is selected on the other folds' patches (the features were extracted
  once; the greedy selection is fast) and the held-out fold is scored against it. Every
  good image gets one out-of-sample score, and the final bank still uses all of them.
- ``holdout``: one seeded share of the good images is held out and scored against a
  coreset of the rest; fewer out-of-sample scores, one selection.

Each fold's bank is drawn from (folds - 1) / folds of the images at the model's coreset
ratio, a little sparser than the final bank, so its scores are if anything a little high:
the rates below are conservative for the final model.

**Image threshold at a false-reject rate.** With n out-of-sample good scores, sorted
s(1) >= s(2) >= ... >= s(n), and a future good image exchangeable with them, the chance that
it scores above the r-th largest is Beta(r, n + 1 - r)-distributed over calibration sets
(the order-statistic argument: the n + 1 scores are in random order, so the future one
exceeds s(r) with probability r / (n + 1) on average). The threshold for a target rate a is
taken at the plotting position r = a (n + 1), interpolated linearly between the two order
statistics around it; the rate reached is then about r / (n + 1) on average, and below the
Beta(r, n + 1 - r) upper quantile with the stated confidence (:func:`rate_reached`). When
a (n + 1) < 1 no order statistic lies that far out: the threshold is the largest score and
the rate reached is 1 / (n + 1) on average (with 20 good images: 4.8 %, whatever the
target), which :func:`rate_reached` says.

**Pixel threshold.** Each out-of-sample good image's largest map value (its peak) is kept.
The peaks' threshold at the same false-reject rate, by the same rule, is where a good image
shows any defect region with about the image threshold's probability; the pixel threshold
sits :data:`PIXEL_FACTOR` times as far above the median good pixel as that: regions then
stay off good images at least as often, and follow a defect's outline more closely (a
blurred map is wider than the defect at its foot). The factor is chosen by measurement on
bottle, widget and rod (bench/RESULTS.md, "Calibration from good images": pixel IoU 46 % ->
60 % on bottle for 97 % -> 94 % of the ground-truth regions hit).

**Normalised score** ``n(s) = 0.5 (1 + d / (w + |d|))``, ``d = s - image_threshold``,
``w = scale``: strictly increasing (derivative ``0.5 w / (w + |d|)^2 > 0``), exactly 0.5 at
the threshold, inside (0, 1) and never flat (``1 - n = 0.5 w / (w + d)`` for d > 0), in plain
elementwise operations (ONNX-exportable). ``w`` is the distance from the good images'
median out-of-sample score to the threshold, so a typical good image reads 0.25 and an image
as far above the threshold as that median is below it reads 0.75.

**Colour scale** of the overlays, fixed per model: from the median good pixel (coldest) to
``pixel_threshold + (pixel_threshold - median)`` (hottest): the pixel threshold sits in the
middle of the scale in every run, whatever images the run holds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from . import ops
from .coreset import coreset_size
from .metrics import PixelHistogram

#: Calibration schemes (module docstring).
SCHEMES = ("crossfit", "holdout")
DEFAULT_SCHEME = "crossfit"
#: Folds of ``crossfit`` (bench/RESULTS.md, "Calibration from good images").
DEFAULT_FOLDS = 5
#: Share of the good images ``holdout`` keeps out of its bank.
DEFAULT_HOLDOUT_SHARE = 0.2
#: ``fit --false-reject-rate``'s default (bench/RESULTS.md, "Calibration from good images").
DEFAULT_FALSE_REJECT_RATE = 0.01
#: Largest target false-reject rate: above it "defective" would be the usual verdict.
MAX_FALSE_REJECT_RATE = 0.5
#: Confidence of the upper bound :func:`rate_reached` states.
CONFIDENCE = 0.95
#: The pixel threshold's distance above the median good pixel, in units of the good
#: peaks' threshold's (module docstring; bench/RESULTS.md, "Calibration from good images").
PIXEL_FACTOR = 1.5
#: Label words of files and messages: (label False, label True).
LABELS = ("good", "defective")
#: Pixel-score quantiles kept in the model file (for the colour scale and the record).
PIXEL_LEVELS = (0.5, 0.9, 0.99, 0.999, 0.9999)


def check_rate(rate: float, option: str = "--false-reject-rate") -> float:
    """``rate`` as a float in (0, 0.5], or ValueError naming ``option``."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"{option} should be a number in (0, {MAX_FALSE_REJECT_RATE}], "
                         f"got {rate!r}") from None
    if not 0.0 < value <= MAX_FALSE_REJECT_RATE:  # NaN fails too
        raise ValueError(f"{option} should be in (0, {MAX_FALSE_REJECT_RATE}] (a fraction "
                         f"of the good images, e.g. 0.01 for 1 %), got {rate}")
    return value


# ----- the order-statistic threshold ------------------------------------------------------

def plotting_position(n: int, rate: float) -> float:
    """r = rate (n + 1), at least 1: the rank from the top whose score is the threshold."""
    return max(1.0, rate * (n + 1))


def threshold_at_rate(scores: Sequence[float] | np.ndarray, rate: float) -> float:
    """The score above which a fraction ``rate`` of future good images is expected.

    Args:
        scores: out-of-sample scores of n >= 1 good images.
        rate: target false-reject rate in (0, 0.5].

    Returns:
        The order statistic at plotting position r = rate (n + 1) from the top, linearly
        interpolated between ranks floor(r) and ceil(r); the largest score when r < 1.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("no calibration scores")
    r = min(plotting_position(s.size, check_rate(rate, "rate")), float(s.size))
    lo = int(math.floor(r))
    frac = r - lo
    if frac == 0.0 or lo >= s.size:
        return float(s[lo - 1])
    return float(s[lo - 1] + frac * (s[lo] - s[lo - 1]))


def rate_reached(n: int, rate: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """What false-reject rate a threshold from n good images actually reaches.

    The future image's chance to score above the threshold at plotting position r is
    Beta(r, n + 1 - r) over calibration sets (module docstring; for a fractional r the
    interpolated threshold is between the two integer cases, and so is this).

    Args:
        n: number of out-of-sample good scores.
        rate: target rate.
        confidence: level of the upper bound.

    Returns:
        (expected rate r / (n + 1), the rate not exceeded with probability ``confidence``).
    """
    from scipy.special import betaincinv

    r = min(plotting_position(n, rate), float(n))
    return r / (n + 1), float(betaincinv(r, n + 1 - r, confidence))


# ----- the calibration record -----------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """What a model knows about good images it has not seen (saved in the model file).

    Attributes:
        image_threshold: raw image score above which an image is labelled defective.
        pixel_threshold: raw map value above which a pixel belongs to a defect region.
        scale: w of the normalised score (> 0).
        colour_min: map value drawn as the coldest overlay colour.
        colour_max: map value drawn as the hottest.
        false_reject_rate: the target rate the thresholds were set at.
        scheme: ``crossfit`` or ``holdout`` (how the scores below were obtained).
        folds: folds of ``crossfit`` (1 for ``holdout``).
        image_scores: out-of-sample image scores of the good images.
        image_peaks: their largest map values, in the same order.
        pixel_quantiles: (level, value) pairs of the good images' map pixels.
    """

    image_threshold: float
    pixel_threshold: float
    scale: float
    colour_min: float
    colour_max: float
    false_reject_rate: float
    scheme: str
    folds: int
    image_scores: tuple[float, ...]
    image_peaks: tuple[float, ...]
    pixel_quantiles: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """What is inconsistent in the record, or None."""
        numbers = (self.image_threshold, self.pixel_threshold, self.scale, self.colour_min,
                   self.colour_max, *self.image_scores, *self.image_peaks,
                   *(v for pair in self.pixel_quantiles for v in pair))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) for v in numbers):
            return "a threshold, scale or score is not a finite number"
        if not self.scale > 0:
            return f"scale should be > 0, got {self.scale}"
        if not self.colour_max > self.colour_min:
            return f"colour_max {self.colour_max} should exceed colour_min {self.colour_min}"
        if not 0 < self.false_reject_rate <= MAX_FALSE_REJECT_RATE:
            return f"false_reject_rate should be in (0, 0.5], got {self.false_reject_rate}"
        if self.scheme not in SCHEMES:
            return f"scheme should be one of {', '.join(SCHEMES)}, got {self.scheme!r}"
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 1:
            return f"folds should be a positive integer, got {self.folds!r}"
        if not self.image_scores or len(self.image_scores) != len(self.image_peaks):
            return (f"{len(self.image_scores)} image scores and {len(self.image_peaks)} "
                    f"peaks, should be as many and at least one")
        return None

    @property
    def images(self) -> int:
        """Number of out-of-sample good images behind the thresholds."""
        return len(self.image_scores)

    def rate_reached(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        """(expected, upper bound) of the false-reject rate reached: :func:`rate_reached`."""
        return rate_reached(self.images, self.false_reject_rate, confidence)

    def summary(self) -> str:
        """One line for people: the thresholds and the rate they reach."""
        mean, upper = self.rate_reached()
        return (f"image threshold {self.image_threshold:.6g} (normalised 0.5), pixel "
                f"threshold {self.pixel_threshold:.6g}; target false-reject rate "
                f"{self.false_reject_rate:.3g}, from {self.images} out-of-sample good "
                f"images ({self.scheme}{'' if self.scheme == 'holdout' else f', {self.folds} folds'}"
                f"): expected {mean:.2%}, at most {upper:.2%} with {CONFIDENCE:.0%} confidence")

    def to_dict(self) -> dict:
        """A JSON-able dict (the model file's ``calibration`` entry)."""
        out = dataclasses.asdict(self)
        out["image_scores"] = list(self.image_scores)
        out["image_peaks"] = list(self.image_peaks)
        out["pixel_quantiles"] = [list(p) for p in self.pixel_quantiles]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        """The record of :meth:`to_dict`; ValueError naming what is missing or wrong."""
        if not isinstance(data, dict):
            raise ValueError("calibration should be a JSON object")
        names = [f.name for f in dataclasses.fields(cls)]
        missing, unknown = sorted(set(names) - set(data)), sorted(set(data) - set(names))
        if missing or unknown:
            raise ValueError(f"calibration entries {', '.join(missing)} missing"
                             if missing else f"calibration entries {', '.join(unknown)} "
                             f"unknown to this version")
        try:
            quantiles = tuple((float(q), float(v)) for q, v in data["pixel_quantiles"])
            scores = tuple(data["image_scores"])
            peaks = tuple(data["image_peaks"])
        except (TypeError, ValueError):
            raise ValueError("calibration scores or pixel quantiles have the wrong type") from None
        return cls(**{**data, "image_scores": scores, "image_peaks": peaks,
                      "pixel_quantiles": quantiles})

    def with_rate(self, rate: float) -> "Calibration":
        """The same out-of-sample scores with thresholds at another target rate."""
        return calibrate(self.image_scores, self.image_peaks,
                         dict(self.pixel_quantiles)[0.5], rate, self.scheme, self.folds,
                         self.pixel_quantiles)


def calibrate(image_scores: Sequence[float], image_peaks: Sequence[float],
              median_pixel: float, rate: float, scheme: str, folds: int,
              pixel_quantiles: Sequence[tuple[float, float]] = ()) -> Calibration:
    """Thresholds, scale and colours from out-of-sample good-image statistics.

    Args:
        image_scores: out-of-sample image scores of the good images.
        image_peaks: their largest map values.
        median_pixel: the median map value over their pixels.
        rate: target false-reject rate in (0, 0.5].
        scheme: how the scores were obtained (:data:`SCHEMES`).
        folds: its folds.
        pixel_quantiles: (level, value) pairs to keep; must hold level 0.5.

    Returns:
        :class:`Calibration`.
    """
    rate = check_rate(rate)
    scores = [float(s) for s in image_scores]
    t = threshold_at_rate(scores, rate)
    # w: the median good image's distance below the threshold; kept positive (all
    # out-of-sample scores equal, or the median at the threshold) at a tiny relative width.
    floor = 1e-6 * max(abs(t), 1e-12)
    w = max(t - float(np.median(scores)), floor)
    peak_t = threshold_at_rate(image_peaks, rate)
    cmin = float(median_pixel)
    pt = cmin + PIXEL_FACTOR * (peak_t - cmin) if peak_t > cmin else peak_t
    cmax = pt + (pt - cmin) if pt > cmin else cmin + max(abs(cmin), 1e-12)
    quantiles = tuple(sorted({(float(q), float(v)) for q, v in pixel_quantiles}
                             | {(0.5, cmin)}))
    return Calibration(image_threshold=t, pixel_threshold=pt, scale=w, colour_min=cmin,
                       colour_max=cmax, false_reject_rate=rate, scheme=scheme,
                       folds=int(folds), image_scores=tuple(scores),
                       image_peaks=tuple(float(p) for p in image_peaks),
                       pixel_quantiles=quantiles)


# ----- the verdict -------------------------------------------------------------------------

def normalise(raw, cal: Calibration):
    """The normalised score ``0.5 (1 + d / (w + |d|))`` of raw image scores.

    Args:
        raw: a float, a numpy array (computed in float64) or a torch Tensor (computed in
            its own floating dtype, elementwise: exportable).
        cal: the model's calibration.

    Returns:
        The same kind as ``raw``, each value in (0, 1), 0.5 exactly at the threshold.
    """
    if isinstance(raw, Tensor):
        raw = raw if raw.is_floating_point() else raw.double()
        d = raw - cal.image_threshold
        return 0.5 * (1.0 + d / (cal.scale + d.abs()))
    if isinstance(raw, (np.ndarray, list, tuple)):
        d = np.asarray(raw, dtype=np.float64) - cal.image_threshold
        return 0.5 * (1.0 + d / (cal.scale + np.abs(d)))
    d = float(raw) - cal.image_threshold
    return 0.5 * (1.0 + d / (cal.scale + abs(d)))


def denormalise(value: float, cal: Calibration) -> float:
    """The raw score whose normalised score is ``value`` (in (0, 1)): the inverse map.

    With u = 2 n - 1 in (-1, 1): d / (w + |d|) = u gives d = u w / (1 - |u|).
    """
    n = float(value)
    if not 0.0 < n < 1.0:
        raise ValueError(f"a normalised score should be in (0, 1), got {value}")
    u = 2.0 * n - 1.0
    return cal.image_threshold + u * cal.scale / (1.0 - abs(u))


def label(raw, cal: Calibration):
    """Defective (True) when the raw score is above the image threshold, else good.

    Args:
        raw: float, numpy array or torch Tensor of raw image scores.
        cal: the model's calibration.

    Returns:
        bool, bool array or bool Tensor.
    """
    if isinstance(raw, Tensor):
        return raw > cal.image_threshold
    if isinstance(raw, (np.ndarray, list, tuple)):
        return np.asarray(raw, dtype=np.float64) > cal.image_threshold
    return bool(float(raw) > cal.image_threshold)


# ----- out-of-sample scores of the good images ----------------------------------------------

@dataclass
class OutOfSample:
    """Out-of-sample statistics of the good training images.

    Attributes:
        scores (float64 array[n]): image scores, in image order.
        peaks (float64 array[n]): largest map value of each image.
        pixels: histogram of their map pixels (:func:`pixel_sample` of each map).
    """

    scores: np.ndarray
    peaks: np.ndarray
    pixels: PixelHistogram

    def quantiles(self, levels: Sequence[float] = PIXEL_LEVELS) -> list[tuple[float, float]]:
        """(level, value) pairs of the pixel scores."""
        return [(float(q), self.pixels.quantile(q)) for q in levels]

    def calibration(self, rate: float, scheme: str, folds: int) -> Calibration:
        """:func:`calibrate` on these statistics."""
        quantiles = self.quantiles()
        return calibrate(self.scores, self.peaks, dict(quantiles)[0.5], rate, scheme, folds,
                         quantiles)


#: Pixels of each map that the pixel quantiles are taken from (at most; a regular grid).
PIXEL_SAMPLE = 65536


def pixel_sample(amap: np.ndarray) -> np.ndarray:
    """Every s-th pixel of a map in both directions, s the smallest step that leaves at
    most :data:`PIXEL_SAMPLE` pixels: the quantiles of a photo-sized map (810,000 pixels
    for a 900 x 900 photo) to a fraction of a percent, at a tenth of the cost."""
    h, w = amap.shape
    step = max(1, math.ceil(math.sqrt(h * w / PIXEL_SAMPLE)))
    return amap[::step, ::step]


def split_images(n: int, scheme: str, folds: int = DEFAULT_FOLDS,
                 share: float = DEFAULT_HOLDOUT_SHARE, seed: int = 0) -> list[np.ndarray]:
    """The held-out image sets of a scheme (seeded, each sorted).

    Args:
        n: number of good images (>= 2).
        scheme: ``crossfit`` (``folds`` disjoint folds covering every image; more folds
            than images gives one image per fold) or ``holdout`` (one set of
            round(share n) images, at least one, leaving at least one).
        folds: folds of ``crossfit`` (>= 2).
        share: held-out share of ``holdout``, in (0, 1).
        seed: seeds the random split.

    Returns:
        list of int64 arrays of image indices.
    """
    if n < 2:
        raise ValueError(f"calibration needs at least 2 good images, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    if scheme == "crossfit":
        if folds < 2:
            raise ValueError(f"crossfit needs at least 2 folds, got {folds}")
        return [np.sort(part) for part in np.array_split(perm, min(folds, n))]
    if scheme == "holdout":
        if not 0.0 < share < 1.0:
            raise ValueError(f"the held-out share should be in (0, 1), got {share}")
        m = min(max(1, int(round(share * n))), n - 1)
        return [np.sort(perm[:m])]
    raise ValueError(f"scheme should be one of {', '.join(SCHEMES)}, got {scheme!r}")


def fold_banks(projected: Tensor, gather: Callable[[Tensor], Tensor],
               spans: Sequence[tuple[int, int]], held_out: Sequence[np.ndarray],
               ratio: float, seed: int = 0) -> Iterator[tuple[np.ndarray, Tensor]]:
    """For each held-out set, the bank a fit on the other images would have.

    The greedy coreset (:func:`patchcore_fast.ops.greedy_coreset`) runs on the projected
    rows of the other images at the model's ratio, so each fold's bank is what
    :meth:`PatchCore.fit` would keep from those images; the features are not extracted
    again.

    Args:
        projected (Tensor[N, C]): every training patch in the selection's projection.
        gather: full-width rows of the bank by index, ``Tensor[k] -> Tensor[k, D]``.
        spans: (start, stop) rows of each training image in the bank order.
        held_out: from :func:`split_images`.
        ratio: the model's coreset ratio.
        seed: the model's seed (each fold's start row draws from seed + fold).

    Yields:
        (held-out image indices, Tensor[M_f, D] the bank of the other images).
    """
    starts = np.array([s for s, _ in spans], dtype=np.int64)
    stops = np.array([e for _, e in spans], dtype=np.int64)
    for f, held in enumerate(held_out):
        keep = np.ones(len(spans), dtype=bool)
        keep[held] = False
        rows = _rows_of(starts[keep], stops[keep])
        k = coreset_size(len(rows), ratio)
        rows_t = torch.from_numpy(rows).to(projected.device)
        if k < len(rows):
            gen = torch.Generator().manual_seed(int(seed) + 1 + f)
            start = int(torch.randint(len(rows), (1,), generator=gen))
            chosen = ops.greedy_coreset(projected.index_select(0, rows_t), k, start)
            rows_t = rows_t[chosen.to(rows_t.device)]
        yield held, gather(rows_t)


def _rows_of(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenated ranges [start, stop) as one int64 array."""
    if starts.size == 0:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(starts, stops)])


def rows_of_images(spans: Sequence[tuple[int, int]], images: Iterable[int]) -> Tensor:
    """The bank rows of some training images, Tensor[k] int64 in image order."""
    images = list(images)
    return torch.from_numpy(_rows_of(np.array([spans[i][0] for i in images], dtype=np.int64),
                                      np.array([spans[i][1] for i in images], dtype=np.int64)))


def out_of_sample(n_images: int, folds: Iterable[tuple[np.ndarray, Iterable[
        tuple[Sequence[int], np.ndarray, Sequence[np.ndarray]]]]]) -> OutOfSample:
    """Collect the held-out images' scores and maps, fold by fold.

    Args:
        n_images: number of good images.
        folds: per fold, (held-out indices, the scoring of them against the fold's bank:
            batches of (image indices, float array[B] scores, B maps)).

    Returns:
        :class:`OutOfSample` of the images scored (in image order); an image scored
        twice is an error.
    """
    scores = np.full(n_images, np.nan)
    peaks = np.full(n_images, np.nan)
    pixels = PixelHistogram()
    seen = np.zeros(n_images, dtype=bool)
    for held, batches in folds:
        for ids, s, maps in batches:
            for i, v, amap in zip(ids, s, maps):
                if seen[i]:
                    raise ValueError(f"image {i} was scored twice")
                seen[i] = True
                scores[i] = float(v)
                peaks[i] = float(np.max(amap))
                pixels.add(pixel_sample(amap))
    # holdout scores only its held-out share; the others have no out-of-sample score.
    return OutOfSample(scores[seen], peaks[seen], pixels)


__all__ = ["SCHEMES", "DEFAULT_SCHEME", "DEFAULT_FOLDS", "DEFAULT_HOLDOUT_SHARE",
           "DEFAULT_FALSE_REJECT_RATE", "MAX_FALSE_REJECT_RATE", "PIXEL_FACTOR", "LABELS", "Calibration", "OutOfSample",
           "calibrate", "check_rate", "denormalise", "fold_banks", "label", "normalise",
           "out_of_sample", "plotting_position", "rate_reached", "rows_of_images",
           "split_images", "threshold_at_rate"]
