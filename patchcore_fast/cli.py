"""The ``patchcore-fast`` command: fit, score, evaluate, study, demo-data, export.

Every problem with the user's input ends the run with one line on stderr,
``patchcore-fast: error: <what is wrong>``, and exit code 2; every output file is written
atomically, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from . import datasets, distributed, evaluation, outputs, score_run
from ._version import __version__
from .config import PatchCoreConfig, resolve_device
from .datasets import list_images, mvtec_categories
from .demo import write_demo_data
from .errors import (InputWarning, PatchCoreError, SkippedFileWarning, first_line,
                     os_error_text, out_of_memory)
from .files import check_outputs, check_temp_dir, file_problem, output_lock
from .geometry import DEFAULT_CROP, DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE, MAPS_AT, RESIZE_MODES
from .calibration import (DEFAULT_FALSE_REJECT_RATE, MAX_FALSE_REJECT_RATE,
                          denormalise, normalise)
from .model import PatchCore
from .streams import guarded_streams

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
_EXPORT_EXAMPLES = f"""examples:
  {PROG} export bottle.safetensors -o bottle.onnx
  python -m patchcore_fast.onnx_example bottle.onnx photo.png   # onnxruntime, numpy, Pillow
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


def _number(kind: type, ok, expected: str):
    """An argparse type: ``kind(text)`` within ``ok``, else one line saying what is."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_ratio = _number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
_neighbours = _number(int, lambda v: v == 0 or v >= 2, "0 (off) or at least 2 (with 1 the "
                      "nearest bank row is its own only neighbour and every score is 0)")
_rate = _number(float, lambda v: 0.0 < v <= MAX_FALSE_REJECT_RATE,
                f"a false-reject rate in (0, {MAX_FALSE_REJECT_RATE}], e.g. 0.01 for 1 %")
_unit = _number(float, lambda v: 0.0 < v < 1.0, "a normalised score in (0, 1)")
# NaN would label every image good and is not JSON; inf labels all alike.
_finite = _number(float, math.isfinite, "a finite number")
# At most 30 days: datetime.timedelta (the process group's timeout) overflows near 1e14 s.
_MAX_SECONDS = 30 * 24 * 3600
_seconds = _number(float, lambda v: 0.0 < v <= _MAX_SECONDS,
                   f"a positive number of seconds, at most {_MAX_SECONDS:,} (30 days)")
_seed = _number(int, lambda v: 0 <= v < 2 ** 64, "an integer from 0 to 2**64 - 1 (a 64-bit "
                "seed)")


def _categories(p: argparse.ArgumentParser) -> None:
    p.add_argument("--category", nargs="+", metavar="C", type=_category,
                   help="MVTec categories under DATA (several, or 'all')")


def _category(text: str) -> str:
    name = text.rstrip("/\\")  # a shell completion's trailing slash: "widget/"
    if not name or name in (".", "..") or any(c in name for c in "/\\"):
        raise argparse.ArgumentTypeError(f"a category is the name of a folder under DATA, "
                                         f"not a path, got {text!r}")
    return name


def _crop_arg(text: str) -> int:
    value = text.strip().lower()
    if value in ("none", "0"):
        return 0
    try:
        crop = int(value)
    except ValueError:
        crop = -1
    if crop < 0:
        raise argparse.ArgumentTypeError(f"expected a crop side in pixels, or none, got {text!r}")
    return crop


def add_maps_at_option(group) -> None:
    """``--maps-at`` of ``evaluate`` and ``study``."""
    group.add_argument("--maps-at", choices=MAPS_AT, default="original",
                       help="original (default): maps and pixel metrics at each photo's own "
                            "size, every pixel of its mask; crop: at the model's input, "
                            "padding left out (the paper's protocol)")


def add_geometry_options(group, maps_at: bool = False) -> None:
    """The geometry options of ``fit`` and ``study`` (saved in the model); ``maps_at``
    adds :func:`add_maps_at_option` (study)."""
    if maps_at:
        add_maps_at_option(group)
    group.add_argument("--resize", choices=RESIZE_MODES, default=DEFAULT_RESIZE,
                       help=f"longer: longer side to --image-size, on a padded square "
                            f"(padding ignored by maps and metrics); shorter: shorter side to "
                            f"--image-size, then --crop (the paper: shorter 256, crop 224); "
                            f"stretch: both sides, aspect not kept (default {DEFAULT_RESIZE})")
    group.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                       help=f"target side of --resize (default {DEFAULT_IMAGE_SIZE})")
    group.add_argument("--crop", type=_crop_arg, default=DEFAULT_CROP, metavar="PX|none",
                       help=f"centre crop side; none or 0: the whole resized image, maps "
                            f"cover the whole photo (default {DEFAULT_CROP or 'none'})")


_PATH_ARGUMENTS = ("data", "model", "inputs", "output", "good", "defective", "masks",
                   "temp_dir", "weights")


def _empty_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The first file or folder argument given as "" (``-o "$UNSET"``: the current folder
    to the operating system), named as ``--help`` names it, or None."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[args.verb]._actions:
        given = getattr(args, action.dest, None) if action.dest in _PATH_ARGUMENTS else None
        if given == "" or (isinstance(given, list) and "" in given):
            return "/".join(action.option_strings) or action.metavar or action.dest
    return None


class _Parser(argparse.ArgumentParser):
    """argparse with the usage line dropped from errors (one line, exit code 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """Run options. ``seed=False``: the verbs that load a fitted model, which keeps its
    seed, and whose omitted runtime options keep the model's saved settings."""
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (auto: CUDA when available)")
    if seed:  # a fitted model keeps the seed it was fitted with
        g.add_argument("--seed", type=_seed, default=None, help="random seed of the coreset "
                       "projection and start point (default 0)")

    def default(value: str) -> str:
        return f"default {value}" if seed else "default: the model's saved setting"

    g.add_argument("--batch-size", type=int, default=None,
                   help=f"images per batch ({default('8')})")
    g.add_argument("--workers", type=int, default=None,
                   help=f"image-reading worker processes ({default('0')})")
    g.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help=f"the backbone's arithmetic: fp32 or bf16 (autocast, channels-last: "
                        f"faster on GPUs and CPUs with bf16 units, same AUROC; "
                        f"{default('fp32')})")
    g.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="unreadable images or masks: skip (default: a warning naming each "
                        "file, a count at the end) or fail (stop with one error line)")
    g.add_argument("--temp-dir", metavar="DIR", help="folder of the temporary files that keep "
                   "memory bounded (fit: training features, images x 3.2 MB at 224 px; score "
                   "and evaluate: maps, 4 bytes a photo pixel); default $TMPDIR; always removed")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars or messages")
    g.add_argument("--dist-timeout", type=_seconds, default=1800.0, metavar="S",
                   help="under torchrun: seconds a collective waits for the other processes "
                        "before the run fails (default 1800)")


