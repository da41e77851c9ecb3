"""The verdict contract (issue #21): thresholds from good images, the normalised score,
the calibration record and the cross-fitting folds."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from patchcore_fast import calibration as cal
from patchcore_fast.coreset import coreset_size


def make_cal(**kw) -> cal.Calibration:
    rng = np.random.default_rng(0)
    scores = rng.normal(10.0, 1.0, 60)
    peaks = scores * 0.8
    base = cal.calibrate(scores, peaks, 4.0, 0.05, "crossfit", 5, [(0.99, 7.0)])
    return cal.Calibration(**{**cal.Calibration.to_dict(base), **kw,
                              "image_scores": base.image_scores,
                              "image_peaks": base.image_peaks,
                              "pixel_quantiles": base.pixel_quantiles})


# ----- the order-statistic threshold ----------------------------------------------------------

def test_threshold_is_the_order_statistic_at_the_plotting_position():
    s = np.arange(1.0, 100.0)  # 99 scores: r = rate * 100
    assert cal.threshold_at_rate(s, 0.03) == 97.0       # r = 3: third largest
    assert cal.threshold_at_rate(s, 0.035) == pytest.approx(96.5)  # between ranks 3 and 4
    assert cal.threshold_at_rate(s, 0.005) == 99.0      # r < 1: the largest
    assert cal.threshold_at_rate(s[::-1].copy(), 0.03) == 97.0  # order of input irrelevant
    assert cal.threshold_at_rate([5.0], 0.5) == 5.0


@pytest.mark.parametrize("rate", [0.0, -0.1, 0.51, 1.0, float("nan"), "x", None])
def test_rate_outside_the_range_is_refused(rate):
    with pytest.raises(ValueError, match=r"\(0, 0.5\]"):
        cal.check_rate(rate)
    with pytest.raises(ValueError):
        cal.threshold_at_rate([1.0, 2.0], rate)


def test_rate_reached_matches_simulation():
    """Monte Carlo over calibration sets: the exceedance of the threshold (the chance that
    a new good image scores above it) has mean r / (n + 1) and its stated 95 % bound is
    exceeded in about 5 % of the sets (n = 99, rate 0.03: r = 3, Beta(3, 97))."""
    n, rate, sets = 99, 0.03, 20000
    rng = np.random.default_rng(1)
    u = rng.random((sets, n))  # uniform scores: the exceedance of t is 1 - t
    exceed = np.array([1.0 - cal.threshold_at_rate(row, rate) for row in u])
    mean, upper = cal.rate_reached(n, rate)
    assert mean == pytest.approx(3 / 100)
    assert exceed.mean() == pytest.approx(mean, rel=0.03)
    assert np.mean(exceed > upper) == pytest.approx(0.05, abs=0.006)
    # Fractional r: the mean stays r / (n + 1) (the interpolation is linear in the ranks).
    exceed = np.array([1.0 - cal.threshold_at_rate(row, 0.025) for row in u])
    assert exceed.mean() == pytest.approx(cal.rate_reached(n, 0.025)[0], rel=0.03)


def test_few_images_cannot_reach_a_small_rate():
    mean, upper = cal.rate_reached(20, 0.01)
    assert mean == pytest.approx(1 / 21)  # the largest of 20: 4.8 %, whatever the target
    assert upper > mean


# ----- normalised score and label ------------------------------------------------------------

def test_normalised_is_half_at_the_threshold_for_every_kind():
    c = make_cal()
    t = c.image_threshold
    assert cal.normalise(t, c) == 0.5
    assert cal.normalise(np.array([t]), c)[0] == 0.5
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([t], dtype=dtype)
        out = cal.normalise(x, c)
        assert out.dtype == dtype and float(out[0]) == pytest.approx(0.5, abs=1e-7)
    assert cal.normalise(t - c.scale, c) == pytest.approx(0.25)
    assert cal.normalise(t + c.scale, c) == pytest.approx(0.75)


def test_normalised_is_strictly_monotone_in_zero_one_and_keeps_auroc():
    c = make_cal()
    raw = np.concatenate([c.image_threshold + np.linspace(-1e6, 1e6, 20001),
                          c.image_threshold + np.linspace(-3, 3, 20001)])
    raw = np.unique(raw)
    n = cal.normalise(raw, c)
    assert np.all(np.diff(n) > 0)
    assert np.all((n > 0) & (n < 1))
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 500)
    scores = rng.normal(c.image_threshold, 3 * c.scale, 500) + labels
    assert abs(roc_auc_score(labels, scores)
               - roc_auc_score(labels, cal.normalise(scores, c))) < 1e-6


def test_denormalise_inverts_normalise():
    c = make_cal()
    for v in (0.01, 0.25, 0.5, 0.8, 0.999):
        assert cal.normalise(cal.denormalise(v, c), c) == pytest.approx(v, abs=1e-12)
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            cal.denormalise(bad, c)


def test_label_is_above_the_threshold_and_agrees_with_normalised():
    c = make_cal()
    t = c.image_threshold
    assert cal.label(t, c) is False and cal.label(t + 1e-9, c) is True
    raw = np.array([t - 1, t, t + 1])
    assert cal.label(raw, c).tolist() == [False, False, True]
    assert cal.label(torch.tensor(raw), c).tolist() == [False, False, True]
    assert (cal.normalise(raw, c) > 0.5).tolist() == cal.label(raw, c).tolist()


# ----- the record -----------------------------------------------------------------------------

def test_calibrate_sets_scale_and_colours():
    scores = np.arange(1.0, 100.0)
    c = cal.calibrate(scores, scores / 2, 3.0, 0.03, "crossfit", 5)
    assert c.image_threshold == 97.0
    assert c.scale == pytest.approx(97.0 - 50.0)  # threshold - median
    assert c.pixel_threshold == 3.0 + cal.PIXEL_FACTOR * (48.5 - 3.0)  # peaks at rate 0.03
    assert c.colour_min == 3.0
    assert (c.colour_min + c.colour_max) / 2 == pytest.approx(c.pixel_threshold)
    assert (0.5, 3.0) in c.pixel_quantiles
    assert "97" in c.summary() and "99 out-of-sample" in c.summary()
    same = cal.calibrate([4.0, 4.0, 4.0], [1.0, 1.0, 1.0], 1.0, 0.5, "holdout", 1)
    assert same.scale > 0  # all scores equal: a tiny positive width, never 0


def test_record_round_trips_through_json_and_rejects_damage():
    c = make_cal()
    again = cal.Calibration.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    assert again.with_rate(0.2).image_threshold < c.image_threshold
    d = c.to_dict()
    for change, match in (({"scale": 0.0}, "scale"), ({"image_threshold": float("nan")},
                                                      "finite"),
                          ({"colour_max": d["colour_min"]}, "colour_max"),
                          ({"scheme": "magic"}, "scheme"), ({"folds": 0}, "folds"),
                          ({"false_reject_rate": 0.7}, "false_reject_rate"),
                          ({"image_peaks": [1.0]}, "peaks"), ({"extra": 1}, "unknown"),
                          ({"image_scores": "abc"}, "finite|type")):
        with pytest.raises(ValueError, match=match):
            cal.Calibration.from_dict({**d, **change})
    d.pop("scale")
    with pytest.raises(ValueError, match="scale missing"):
        cal.Calibration.from_dict(d)


# ----- held-out sets and fold banks -----------------------------------------------------------

def test_split_images():
    folds = cal.split_images(23, "crossfit", 5, seed=3)
    assert len(folds) == 5 and sorted(np.concatenate(folds).tolist()) == list(range(23))
    assert all(np.array_equal(a, b) for a, b in zip(folds, cal.split_images(23, "crossfit",
                                                                            5, seed=3)))
    assert len(cal.split_images(3, "crossfit", 5)) == 3  # one image per fold
    (held,) = cal.split_images(20, "holdout", share=0.2, seed=0)
    assert len(held) == 4
    assert len(cal.split_images(2, "holdout", share=0.9)[0]) == 1  # leaves one for the bank
    for args, match in (((1, "crossfit", 5), "at least 2"), ((5, "crossfit", 1), "2 folds"),
                        ((5, "nope"), "scheme")):
        with pytest.raises(ValueError, match=match):
            cal.split_images(*args)


@pytest.mark.parametrize("ratio", [0.25, 1.0])
def test_fold_banks_never_hold_the_held_out_images(ratio):
    rng = np.random.default_rng(4)
    sizes = rng.integers(3, 9, 12)  # 12 images of 3-8 patches
    spans, start = [], 0
    for s in sizes:
        spans.append((start, start + int(s)))
        start += int(s)
    projected = torch.from_numpy(rng.normal(size=(start, 4)).astype(np.float32))
    held_out = cal.split_images(12, "crossfit", 4, seed=0)
    seen = []
    for held, rows in cal.fold_banks(projected, lambda idx: idx.clone(), spans, held_out,
                                     ratio, seed=0):
        held_rows = set(cal.rows_of_images(spans, held).tolist())
        other = start - len(held_rows)
        assert len(rows) == coreset_size(other, ratio)
        assert not held_rows & set(rows.tolist())
        assert len(set(rows.tolist())) == len(rows)
        seen.append(held)
    assert len(seen) == 4


def test_out_of_sample_collects_each_image_once():
    maps = [np.full((4, 4), float(i)) for i in range(6)]

    def batches(ids):
        return [(ids, np.array([10.0 + i for i in ids]), [maps[i] for i in ids])]

    held_out = cal.split_images(6, "crossfit", 3, seed=0)
    oos = cal.out_of_sample(6, [(h, batches(list(h))) for h in held_out])
    assert oos.scores.tolist() == [10.0 + i for i in range(6)]
    assert oos.peaks.tolist() == [float(i) for i in range(6)]
    assert oos.pixels.images == 6
    c = oos.calibration(0.5, "crossfit", 3)
    assert math.isfinite(c.image_threshold) and c.images == 6
    (held,) = cal.split_images(6, "holdout", share=0.5, seed=0)
    part = cal.out_of_sample(6, [(held, batches(list(held)))])
    assert part.scores.tolist() == [10.0 + i for i in held]
    with pytest.raises(ValueError, match="twice"):
        cal.out_of_sample(6, [(held, batches(list(held))), (held, batches(list(held)))])
