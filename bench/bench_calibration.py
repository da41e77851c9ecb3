"""Calibration from good images (issue #21): which scheme, which defaults.

For each category (MVTec AD bottle, the demo widget and rod) this fits EfficientNet-Lite0
at a 10 % coreset with the default geometry, extracting the training features once, and

1. obtains out-of-sample (OOS) scores of the good training images by each scheme of
   :mod:`patchcore_fast.calibration` (``crossfit`` with 5 and 3 folds, ``holdout`` 20 %),
   over several seeds, beside the in-sample scores (training images against the final
   bank, what calibration must not use), and times each;
2. checks how well each predicts the scores of the *test* good images (which no scheme
   sees): the share of test good images above the OOS 95th percentile (should be near
   5 %) and the thresholds' spread over seeds;
3. tables the verdict at several target false-reject rates (false rejects among the test
   good images, misses among the defective ones) beside the F1-optimal oracle threshold,
   which needs the labelled test set;
4. tables the defect regions at the pixel threshold for several minimum areas: good images
   with a region, pixel precision / recall / IoU over the defective images, and the share
   of ground-truth regions hit.

Run from the repository root (the tables go to stdout; bench/RESULTS.md, "Calibration from
good images", holds a run):

    PYTHONPATH=$PWD .venv/bin/python bench/bench_calibration.py [--seeds 3] \
        [--categories bottle widget rod] [--demo DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from patchcore_fast import calibration as cal_mod  # noqa: E402
from patchcore_fast.coreset import StreamingCoreset  # noqa: E402
from patchcore_fast.datasets import list_images, mvtec_test  # noqa: E402
from patchcore_fast.images import read_mask  # noqa: E402
from patchcore_fast.metrics import f1_max, image_auroc  # noqa: E402
from patchcore_fast.model import PatchCore, PatchCoreConfig  # noqa: E402
from patchcore_fast.regions import RegionCounts, find_regions  # noqa: E402

RATES = (0.005, 0.01, 0.02, 0.05)
MIN_AREAS = (0, 64, 256, 1024, 4096)
PIXEL_FACTORS = (1.0, 1.25, 1.5, 2.0)
SCHEMES = (("crossfit", 5), ("crossfit", 3), ("holdout", 1))


class Fitted:
    """A model fitted with its training features kept (in memory) for calibration."""

    def __init__(self, folder: Path):
        self.model = PatchCore(PatchCoreConfig(backbone="efficientnet_lite0",
                                               coreset_ratio=0.1, device="cpu"))
        self.paths = list_images([folder / "train" / "good"], "train")
        c = self.model.config
        t0 = time.perf_counter()
        self.sc = StreamingCoreset(c.coreset_ratio, c.projection_dim, c.seed, in_memory=True)
        self.spans, self.patches = [], []
        for batch, patches in self.model.embed_batches(self.paths):
            for p in patches:
                self.spans.append((self.sc.n, self.sc.n + p.shape[0]))
                self.sc.add(p)
                self.patches.append(p)
        assert len(self.patches) == len(self.paths), "unreadable training image"
        self.grid, self.size = self.model.grid, self.model.input_size
        self.feature_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        idx = self.sc.select(c.coreset_ratio, keep_projections=True)
        self.model._set_bank(self.sc.gather(idx).contiguous())
        self.bank_seconds = time.perf_counter() - t1
        self.final = (self.model.bank, self.model.neighbourhoods)

    def score(self, bank: torch.Tensor, ids, batch: int = 8):
        """Score training images ``ids`` against ``bank`` (its neighbourhoods computed
        here, as a fit would); yields (ids, scores, maps at the photo's size)."""
        m = self.model
        m._set_bank(bank)
        try:
            with torch.inference_mode():
                for j in range(0, len(ids), batch):
                    part = list(ids[j:j + batch])
                    patches = torch.stack([self.patches[i] for i in part])
                    s, maps = m.score_embeddings(patches, self.grid, self.size)
                    yield part, s.numpy(), m.maps_back([self.paths[i] for i in part], maps)
        finally:
            m.bank, m.neighbourhoods = self.final

    def out_of_sample(self, scheme: str, folds: int, seed: int) -> tuple[cal_mod.OutOfSample, float]:
        t0 = time.perf_counter()
        held = cal_mod.split_images(len(self.paths), scheme, folds, seed=seed)
        banks = cal_mod.fold_banks(self.sc.projected(), self.sc.gather, self.spans, held,
                                   self.model.config.coreset_ratio, seed)
        oos = cal_mod.out_of_sample(len(self.paths),
                                    ((h, self.score(bank, h)) for h, bank in banks))
        return oos, time.perf_counter() - t0

    def in_sample(self) -> cal_mod.OutOfSample:
        ids = list(range(len(self.paths)))
        return cal_mod.out_of_sample(len(ids), [(ids, self.score(self.final[0], ids))])


def test_set(fitted: Fitted, folder: Path):
    """(labels, scores, maps, masks) of the category's test images with the final model."""
    items = mvtec_test(folder)
    pred = fitted.model.predict([i.path for i in items])
    assert len(pred.paths) == len(items)
    masks = []
    for i, amap in zip(items, pred.maps):
        masks.append(np.asarray(read_mask(i.mask)) > 0 if i.mask else
                     np.zeros(amap.shape, dtype=bool))
    return np.array([i.label for i in items]), pred.scores.astype(np.float64), pred.maps, masks


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def verdict_counts(labels, scores, t) -> tuple[int, int]:
    """(false rejects among good, misses among defective) with label = score > t."""
    return int(np.sum(scores[labels == 0] > t)), int(np.sum(scores[labels == 1] <= t))


def run_category(name: str, folder: Path, seeds: int) -> None:
    print(f"\n### {name}\n", flush=True)
    fitted = Fitted(folder)
    n = len(fitted.paths)
    fit_seconds = fitted.feature_seconds + fitted.bank_seconds
    labels, scores, maps, masks = test_set(fitted, folder)
    good, bad = int(np.sum(labels == 0)), int(np.sum(labels == 1))
    print(f"{n} good training images; test: {good} good, {bad} defective; image AUROC "
          f"{image_auroc(labels, scores):.4f}; plain fit {fit_seconds:.1f} s (features "
          f"{fitted.feature_seconds:.1f} s, coreset + neighbourhoods "
          f"{fitted.bank_seconds:.1f} s); load {os.getloadavg()[0]:.1f}\n", flush=True)
    test_good = scores[labels == 0]

    # 1-2: schemes.
    rows, chosen = [], {}
    variants = [(s, f, seed) for s, f in SCHEMES for seed in range(seeds)]
    results: dict[tuple[str, int], list] = {}
    for scheme, folds, seed in variants:
        oos, seconds = fitted.out_of_sample(scheme, folds, seed)
        print(f"  ({scheme} {folds} seed {seed}: {seconds:.1f} s, load "
              f"{os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        results.setdefault((scheme, folds), []).append((oos, seconds))
    results[("in-sample", 0)] = [(fitted.in_sample(), 0.0)]
    for (scheme, folds), runs in results.items():
        thresholds = [cal_mod.threshold_at_rate(o.scores, cal_mod.DEFAULT_FALSE_REJECT_RATE)
                      for o, _ in runs]
        above95 = [float(np.mean(test_good > np.quantile(o.scores, 0.95))) for o, _ in runs]
        fr_miss = [verdict_counts(labels, scores, t) for t in thresholds]
        label = scheme if scheme != "crossfit" else f"crossfit-{folds}"
        rows.append([label, len(runs[0][0].scores),
                     f"{np.mean([s for _, s in runs]):.1f}",
                     f"{np.median(runs[0][0].scores):.3f}",
                     f"{np.mean(above95):.1%}",
                     f"{np.mean(thresholds):.3f} ± {np.std(thresholds):.3f}",
                     " / ".join(f"{a}, {b}" for a, b in fr_miss)])
        chosen[label] = runs
    print(f"Schemes (test good median score {np.median(test_good):.3f}; thresholds at the "
          f"default rate {cal_mod.DEFAULT_FALSE_REJECT_RATE}; one column entry per seed):\n")
    print(table(["scheme", "OOS images", "extra fit s", "OOS median (seed 0)",
                 "test good above OOS p95", "threshold (mean ± sd over seeds)",
                 f"false rejects of {good}, misses of {bad} (per seed)"], rows), flush=True)

    # 3: the verdict at several rates, with the default scheme's seed-0 scores.
    default = f"{cal_mod.DEFAULT_SCHEME}-{cal_mod.DEFAULT_FOLDS}"
    oos = chosen[default][0][0]
    f1, t_oracle = f1_max(labels, scores)
    fr_o, miss_o = verdict_counts(labels, scores, t_oracle - 1e-9)  # oracle: score >= t
    rows = []
    for rate in RATES:
        c = oos.calibration(rate, cal_mod.DEFAULT_SCHEME, cal_mod.DEFAULT_FOLDS)
        mean, upper = c.rate_reached()
        fr, miss = verdict_counts(labels, scores, c.image_threshold)
        rows.append([rate, f"{c.image_threshold:.3f}", f"{mean:.2%} (≤ {upper:.1%})",
                     f"{fr} / {good}", f"{miss} / {bad}",
                     f"{t_oracle:.3f}: {fr_o} / {good}, {miss_o} / {bad} (F1 {f1:.3f})"])
    print(f"\nVerdict on the test set ({default}, seed 0):\n")
    print(table(["target rate", "image threshold", "expected rate (95 % bound)",
                 "false rejects", "misses", "oracle F1 threshold: false rejects, misses"],
                rows), flush=True)

    # 4: regions at the default rate's pixel threshold, raised from the median good pixel
    # by a factor m (m = 1: the threshold itself; the colour scale's top is m = 2), for
    # several minimum areas.
    rows = []
    c = oos.calibration(cal_mod.DEFAULT_FALSE_REJECT_RATE, cal_mod.DEFAULT_SCHEME,
                        cal_mod.DEFAULT_FOLDS)
    for m in PIXEL_FACTORS:
        t_px = c.colour_min + m * (c.pixel_threshold - c.colour_min)
        counts = {a: RegionCounts() for a in MIN_AREAS}
        for y, s, amap, truth in zip(labels, scores, maps, masks):
            everything = find_regions(amap, t_px)[1]
            for a, rc in counts.items():
                kept = find_regions(amap, t_px, a)[1] if a else everything
                rc.add(bool(y), s > c.image_threshold, kept, truth if y else None)
        for a, rc in counts.items():
            r = rc.result()
            rows.append([m, f"{t_px:.3f}", a, f"{rc.good_with_regions} / {good}",
                         _pct(r["pixel_precision"]), _pct(r["pixel_recall"]),
                         _pct(r["pixel_iou"]), _pct(r["region_hit_rate"])])
    t_px, iou_px = best_iou_threshold(labels, maps, masks)
    rows.append(["oracle (best IoU on the test set)", f"{t_px:.3f}", 0, "-", "-", "-",
                 _pct(iou_px), "-"])
    print(f"\nRegions at pixel thresholds median + m (threshold - median) ({default}, seed 0, "
          f"rate {cal_mod.DEFAULT_FALSE_REJECT_RATE}; photo size "
          f"{maps[0].shape[1]} x {maps[0].shape[0]}):\n")
    print(table(["factor m", "pixel threshold", "min area", "good images with a region",
                 "pixel precision", "pixel recall", "pixel IoU", "GT regions hit"], rows),
          flush=True)


def best_iou_threshold(labels, maps, masks, bins: int = 1024) -> tuple[float, float]:
    """The pixel threshold with the best IoU over the defective images (an oracle: it
    needs their masks), on a grid of ``bins`` thresholds."""
    bad = [i for i, y in enumerate(labels) if y]
    lo = min(float(maps[i].min()) for i in bad)
    hi = max(float(maps[i].max()) for i in bad)
    edges = np.linspace(lo, hi, bins + 1)
    inside = np.zeros(bins)
    outside = np.zeros(bins)
    for i in bad:
        inside += np.histogram(maps[i][masks[i]], edges)[0]
        outside += np.histogram(maps[i][~masks[i]], edges)[0]
    # Pixels above edge j: the counts of bins j.. (reverse cumulative sums).
    tp = np.cumsum(inside[::-1])[::-1]
    fp = np.cumsum(outside[::-1])[::-1]
    iou = tp / (fp + inside.sum())
    j = int(np.argmax(iou))
    return float(edges[j]), float(iou[j])


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--categories", nargs="+", default=["bottle", "widget", "rod"])
    ap.add_argument("--demo", default=None, help="demo data folder (default: a new one)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(_common.describe())
    print(f"start {time.strftime('%Y-%m-%d %H:%M:%S')}, load {os.getloadavg()}")
    demo = Path(args.demo) if args.demo else None
    for name in args.categories:
        if name in ("widget", "rod"):
            if demo is None:
                demo = Path(tempfile.mkdtemp(prefix="pcf-demo-"))
            if not (demo / name).is_dir():
                from patchcore_fast.demo import write_demo_data
                write_demo_data(demo, categories=(name,), overwrite=True)
            run_category(name, demo / name, args.seeds)
        else:
            run_category(name, _common.mvtec_root() / name, args.seeds)
    print(f"\nend {time.strftime('%Y-%m-%d %H:%M:%S')}, load {os.getloadavg()}")


if __name__ == "__main__":
    main()