def _loaded_model_options(p: argparse.ArgumentParser) -> None:
    """Options of the verbs that run a fitted model (score, evaluate)."""
    p.add_argument("--weights", metavar="FILE", help="backbone weights, if the model was "
                   "fitted with a local file that has moved")
    p.add_argument("--bank-shards", action="store_true", help="under torchrun: split the "
                   "memory bank across the processes (each holds 1/N of it on its device and "
                   "every process embeds every image; for banks that do not fit one device; "
                   "same scores)")
    _common(p, seed=False)


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
    add_geometry_options(g, maps_at=many_ratios)
    g.add_argument("--num-neighbors", type=_neighbours, default=9,
                   help="b of the reweighting (paper Eq. 7): 0 (off) or at least 2 (default 9)")
    g.add_argument("--embed-dim", type=int, default=1024,
                   help="pretrain and target embedding width (default 1024)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``patchcore-fast`` command."""
    parser = _Parser(prog=PROG, description="PatchCore anomaly detection (Roth et al., CVPR "
                     "2022): fit on good images, score new ones, evaluate on labelled ones.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser, required=True)
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("fit", help="fit a model on good images", epilog=_FIT_EXAMPLES,
                       formatter_class=raw, description="Fit a PatchCore memory bank on good "
                       "images: a folder of images, or an MVTec-style root with --category.")
    p.add_argument("data", nargs="+", metavar="DATA", help="folder of good images, or "
                   "MVTec-style root / category folder; with --update: the new good images "
                   "(files and/or folders)")
    p.add_argument("--update", metavar="MODEL", help="add the good images DATA to the fitted "
                   "MODEL (its bank is kept, rows for the new images added, its calibration "
                   "extended) and write the result to -o; the model's settings are kept")
    _categories(p)
    p.add_argument("-o", "--output", required=True, metavar="MODEL",
                   help="model file (.safetensors), or a folder for several categories")
    g = p.add_argument_group("memory")
    g.add_argument("--in-memory", action="store_true", help="hold every training patch in "
                   "memory instead (images x 3.2 MB of RAM at 224 px; same bank)")
    g = p.add_argument_group("verdict")
    g.add_argument("--false-reject-rate", type=_rate, default=DEFAULT_FALSE_REJECT_RATE,
                   metavar="RATE", help="calibrate the image threshold so that this share of "
                   "good images is rejected, estimated out of sample from the good images "
                   f"themselves (5-fold cross-fitting); in (0, 0.5], default "
                   f"{DEFAULT_FALSE_REJECT_RATE}")
    _model_options(p)
    _common(p)

    p = sub.add_parser("score", help="score images with a fitted model", epilog=_SCORE_EXAMPLES,
                       formatter_class=raw, description="Score images: writes scores.csv, "
                       "scores.json and a heatmap overlay per image.")
    p.add_argument("model", metavar="MODEL", help="model file written by fit")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--threshold", type=_finite, help="raw image score at or above which an "
                   "image is labelled defective, instead of the model's calibrated threshold "
                   "(e.g. f1_threshold from evaluate's metrics.json)")
    p.add_argument("--normalised-threshold", type=_unit, metavar="N", help="the same as a "
                   "normalised score in (0, 1) (0.5 is the model's calibrated threshold; "
                   "needs a calibrated model)")
    p.add_argument("--save-maps", action="store_true", help="also write each raw map as .npy")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlay PNGs")
    p.add_argument("--resume", action="store_true", help="skip the images already scored "
                   "in OUTDIR (by an earlier run, finished or killed)")
    _loaded_model_options(p)

    p = sub.add_parser("evaluate", help="metrics on labelled test images",
                       epilog=_EVAL_EXAMPLES, formatter_class=raw,
                       description="Evaluate a model: metrics.json (image AUROC, pixel AUROC, "
                       "PRO, F1-max), roc.png, scores.csv and overlays.")
    p.add_argument("model", metavar="MODEL", help="model file, or folder of category models")
    p.add_argument("data", nargs="?", metavar="DATA", help="MVTec-style root or category folder")
    _categories(p)
    p.add_argument("--good", metavar="DIR", help="folder of good test images (folder layout)")
    p.add_argument("--defective", metavar="DIR", help="folder of defective test images, or "
                   "of one sub-folder per defect type")
    p.add_argument("--masks", metavar="DIR", help="ground-truth masks named like the images")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlay PNGs")
    p.add_argument("--save-maps", action="store_true", help="also write each raw map as "
                   "maps/<defect>/<image>.npy (float32, as --maps-at)")
    add_maps_at_option(p)
    _loaded_model_options(p)

    p = sub.add_parser("study", help="accuracy and fit time against the coreset ratio",
                       epilog=_STUDY_EXAMPLES, formatter_class=raw,
                       description="Fit and evaluate at several coreset ratios (features are "
                       "extracted once); writes study.csv, study.json and study.png.")
    p.add_argument("data", metavar="DATA", help="MVTec-style root or category folder")
    _categories(p)
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    _model_options(p, many_ratios=True)
    _common(p)

    p = sub.add_parser("export", help="write a fitted model as one ONNX graph",
                       epilog=_EXPORT_EXAMPLES, formatter_class=raw,
                       description="Export a model to ONNX: preprocessed images [N, 3, H, W] "
                       "-> image score and anomaly map, standard operators only (README, "
                       "\"Export to ONNX\").")
    p.add_argument("model", help="model file written by fit")
    p.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="ONNX file to "
                   "write (with FILE.onnx.data beside it when the constants pass 2 GB)")
    p.add_argument("--weights", metavar="FILE", help="backbone weights, if the model was "
                   "fitted with a local file that has moved")
    p.add_argument("--quiet", "-q", action="store_true", help="no messages")

    p = sub.add_parser("demo-data", help="write a small synthetic MVTec-style data set",
                       epilog=_DEMO_EXAMPLES, formatter_class=raw,
                       description="Write a seeded synthetic data set: 'widget' (square, textured "
                       "discs) and 'rod' (elongated bars, 1:1 to 1:3), scratches, spots, masks.")
    p.add_argument("output", metavar="DIR", help="folder to write (MVTec layout)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed")
    p.add_argument("--overwrite", action="store_true", help="write into DIR even if it is "
                   "not empty (files of the same name are replaced)")
    p.add_argument("--quiet", "-q", action="store_true", help="no messages")
    return parser


