"""Issue #15: accuracy of each image geometry on square and elongated photos.

A sweep, not a timing: for each geometry (``--resize``, ``--image-size``, ``--crop``) fit
EfficientNet-Lite0 at 10 % on MVTec AD bottle (square photos, 900 x 900) and on the
``rod`` category of ``demo-data`` (elongated photos, 1:1 to 1:3), then score the test set
once and take the metrics both ways: at each photo's own size (``evaluate``'s default,
``--maps-at original``) and at the model's input without padding (``--maps-at crop``,
the paper's protocol). The test embeddings are computed once per model; both map
geometries come from the same input maps (``PatchCore.maps_back``).

Run from the repository root (a few minutes per bottle fit on 2 cores)::

    .venv/bin/python bench/bench_geometry.py [--out bench/geometry.md] [--only rod]

It prints the machine and versions and a Markdown table (copied into README and
bench/RESULTS.md, "CPU: geometry (issue #15)").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from patchcore_fast import PatchCore, PatchCoreConfig  # noqa: E402
from patchcore_fast import metrics  # noqa: E402
from patchcore_fast.datasets import mvtec_test  # noqa: E402
from patchcore_fast.images import image_size  # noqa: E402
from patchcore_fast.demo import write_demo_data  # noqa: E402
from patchcore_fast.evaluation import add_maps, mask_of, usable_masks  # noqa: E402
from patchcore_fast.geometry import place  # noqa: E402

#: (label, resize, image_size, crop); crop 0 = none.
GEOMETRIES = [
    ("paper: shorter 256, crop 224", "shorter", 256, 224),
    ("shorter 224, no crop", "shorter", 224, 0),
    ("longer 224, no crop (padded)", "longer", 224, 0),
    ("longer 320, no crop (padded)", "longer", 320, 0),
    ("stretch 224, no crop", "stretch", 224, 0),
    ("stretch 256, crop 224", "stretch", 256, 224),
]


def run_one(folder: Path, resize: str, size: int, crop: int) -> dict:
    """Fit on ``folder/train/good`` and evaluate on its test set at both map geometries."""
    config = PatchCoreConfig(backbone="efficientnet_lite0", coreset_ratio=0.1, device="cpu",
                             resize=resize, image_size=size, crop=crop)
    model = PatchCore(config)
    t0 = time.perf_counter()
    model.fit(folder / "train" / "good")
    fit_s = time.perf_counter() - t0
    items = usable_masks(mvtec_test(folder), [])
    by_path = {i.path: i for i in items}
    scores, kept = [], []
    pixels = {"original": {}, "crop": {}}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for paths, patches in model.embed_batches([i.path for i in items]):
            s, maps = model.score_embeddings(patches, model.grid, model.input_size)
            scores.append(s.numpy())
            done = [by_path[p] for p in paths]
            kept += done
            for at, hist in pixels.items():
                add_maps(hist, [i.defect for i in done], model.maps_back(paths, maps, at),
                         [mask_of(i, model.preprocess, at) for i in done])
    score_s = time.perf_counter() - t0
    labels = [i.label for i in kept]
    defects = [i.defect for i in kept]
    scores = np.concatenate(scores)
    row = {"image_auroc": metrics.image_auroc(labels, scores), "bank_rows":
           model.fit_stats["bank_rows"], "fit_s": fit_s, "score_s_per_image": score_s / len(kept)}
    for at, hist in pixels.items():
        r = metrics.evaluate(labels, scores, defects, pixels=hist)
        row[f"pixel_auroc_{at}"], row[f"pro_{at}"] = r["pixel_auroc"], r["pro"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--only", choices=("bottle", "rod"), help="one data set only")
    args = parser.parse_args()
    print(_common.describe(), flush=True)
    sets = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "rod":
            sets.append(("bottle", _common.mvtec_root() / "bottle"))
        if args.only != "bottle":
            write_demo_data(tmp, seed=0, categories=("rod",))
            sets.append(("rod (demo-data)", Path(tmp) / "rod"))
        lines = ["| data | geometry | image AUROC | pixel AUROC original | pixel AUROC crop | "
                 "PRO original | PRO crop | bank rows | fit s |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, folder in sets:
            photos = [image_size(p) for p in sorted(folder.rglob("*.png"))
                      if "ground_truth" not in p.parts]
            seen: dict[tuple, tuple[str, dict]] = {}
            for label, resize, size, crop in GEOMETRIES:
                # Geometries that place every photo of the set the same way (on square
                # photos shorter, longer and stretch without a crop coincide) give the same
                # model: fitted once, the row says which.
                key = tuple(place(wh, resize, size, crop) for wh in photos)
                if key in seen:
                    label = f"{label} (= {seen[key][0]})"
                    r = seen[key][1]
                else:
                    r = run_one(folder, resize, size, crop)
                    seen[key] = (label, r)
                lines.append(f"| {name} | {label} | {r['image_auroc']:.3f} | "
                             f"{r['pixel_auroc_original']:.3f} | {r['pixel_auroc_crop']:.3f} | "
                             f"{r['pro_original']:.3f} | {r['pro_crop']:.3f} | "
                             f"{r['bank_rows']:,} | {r['fit_s']:.0f} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
