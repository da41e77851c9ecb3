"""The ``patchcore-fast`` command: fit, score, evaluate, study, demo-data.

Every problem with the user's input ends the run with one line on stderr,
``patchcore-fast: error: <what is wrong>``, and exit code 2; every output file is written
atomically, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PatchCoreError, SkippedFileWarning
from .files import atomic_path, write_text

PROG = "patchcore-fast"

_FIT_EXAMPLES = f"""examples:
  {PROG} fit /data/mvtec --category bottle -o bottle.safetensors --backbone efficientnet_lite0
  {PROG} fit /data/mvtec --category all -o models/            # one model per category
  {PROG} fit photos/good -o line3.safetensors --weights wide_resnet50_2-95faca4d.pth
"""
_SCORE_EXAMPLES = f"""examples:
  {PROG} score bottle.safetensors new/*.png -o out/
  {PROG} score bottle.safetensors incoming/ -o out/ --threshold 4.2 --save-maps
"""
_EVAL_EXAMPLES = f"""examples:
  {PROG} evaluate bottle.safetensors /data/mvtec --category bottle -o eval/
  {PROG} evaluate models/ /data/mvtec --category all -o eval/   # plus summary.csv
  {PROG} evaluate line3.safetensors --good test/ok --defective test/nok --masks test/masks -o eval/
"""
_STUDY_EXAMPLES = f"""examples:
  {PROG} study /data/mvtec --category bottle --backbone efficientnet_lite0 \\
      --coreset-ratio 0.01 0.1 0.25 -o study/
"""
_DEMO_EXAMPLES = f"""examples (offline, on a fresh machine):
  {PROG} demo-data demo/
  {PROG} fit demo --category widget -o demo/widget.safetensors --backbone efficientnet_lite0
  {PROG} evaluate demo/widget.safetensors demo --category widget -o demo/eval
"""


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with the usage line dropped from errors (one line, exit code 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (auto: CUDA when available)")
    g.add_argument("--seed", type=int, default=None,
                   help="random seed of the coreset projection and start point (default 0)")
    g.add_argument("--batch-size", type=int, default=None, help="images per batch (default 8)")
    g.add_argument("--workers", type=int, default=None,
                   help="image-reading worker processes (default 0)")
    g.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="unreadable images or masks: skip (default: a warning naming each "
                        "file, a count at the end) or fail (stop with one error line)")
    g.add_argument("--temp-dir", metavar="DIR", help="folder of the temporary files that keep "
                   "memory bounded (fit: training features, images x 3.2 MB at 224 px; score "
                   "and evaluate: maps, images x 0.2 MB); default $TMPDIR; always removed")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars or messages")


def _loaded_model_options(p: argparse.ArgumentParser) -> None:
    """Options of the verbs that run a fitted model (score, evaluate)."""
    p.add_argument("--weights", metavar="FILE", help="backbone weights, if the model was "
                   "fitted with a local file that has moved")
    _common(p)


def _model_options(p: argparse.ArgumentParser, many_ratios: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="wide_resnet50_2",
                   help="wide_resnet50_2 (paper, default), resnet18, efficientnet_lite0 "
                        "(offline ImageNet weights from pip) or any timm model name")
    g.add_argument("--weights", metavar="FILE", help="local backbone state dict "
                   "(.pth/.pt/.safetensors), e.g. torchvision's wide_resnet50_2-95faca4d.pth")
    g.add_argument("--pretrained", type=_bool, default=True, metavar="true|false",
                   help="ImageNet weights (default true); false = random weights, for speed "
                        "and memory tests only")
    g.add_argument("--layers", nargs="+", metavar="LAYER",
                   help="layers to use (ResNets: layer2 layer3; timm models: stage indices); "
                        "default: the stride-8 and stride-16 stages")
    if many_ratios:
        g.add_argument("--coreset-ratio", type=_ratio, nargs="+", default=[0.01, 0.1, 0.25],
                       metavar="R", help="coreset ratios to compare (default 0.01 0.1 0.25)")
    else:
        g.add_argument("--coreset-ratio", type=_ratio, default=0.1, metavar="R",
                       help="fraction of training patches kept in the memory bank "
                            "(default 0.1; 1 keeps all)")
    g.add_argument("--image-size", type=int, default=256, help="shorter side after resizing")
    g.add_argument("--crop", type=int, default=224, help="centre crop side")
    g.add_argument("--num-neighbors", type=int, default=9,
                   help="b of the image-score reweighting (paper Eq. 7); 0 turns it off")
    g.add_argument("--embed-dim", type=int, default=1024,
                   help="pretrain and target embedding width (default 1024)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``patchcore-fast`` command."""
    parser = _Parser(prog=PROG, description="PatchCore anomaly detection (Roth et al., CVPR "
                     "2022): fit on good images, score new ones, evaluate on labelled ones.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("fit", help="fit a model on good images", epilog=_FIT_EXAMPLES,
                       formatter_class=raw, description="Fit a PatchCore memory bank on good "
                       "images: a folder of images, or an MVTec-style root with --category.")
    p.add_argument("data", help="folder of good images, or MVTec-style root / category folder")
    p.add_argument("--category", nargs="+", metavar="C",
                   help="MVTec categories under DATA (several, or 'all')")
    p.add_argument("-o", "--output", required=True, metavar="MODEL",
                   help="model file (.safetensors), or a folder for several categories")
    g = p.add_argument_group("memory")
    g.add_argument("--in-memory", action="store_true", help="hold every training patch in "
                   "memory instead (images x 3.2 MB of RAM at 224 px; same bank)")
    _model_options(p)
    _common(p)

    p = sub.add_parser("score", help="score images with a fitted model", epilog=_SCORE_EXAMPLES,
                       formatter_class=raw, description="Score images: writes scores.csv, "
                       "scores.json and a heatmap overlay per image.")
    p.add_argument("model", help="model file written by fit")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--threshold", type=float, help="image score above which an image is "
                   "labelled anomalous (e.g. f1_threshold from evaluate's metrics.json)")
    p.add_argument("--save-maps", action="store_true", help="also write each raw map as .npy")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlay PNGs")
    p.add_argument("--resume", action="store_true", help="skip the images already scored "
                   "in OUTDIR (by an earlier run, finished or killed)")
    _loaded_model_options(p)

    p = sub.add_parser("evaluate", help="metrics on labelled test images",
                       epilog=_EVAL_EXAMPLES, formatter_class=raw,
                       description="Evaluate a model: metrics.json (image AUROC, pixel AUROC, "
                       "PRO, F1-max), roc.png, scores.csv and overlays.")
    p.add_argument("model", help="model file, or the folder of per-category models")
    p.add_argument("data", nargs="?", help="MVTec-style root or category folder")
    p.add_argument("--category", nargs="+", metavar="C", help="categories (several, or 'all')")
    p.add_argument("--good", metavar="DIR", help="folder of good test images (folder layout)")
    p.add_argument("--defective", metavar="DIR", help="folder of defective test images, or "
                   "of one sub-folder per defect type")
    p.add_argument("--masks", metavar="DIR", help="ground-truth masks named like the images")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlay PNGs")
    p.add_argument("--save-maps", action="store_true", help="also write each raw map as "
                   "maps/<defect>/<image>.npy (crop x crop float32)")
    _loaded_model_options(p)

    p = sub.add_parser("study", help="accuracy and fit time against the coreset ratio",
                       epilog=_STUDY_EXAMPLES, formatter_class=raw,
                       description="Fit and evaluate at several coreset ratios (features are "
                       "extracted once); writes study.csv, study.json and study.png.")
    p.add_argument("data", help="MVTec-style root or category folder")
    p.add_argument("--category", nargs="+", metavar="C", help="categories (several, or 'all')")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    _model_options(p, many_ratios=True)
    _common(p)

    p = sub.add_parser("demo-data", help="write a small synthetic MVTec-style data set",
                       epilog=_DEMO_EXAMPLES, formatter_class=raw,
                       description="Write a seeded synthetic data set (category 'widget': "
                       "textured discs, with scratches and spots as defects, and masks).")
    p.add_argument("output", metavar="DIR", help="folder to write (MVTec layout)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quiet", "-q", action="store_true", help="no messages")
    return parser


# ----- helpers ------------------------------------------------------------------------

class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message).strip().splitlines()
    print(f"{PROG}: warning: {text[0] if text else category.__name__}", file=sys.stderr,
          flush=True)


def _config_from_args(args: argparse.Namespace, ratio: float | None = None):
    from .model import PatchCoreConfig

    config = PatchCoreConfig(
        backbone=args.backbone, layers=args.layers, weights=args.weights,
        pretrained=args.pretrained, image_size=args.image_size, crop=args.crop,
        coreset_ratio=args.coreset_ratio if ratio is None else ratio,
        num_neighbors=args.num_neighbors, pretrain_embed_dim=args.embed_dim,
        target_embed_dim=args.embed_dim, device=args.device)
    _runtime(config, args)
    if args.weights and not Path(args.weights).is_file():
        raise PatchCoreError(f"weights file {args.weights} does not exist")
    return config


def _runtime(config, args: argparse.Namespace) -> None:
    if args.seed is not None:
        config.seed = args.seed
    if args.batch_size is not None:
        config.batch_size = args.batch_size
    if args.workers is not None:
        config.num_workers = args.workers
    config.device = args.device
    config.validate()


def _load(path: str | Path, args: argparse.Namespace):
    from .model import PatchCore

    model = PatchCore.load(path, device=args.device, weights=getattr(args, "weights", None))
    _runtime(model.config, args)
    return model


def _overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Blend a jet-coloured map onto the image (half and half where the map is high)."""
    import matplotlib

    t = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colour = matplotlib.colormaps["jet"](t)[..., :3] * 255.0
    alpha = 0.25 + 0.35 * t[..., None]
    return np.clip((1 - alpha) * image + alpha * colour, 0, 255).astype(np.uint8)


def _write_overlay(path: Path, source: Path, amap: np.ndarray, preprocess, vmin: float,
                   vmax: float) -> None:
    from PIL import Image

    from .data import read_image

    img = preprocess.display(read_image(source)).astype(np.float64)
    with atomic_path(path) as tmp:
        Image.fromarray(_overlay(img, amap, vmin, vmax)).save(tmp, format="PNG")


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _unique_names(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return names


def _map_range(pixels) -> tuple[float, float]:
    """Colour scale of the overlays: the 1st and 99.9th percentile of all map pixels.

    Args:
        pixels (metrics.PixelHistogram): every pixel of the maps drawn.
    """
    return pixels.quantile(0.01), pixels.quantile(0.999)


# ----- verbs --------------------------------------------------------------------------


def _mvtec_categories(data: Path, category: list[str] | None) -> list[tuple[str, Path]] | None:
    """(name, folder) of the MVTec-style categories that DATA and --category name; None when
    DATA is neither a data set root with --category nor a category folder itself."""
    from .data import is_mvtec_category, resolve_categories

    if not data.exists():
        raise PatchCoreError(f"data folder {data} does not exist")
    if category:
        return resolve_categories(data, category)
    if is_mvtec_category(data):
        return [(data.name, data)]
    return None


def _fit_targets(args: argparse.Namespace) -> list[tuple[str, Path, Path]]:
    """(name, training folder, model file) per model to fit."""
    data, out = Path(args.data), Path(args.output)
    cats = _mvtec_categories(data, args.category)
    if cats is None:
        if not data.is_dir():
            raise PatchCoreError(f"{data} is not a folder of images")
        name = out.stem
        if out.suffix != ".safetensors":
            out = out / f"{data.name}.safetensors"
        return [(name, data, out)]
    many = len(cats) > 1 or out.suffix != ".safetensors"
    return [(n, d / "train" / "good", out / f"{n}.safetensors" if many else out)
            for n, d in cats]


def cmd_fit(args: argparse.Namespace, log: _Log) -> int:
    from .model import PatchCore

    config = _config_from_args(args)
    targets = _fit_targets(args)
    if not config.pretrained and not config.weights:
        print(f"{PROG}: warning: --pretrained false: random backbone weights, for speed and "
              f"memory tests only (scores are not meaningful)", file=sys.stderr)
    for name, folder, out in targets:
        if not folder.is_dir():
            raise PatchCoreError(f"training folder {folder} does not exist")
    for name, folder, out in targets:
        skipped: list[str] = []
        model = PatchCore(config)
        log(f"fit {name}: {folder} ({config.backbone}, coreset ratio {config.coreset_ratio}, "
            f"device {model.device})")
        model.fit(folder, skipped=skipped, progress=not args.quiet,
                  streaming=not args.in_memory, temp_dir=args.temp_dir)
        model.save(out)
        s = model.fit_stats
        log(f"wrote {out}: {s['bank_rows']:,} of {s['patches']:,} patches x {s['embed_dim']} "
            f"from {s['images']} images in {s['fit_seconds']:.1f} s"
            + (f"; skipped {len(skipped)} unreadable files" if skipped else ""))
    return 0


JOURNAL = ".scores.partial.csv"  # score's progress, for --resume (removed at the end)


def _read_done(out: Path) -> dict[str, float]:
    """Scores already in ``out`` (a finished scores.csv and/or the journal of a killed run).

    A journal line cut short by the kill (no newline yet) is ignored: that image is scored
    again.
    """
    done: dict[str, float] = {}
    for name in ("scores.csv", JOURNAL):
        f = out / name
        if not f.is_file():
            continue
        text = f.read_text(encoding="utf-8")
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        for row in csv.DictReader(io.StringIO(text)):
            try:
                done[row["file"]] = float(row["score"])
            except (KeyError, TypeError, ValueError):
                raise PatchCoreError(f"{f} is not a scores file of patchcore-fast; "
                                     f"score into another folder or without --resume") from None
    return done


def cmd_score(args: argparse.Namespace, log: _Log) -> int:
    from .data import list_images
    from .files import ArraySpool
    from .metrics import PixelHistogram

    model = _load(args.model, args)
    out = Path(args.output)
    skipped: list[str] = []
    inputs = list_images(args.inputs, "input", skipped)
    # Names from the whole input list, so that a resumed run names files the same way.
    names = dict(zip(inputs, _unique_names(inputs)))
    done = _read_done(out) if args.resume else {}
    todo = [p for p in inputs if str(p) not in done]
    if done:
        log(f"resuming: {len(inputs) - len(todo)} of {len(inputs)} images already scored")
    images = not args.no_overlays or args.save_maps
    crop = model.config.crop
    new: dict[str, float] = {}
    # Pass 1 scores batch by batch; each batch's maps go to an anonymous temporary file
    # (never all in memory) and into a histogram of their pixels that sets the colour
    # scale. Pass 2 writes the images. An image enters the journal once its files are
    # written, so a killed run resumes exactly where its outputs stop.
    with ArraySpool((crop, crop), np.float32, args.temp_dir, "map file") as spool:
        order: list[Path] = []
        pixels = PixelHistogram()
        journal = None

        def record(paths: Sequence[Path]) -> None:
            # Opened at the first finished image: a run that fails before leaves no file.
            nonlocal journal
            if journal is None:
                out.mkdir(parents=True, exist_ok=True)
                fresh = not (args.resume and (out / JOURNAL).is_file())
                journal = open(out / JOURNAL, "w" if fresh else "a", encoding="utf-8",
                               newline="")
                if fresh:
                    journal.write("file,score\n")
            csv.writer(journal, lineterminator="\n").writerows(
                [[str(p), new[str(p)]] for p in paths])
            journal.flush()

        try:
            for paths, scores, maps in (model.predict_batches(todo, skipped,
                                                              progress=not args.quiet)
                                        if todo else ()):
                for path, score in zip(paths, scores.tolist()):
                    new[str(path)] = score
                order += paths
                if images:
                    spool.append(maps)
                    for amap in maps:
                        pixels.add(amap)
                else:
                    record(paths)
            if images and order:
                vmin, vmax = _map_range(pixels)
                for i, path in enumerate(order):
                    amap = spool.read(i)[0]
                    name = names[path]
                    if not args.no_overlays:
                        _write_overlay(out / "overlays" / f"{name}.png", path, amap,
                                       model.preprocess, vmin, vmax)
                    if args.save_maps:
                        _write_npy(out / "maps" / f"{name}.npy", amap)
                    record([path])
        finally:
            if journal is not None:
                journal.close()
    scores = {**done, **new}
    if not scores:
        raise PatchCoreError("none of the input images could be read")
    thr = args.threshold
    rows, records = [], []
    for path in inputs:
        if str(path) not in scores:
            continue
        rec = {"file": str(path), "score": scores[str(path)]}
        if thr is not None:
            rec["label"] = "anomalous" if rec["score"] >= thr else "good"
        records.append(rec)
        rows.append([rec[k] for k in rec])
    header = ["file", "score"] + (["label"] if thr is not None else [])
    write_text(out / "scores.csv", _csv_text(header, rows))
    write_text(out / "scores.json", json.dumps(
        {"model": str(args.model), "threshold": thr, "images": records, "skipped": skipped},
        indent=2))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / JOURNAL)
    log(f"scored {len(new)} images -> {out}/scores.csv"
        + (f" ({len(records) - len(new)} from the earlier run)" if args.resume else "")
        + (f"; skipped {len(skipped)} unreadable files" if skipped else ""))
    return 0


def _eval_sets(args: argparse.Namespace) -> list[tuple[str, Path | None, list, list[str]]]:
    """(name, model file, test images, skipped) per evaluation."""
    from .data import folder_test, mvtec_test

    model = Path(args.model)
    if args.good or args.defective:
        if not (args.good and args.defective):
            raise PatchCoreError("the folder layout needs both --good and --defective")
        skipped: list[str] = []
        items = folder_test(args.good, args.defective, args.masks, skipped)
        return [(model.stem, model, items, skipped)]
    if not args.data:
        raise PatchCoreError("give DATA (MVTec-style) or --good and --defective folders")
    data = Path(args.data)
    cats = _mvtec_categories(data, args.category)
    if cats is None:
        raise PatchCoreError(f"{data} is not an MVTec-style category (no train/good); give "
                             f"--category, or --good and --defective folders")
    out = []
    for name, folder in cats:
        skipped = []
        items = mvtec_test(folder, skipped)
        file = model / f"{name}.safetensors" if model.is_dir() else model
        if len(cats) > 1 and not model.is_dir():
            raise PatchCoreError(f"several categories need MODEL to be the folder of "
                                 f"<category>.safetensors files, got {model}")
        out.append((name, file, items, skipped))
    return out


def _usable_masks(items, skipped: list[str]) -> list:
    """The test images whose mask (if any) is readable and as large as the image.

    A mask of another size cannot be aligned with its image (resizing it would move the
    defect), so the image is left out with a warning naming both files, like an unreadable
    one (or, with ``--on-error fail``, the run stops).
    """
    from .data import UnreadableImage, image_size, warn_skipped

    out = []
    for i in items:
        if i.mask is not None:
            try:
                mask_wh = image_size(i.mask)
                why = None
                try:
                    image_wh = image_size(i.path)
                except UnreadableImage:
                    image_wh = None  # the image itself is reported when it is read
                if image_wh is not None and mask_wh != image_wh:
                    why = (f"its mask {i.mask} is {mask_wh[0]} x {mask_wh[1]}, the image "
                           f"{image_wh[0]} x {image_wh[1]}")
            except UnreadableImage as exc:
                why = f"its mask {i.mask} cannot be read ({exc})"
            if why is not None:
                warn_skipped(i.path, why)
                skipped.append(str(i.path))
                continue
        out.append(i)
    return out


def _mask_of(item, preprocess) -> np.ndarray:
    """Ground truth of one test image at crop resolution (all False without a mask)."""
    from .data import UnreadableImage, read_mask

    try:
        m = read_mask(item.mask) if item.mask else None
    except UnreadableImage as exc:
        raise PatchCoreError(f"cannot read mask {item.mask}: {exc}") from None
    return preprocess.mask(m).numpy()


def _has_ground_truth(kept) -> bool:
    """Pixel metrics need a mask for every defective image (good ones may have none)."""
    return any(i.mask for i in kept) and all(i.mask for i in kept if i.label)


def _evaluate_one(name: str, model, items, skipped: list[str], out: Path, args, log: _Log
                  ) -> dict:
    from . import metrics
    from .files import ArraySpool
    from .metrics import PixelHistogram

    items = _usable_masks(items, skipped)
    by_path = {i.path: i for i in items}
    crop = model.config.crop
    kept, scores = [], []
    # Bounded memory: each map is counted into the histogram of its defect type (pixel
    # AUROC, PRO, colour scale) and parked in a temporary file for the overlays; no
    # array of all maps or masks is ever built.
    pixels: dict[str, PixelHistogram] = {}
    seconds = 0.0
    with ArraySpool((crop, crop), np.float32, args.temp_dir, "map file") as spool:
        batches = model.predict_batches([i.path for i in items], skipped,
                                        progress=not args.quiet)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            seconds += time.perf_counter() - t0  # scoring time (not the bookkeeping)
            if batch is None:
                break
            paths, batch_scores, maps = batch
            for path, amap in zip(paths, maps):
                item = by_path[path]
                kept.append(item)
                pixels.setdefault(item.defect, PixelHistogram()).add(
                    amap, _mask_of(item, model.preprocess) if item.mask else None)
            scores.append(batch_scores)
            if not args.no_overlays or args.save_maps:
                spool.append(maps)
        if not kept:
            raise PatchCoreError(f"none of the test images of {name} could be read")
        scores_arr = np.concatenate(scores)
        labels = [i.label for i in kept]
        truth = _has_ground_truth(kept)
        result = metrics.evaluate(labels, scores_arr, [i.defect for i in kept],
                                  pixels=pixels if truth else None)
        result = {"category": name, **result, "skipped": skipped,
                  "score_seconds": seconds, "seconds_per_image": seconds / len(kept),
                  "model": {"file": str(args.model),
                            "config": json.loads(model.config.to_json()),
                            "fit_stats": model.fit_stats}}
        everything = PixelHistogram.combined(list(pixels.values()))
        vmin, vmax = _map_range(everything)
        for i, item in enumerate(kept if spool.count else ()):
            amap = spool.read(i)[0]
            if not args.no_overlays:
                _write_overlay(out / "overlays" / item.defect / f"{item.path.stem}.png",
                               item.path, amap, model.preprocess, vmin, vmax)
            if args.save_maps:
                _write_npy(out / "maps" / item.defect / f"{item.path.stem}.npy", amap)
    write_text(out / "scores.csv", _csv_text(
        ["file", "defect", "label", "score"],
        [[str(i.path), i.defect, i.label, s] for i, s in zip(kept, scores_arr.tolist())]))
    metrics.save_roc_plot(out / "roc.png", labels, scores_arr, everything if truth else None,
                          title=name)
    write_text(out / "metrics.json", json.dumps(result, indent=2))
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    log(f"{name}: image AUROC {fmt(result['image_auroc'])}, pixel AUROC "
        f"{fmt(result['pixel_auroc'])}, PRO {fmt(result['pro'])}, F1-max "
        f"{fmt(result['f1_max'])} ({len(kept)} images, {seconds:.1f} s) -> {out}/metrics.json")
    return result


def _write_summary(out: Path, results: list[dict], extra_cols: Sequence[str] = ()) -> None:
    keys = ["image_auroc", "pixel_auroc", "pro", "f1_max", *extra_cols]
    rows = [[r["category"]] + [r.get(k) for k in keys] for r in results]
    mean = []
    for j, _ in enumerate(keys):
        vals = [row[j + 1] for row in rows if row[j + 1] is not None]
        mean.append(float(np.mean(vals)) if vals else None)
    rows.append(["mean"] + mean)
    write_text(out / "summary.csv", _csv_text(["category", *keys], rows))
    write_text(out / "summary.json", json.dumps(
        {"categories": {r[0]: dict(zip(keys, r[1:])) for r in rows[:-1]},
         "mean": dict(zip(keys, mean))}, indent=2))
    lines = ["| category | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in rows:
        lines.append("| " + " | ".join([row[0]] + ["" if v is None else f"{v:.4f}"
                                                    for v in row[1:]]) + " |")
    write_text(out / "summary.md", "\n".join(lines) + "\n")


def cmd_evaluate(args: argparse.Namespace, log: _Log) -> int:
    sets = _eval_sets(args)
    for name, file, _, _ in sets:
        if not file.is_file():
            raise PatchCoreError(f"model file {file} does not exist")
    out = Path(args.output)
    results = []
    for name, file, items, skipped in sets:
        model = _load(file, args)
        sub = out / name if len(sets) > 1 else out
        results.append(_evaluate_one(name, model, items, skipped, sub, args, log))
    if len(sets) > 1:
        _write_summary(out, results)
        log(f"summary of {len(results)} categories -> {out}/summary.csv")
    return 0


def cmd_study(args: argparse.Namespace, log: _Log) -> int:
    import torch

    from . import metrics
    from .data import mvtec_test
    from .files import ArraySpool
    from .metrics import PixelHistogram
    from .model import PatchCore

    data = Path(args.data)
    cats = _mvtec_categories(data, args.category)
    if cats is None:
        raise PatchCoreError(f"{data} is not an MVTec-style category; give --category")
    ratios = sorted(set(args.coreset_ratio))
    out = Path(args.output)
    base = _config_from_args(args, ratio=ratios[0])
    rows = []
    for name, folder in cats:
        skipped: list[str] = []
        items = _usable_masks(mvtec_test(folder, skipped), skipped)
        by_path = {i.path: i for i in items}
        model = PatchCore(base)
        crop = base.crop
        # Bounded memory: the test embeddings (scored again at every ratio) and their
        # masks wait in temporary files; the training features stream through the fit
        # once (PatchCore.fit_each_ratio) and every ratio's bank is read back from there.
        with contextlib.ExitStack() as stack:
            t0 = time.perf_counter()
            embeddings = masks = None
            kept = []
            for paths, patches in model.embed_batches([i.path for i in items], skipped,
                                                      not args.quiet, f"{name}: test features"):
                if embeddings is None:
                    embeddings = stack.enter_context(ArraySpool(
                        patches.shape[1:], np.float32, args.temp_dir, "test-feature file"))
                    masks = stack.enter_context(ArraySpool((crop, crop), np.bool_,
                                                           args.temp_dir, "mask file"))
                embeddings.append(patches.float().cpu().numpy())
                kept += [by_path[p] for p in paths]
                masks.append(np.stack([_mask_of(by_path[p], model.preprocess)
                                       for p in paths]))
            if not kept:
                raise PatchCoreError(f"none of the test images of {name} could be read")
            test_seconds = time.perf_counter() - t0
            grid = model.grid
            labels = [i.label for i in kept]
            defects = [i.defect for i in kept]
            truth = _has_ground_truth(kept)
            for ratio in model.fit_each_ratio(folder / "train" / "good", ratios, skipped,
                                              not args.quiet, args.temp_dir):
                t0 = time.perf_counter()
                scores, pixels, at = [], {}, 0
                for batch in embeddings.batches(base.batch_size):
                    s, maps = model.score_embeddings(
                        torch.from_numpy(batch).to(model.device), grid)
                    scores.append(s.numpy())
                    for amap, mask in zip(maps.numpy(), masks.read(at, at + len(batch))):
                        pixels.setdefault(defects[at], PixelHistogram()).add(amap, mask)
                        at += 1
                score_s = time.perf_counter() - t0 + test_seconds
                scores = np.concatenate(scores)
                r = metrics.evaluate(labels, scores, defects, pixels=pixels if truth else None)
                st = model.fit_stats
                rows.append({"category": name, "coreset_ratio": ratio,
                             "bank_rows": st["bank_rows"],
                             "image_auroc": r["image_auroc"], "pixel_auroc": r["pixel_auroc"],
                             "pro": r["pro"], "f1_max": r["f1_max"],
                             "fit_seconds": st["fit_seconds"],
                             "coreset_seconds": st["coreset_seconds"],
                             "score_seconds_per_image": score_s / len(kept)})
                log(f"{name} ratio {ratio}: image AUROC {r['image_auroc']}, pixel AUROC "
                    f"{r['pixel_auroc']}, PRO {r['pro']}, fit {st['fit_seconds']:.1f} s")
    keys = list(rows[0])
    write_text(out / "study.csv", _csv_text(keys, [[r[k] for k in keys] for r in rows]))
    write_text(out / "study.json", json.dumps({"config": json.loads(base.to_json()),
                                               "rows": rows}, indent=2))
    _study_plot(out / "study.png", rows)
    log(f"study of {len(ratios)} ratios -> {out}/study.csv, study.png")
    return 0


def _study_plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for cat in sorted({r["category"] for r in rows}):
        sel = [r for r in rows if r["category"] == cat]
        x = [r["coreset_ratio"] for r in sel]
        for key, style in (("image_auroc", "o-"), ("pixel_auroc", "s--")):
            y = [np.nan if r[key] is None else r[key] for r in sel]
            ax.plot(x, y, style, label=f"{cat} {key.replace('_', ' ')}")
        ax2.plot(x, [r["fit_seconds"] for r in sel], "o-", label=cat)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xlabel("coreset ratio")
        a.legend(fontsize=8)
    ax.set_ylabel("AUROC")
    ax2.set_ylabel("fit time (s)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def cmd_demo_data(args: argparse.Namespace, log: _Log) -> int:
    from .demo import write_demo_data

    counts = write_demo_data(args.output, seed=args.seed)
    log(f"wrote synthetic category 'widget' to {args.output}: " +
        ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


_VERBS = {"fit": cmd_fit, "score": cmd_score, "evaluate": cmd_evaluate, "study": cmd_study,
          "demo-data": cmd_demo_data}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``patchcore-fast`` console script.

    Returns:
        exit code: 0 on success, 2 on a user error (one line on stderr).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse errors
        return int(exc.code or 0)
    log = _Log(getattr(args, "quiet", False))
    fail = getattr(args, "on_error", "skip") == "fail"
    with warnings.catch_warnings():
        # --on-error fail turns the first skipped file into an exception, raised where the
        # file is met: nothing after it is computed and no output file is written.
        warnings.simplefilter("error" if fail else "always", SkippedFileWarning)
        warnings.showwarning = _show_warning
        try:
            return _VERBS[args.verb](args, log)
        except SkippedFileWarning as exc:
            why = str(exc).strip().splitlines()[0].removeprefix("skipping ")
            print(f"{PROG}: error: cannot use {why} (--on-error fail; --on-error skip leaves "
                  f"such files out)", file=sys.stderr)
            return 2
        except PatchCoreError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # disk full, permission denied, ...
            print(f"{PROG}: error: {exc.strerror or exc}"
                  + (f": {exc.filename}" if getattr(exc, "filename", None) else ""),
                  file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