# ----- helpers ------------------------------------------------------------------------

def _logger(quiet: bool) -> Callable[[str], None]:
    """The run's messages: to stderr, or nowhere with --quiet."""
    return (lambda message: None) if quiet else (
        lambda message: print(message, file=sys.stderr, flush=True))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    why = first_line(message) if str(message).strip() else category.__name__
    print(f"{PROG}: warning: {why}", file=sys.stderr, flush=True)


def _config_from_args(args: argparse.Namespace, ratio: float | None = None
                      ) -> PatchCoreConfig:
    """The settings of a model to fit, from the command line (validated)."""
    runtime = {k: v for k, v in (("seed", args.seed), ("batch_size", args.batch_size),
                                 ("num_workers", args.workers),
                                 ("precision", args.precision)) if v is not None}
    config = PatchCoreConfig(
        backbone=args.backbone, layers=args.layers, weights=args.weights,
        pretrained=args.pretrained, resize=args.resize, image_size=args.image_size, crop=args.crop,
        coreset_ratio=args.coreset_ratio if ratio is None else ratio,
        num_neighbors=args.num_neighbors, pretrain_embed_dim=args.embed_dim,
        target_embed_dim=args.embed_dim, device=args.device, **runtime)
    config.validate()
    if args.weights and (why := file_problem(args.weights)):
        raise PatchCoreError(f"weights file {args.weights} {why}")
    return config


def _warn_random_weights(config: PatchCoreConfig) -> None:
    """The warning of every verb that builds a model from options with random weights."""
    if not config.pretrained and not config.weights:
        print(f"{PROG}: warning: --pretrained false: random backbone weights, for speed and "
              f"memory tests only (scores are not meaningful)", file=sys.stderr)


def _skipped(skipped: list[str]) -> str:
    """The end-of-run count of the inputs left out (each was named in a warning)."""
    n = len(skipped)
    return (f"; skipped {n} file{'s' if n != 1 else ''} (unreadable, unsupported, not "
            f"images or dangling links: each named above)" if n else "")


def _out_of_memory(exc: BaseException) -> str:
    """The one line of an allocation failure (only those: other errors keep their
    traceback, as bugs)."""
    return (f"out of memory ({first_line(exc)[:160]}): lower --batch-size or --image-size, "
            f"or use a machine with more memory")


def _load(path: str | Path, args: argparse.Namespace) -> PatchCore:
    """A fitted model with this run's device, batch size and workers."""
    return PatchCore.load(path, device=args.device, weights=args.weights,
                          batch_size=args.batch_size, num_workers=args.workers,
                          precision=args.precision, bank_shards=args.bank_shards)


# ----- verbs --------------------------------------------------------------------------

#: Settings an --update keeps from the model: giving another value is an error.
_UPDATE_KEEPS = ("backbone", "layers", "weights", "pretrained", "resize", "image_size", "crop",
                 "coreset_ratio", "num_neighbors", "pretrain_embed_dim", "target_embed_dim",
                 "seed")


def cmd_update(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    """``fit --update MODEL NEW_GOOD... -o MODEL2``."""
    if args.category:
        raise PatchCoreError("--update takes image files and folders, not --category")
    model = PatchCore.load(args.update, device=args.device, weights=args.weights,
                           batch_size=args.batch_size, num_workers=args.workers,
                           precision=args.precision)
    given = _config_from_args(args)
    default = _config_from_args(build_parser().parse_args(["fit", "x", "-o", "y"]))
    for name in _UPDATE_KEEPS:
        value, saved = getattr(given, name), getattr(model.config, name)
        if name == "weights" or value == getattr(default, name) or value == saved:
            continue
        option = "--" + {"pretrain_embed_dim": "embed-dim", "target_embed_dim": "embed-dim"
                         }.get(name, name.replace("_", "-"))
        raise PatchCoreError(f"{args.update} was fitted with {name} {saved!r}, not {value!r}: "
                             f"--update keeps the model's settings; drop {option}, or fit a "
                             f"new model")
    out = Path(args.output)
    if out.suffix != ".safetensors" or out.is_dir():
        raise PatchCoreError(f"-o {args.output}: give the .safetensors file to write")
    skipped: list[str] = []
    inputs = list_images(args.data, "input", skipped)
    check_outputs(f"-o {args.output}", out, [out], [p for p in args.data if Path(p).is_dir()],
                  [*inputs, *([args.weights] if args.weights else [])])
    rows = int(model.bank.shape[0])
    model.update(inputs, skipped=skipped, progress=not args.quiet)
    model.save(out)
    u = model.fit_stats["updates"][-1]
    log(f"wrote {out}: {rows:,} + {u['rows_added']:,} rows from {u['images']} new images "
        f"in {u['seconds']:.1f} s" + _skipped(skipped))
    if model.calibration is not None:
        log(f"calibrated: {model.calibration.summary()}")
    return 0


def cmd_fit(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    if args.update:
        return cmd_update(args, log)
    if len(args.data) != 1:
        raise PatchCoreError(f"fit takes one DATA folder, got {len(args.data)} (several "
                             f"inputs only with --update MODEL)")
    args.data = args.data[0]
    config = _config_from_args(args)
    targets = datasets.fit_targets(args.data, args.category, args.output, args.weights)
    _warn_random_weights(config)
    for name, folder, out in targets:
        skipped: list[str] = []
        model = PatchCore(config)
        log(f"fit {name}: {folder} ({config.backbone}, coreset ratio {config.coreset_ratio}, "
            f"device {model.device})")
        model.fit(folder, skipped=skipped, progress=not args.quiet,
                  streaming=not args.in_memory, temp_dir=args.temp_dir,
                  false_reject_rate=args.false_reject_rate)
        if model.bank is None:  # a rank other than 0 of a distributed fit
            continue
        model.save(out)
        s = model.fit_stats
        log(f"wrote {out}: {s['bank_rows']:,} of {s['patches']:,} patches x {s['embed_dim']} "
            f"from {s['images']} images in {s['fit_seconds']:.1f} s"
            + _skipped(skipped))
        if model.calibration is not None:
            log(f"calibrated: {model.calibration.summary()} (cross-fitting took "
                f"{s['calibration_seconds']:.1f} s of the fit)")
    return 0


def _score_threshold(args: argparse.Namespace, model: PatchCore,
                     log: Callable[[str], None]) -> tuple[float | None, str]:
    """The raw threshold score labels with, and how it compares: ``>=`` for one given on
    the command line (as before), ``>`` for the calibrated one (the verdict contract)."""
    cal = model.calibration
    if args.threshold is not None and args.normalised_threshold is not None:
        raise PatchCoreError("give --threshold (a raw score) or --normalised-threshold, "
                             "not both")
    if args.normalised_threshold is not None:
        if cal is None:
            raise PatchCoreError(f"--normalised-threshold needs a calibrated model; "
                                 f"{args.model} has none (refit it, or give --threshold "
                                 f"as a raw score)")
        t = denormalise(args.normalised_threshold, cal)
        log(f"labels: defective at or above normalised score {args.normalised_threshold} "
            f"(raw score {t:.6g}; --normalised-threshold)")
        return t, ">="
    if args.threshold is not None:
        extra = "" if cal is None else \
            f"; normalised {float(normalise(args.threshold, cal)):.4f}"
        log(f"labels: defective at or above raw score {args.threshold} (--threshold, "
            f"instead of the model's{'' if cal else ' missing'} calibrated threshold{extra})")
        return args.threshold, ">="
    if cal is None:
        log(f"no labels: {args.model} has no calibrated threshold (fitted before "
            f"calibration existed); refit it for one, or give --threshold")
        return None, ">"
    log(f"labels: defective above the model's calibrated threshold, "
        f"{cal.summary()}")
    return cal.image_threshold, ">"


def cmd_score(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    model = _load(args.model, args)  # its errors first; nothing is read or written yet
    out = Path(args.output)
    skipped: list[str] = []
    inputs = list_images(args.inputs, "input", skipped)
    overlays = not args.no_overlays
    threshold, above = _score_threshold(args, model, log)
    names, run = score_run.plan_score(
        f"-o {args.output}", args.model, args.inputs, inputs, out, threshold, overlays,
        args.save_maps, args.weights, args.resume, args.launch)
    with output_lock(f"-o {args.output}", out, args.launch.is_main):
        done, todo = score_run.earlier_results(out, run, inputs, args.resume)
        if done:
            log(f"resuming: {len(inputs) - len(todo)} of {len(inputs)} images already scored")
        new = score_run.score_images(model, todo, names, out, skipped, args.resume, overlays,
                                      args.save_maps, args.temp_dir, not args.quiet, run)
        scores = {**done, **new}
        if not scores:
            raise PatchCoreError("none of the input images could be read")
        written = outputs.write_scores(out, str(args.model), scores, inputs, threshold,
                                       skipped, run, model.calibration, above
                                       ) if args.launch.is_main else 0
    log(f"scored {len(new)} images -> {out}/scores.csv"
        + (f" ({written - len(new)} from the earlier run)" if args.resume else "")
        + _skipped(skipped))
    return 0


def cmd_evaluate(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    sets = evaluation.evaluation_sets(args.model, args.data, args.category, args.good,
                                args.defective, args.masks)
    out = Path(args.output)
    evaluation.check_evaluation_outputs(f"-o {args.output}", out, sets, not args.no_overlays,
                                        args.save_maps, args.weights)
    results = []
    with output_lock(f"-o {args.output}", out, args.launch.is_main):
        for name, file, items, skipped, _ in sets:
            model = _load(file, args)
            sub = out / name if len(sets) > 1 else out
            r = evaluation.evaluate_category(name, model, items, skipped, sub, args.model,
                                             not args.no_overlays, args.save_maps,
                                             args.temp_dir, not args.quiet, args.maps_at)
            m = {k: outputs.fmt_metric(r[k])
                 for k in ("image_auroc", "pixel_auroc", "pro", "f1_max")}
            log(f"{name}: image AUROC {m['image_auroc']}, pixel AUROC {m['pixel_auroc']}, "
                f"PRO {m['pro']}, F1-max {m['f1_max']} ({r['counts']['images']} images, "
                f"{r['score_seconds']:.1f} s) -> {sub}/metrics.json")
            a = r.get("at_threshold")
            if a is None:
                log(f"{name}: no calibrated threshold in {file} (refit it for the verdict at "
                    f"its own thresholds)")
            else:
                c = a["counts"]
                pct = {k: "-" if a[k] is None else f"{a[k]:.1%}"
                       for k in ("pixel_precision", "pixel_recall", "pixel_iou", "region_hit_rate")}
                log(f"{name} at the model's thresholds: false rejects {c['false_rejects']} of "
                    f"{c['good']} good, misses {c['misses']} of {c['defective']} defective; "
                    f"pixel precision {pct['pixel_precision']}, recall {pct['pixel_recall']}, "
                    f"IoU {pct['pixel_iou']}; ground-truth regions hit {pct['region_hit_rate']}")
            results.append(r)
        if len(sets) > 1 and args.launch.is_main:
            outputs.write_summary(out, results)
            log(f"summary of {len(results)} categories -> {out}/summary.csv")
    return 0


def cmd_study(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    data = Path(args.data)
    cats = mvtec_categories(data, args.category)
    if cats is None:
        raise PatchCoreError(f"{data} is not an MVTec-style category; give --category")
    ratios = sorted(set(args.coreset_ratio))
    out = Path(args.output)
    base = _config_from_args(args, ratio=ratios[0])
    check_outputs(f"-o {args.output}", out, [out / f"study.{e}" for e in ("csv", "json", "png")],
                  [folder for _, folder in cats], [args.weights] if args.weights else [])
    _warn_random_weights(base)
    rows = []
    with output_lock(f"-o {args.output}", out, args.launch.is_main):
        for name, folder in cats:
            for r in evaluation.study_category(name, folder, base, ratios, args.temp_dir,
                                               not args.quiet, args.maps_at):
                log(f"{name} ratio {r['coreset_ratio']}: image AUROC {r['image_auroc']}, pixel"
                    f" AUROC {r['pixel_auroc']}, PRO {r['pro']}, fit {r['fit_seconds']:.1f} s")
                rows.append(r)
        outputs.write_study(out, base.to_json(), rows)
    log(f"study of {len(ratios)} ratios -> {out}/study.csv, study.png")
    return 0


def cmd_demo_data(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    counts = write_demo_data(args.output, seed=args.seed, overwrite=args.overwrite)
    log(f"wrote synthetic categories widget and rod to {args.output}: " +
        ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_export(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from .export import check_export_target, export_onnx

    check_export_target(args.output, args.model)  # before the model is read
    model = PatchCore.load(args.model, device="cpu", weights=args.weights)
    r = export_onnx(model, args.output, args.model)
    log(f"wrote {r.path}" + (f" and {r.data_path}" if r.data_path else "")
        + f": {r.file_bytes / 1e6:,.1f} MB, input [N, 3, {r.input_size[0]}, "
        f"{r.input_size[1]}], outputs {', '.join(r.outputs)}, {r.seconds:.1f} s")
    return 0


_VERBS = {"fit": cmd_fit, "score": cmd_score, "evaluate": cmd_evaluate, "study": cmd_study,
          "demo-data": cmd_demo_data, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``patchcore-fast`` (its console script, ``patchcore_fast_entry``, sets
    the Ctrl-C handler first). Returns the exit code: 0 on success, 1 when a distributed
    run failed, 2 on a user error (one line on stderr), 130 on Ctrl-C. Messages go to
    stderr through :func:`~patchcore_fast.streams.guarded_streams`: a closed or broken
    stderr never changes the outcome."""
    with guarded_streams():
        try:
            return _run(argv)
        except KeyboardInterrupt:  # the run's finally blocks have removed its temp files
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse errors
        return int(exc.code or 0)
    empty = _empty_path(parser, args)
    try:
        # The run's launch, chosen here once; the verbs read it as args.launch (rank 0
        # writes the merged files).
        args.launch = launch = distributed.launch_for(args.verb)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    error = f"{PROG}: error: " + (f"rank {launch.rank} of {launch.world}: "
                                  if launch.world > 1 else "")
    log = _logger(getattr(args, "quiet", False) or not launch.is_main)
    fail = getattr(args, "on_error", "skip") == "fail"
    with warnings.catch_warnings():
        # --on-error fail turns the first skipped file into an exception, raised where the
        # file is met: nothing after it is computed and no output file is written.
        warnings.simplefilter("error" if fail else "always", SkippedFileWarning)
        warnings.simplefilter("always", InputWarning)  # each file named, in every run
        warnings.showwarning = _show_warning
        try:
            if empty:
                raise PatchCoreError(f"{empty}: empty path (an unset variable?); name a file "
                                     f"or folder")
            if getattr(args, "temp_dir", None):
                check_temp_dir(args.temp_dir)
            return distributed.run(launch, args.verb, lambda: resolve_device(args.device),
                                   getattr(args, "dist_timeout", 0.0),
                                   lambda: _VERBS[args.verb](args, log))
        except MemoryError as exc:
            print(f"{error}{_out_of_memory(exc)}", file=sys.stderr)
        except distributed.DistError as exc:  # a rank died, failed or timed out
            if out_of_memory(exc):  # torch.OutOfMemoryError, the CPU allocator's
                print(f"{error}{_out_of_memory(exc)}", file=sys.stderr)
                return 2
            if launch.world == 1:  # a RuntimeError of one process: a bug, with its traceback
                raise
            print(f"{error}{distributed.describe_failure(exc)}", file=sys.stderr)
            return 1
        except SkippedFileWarning as exc:
            why = first_line(exc).removeprefix("skipping ")
            print(f"{error}cannot use {why} (--on-error fail; --on-error skip leaves "
                  f"such files out)", file=sys.stderr)
        except PatchCoreError as exc:
            print(f"{error}{exc}", file=sys.stderr)
        except OSError as exc:  # disk full, permission denied, ...
            print(f"{error}{os_error_text(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
