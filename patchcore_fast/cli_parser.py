"""The command line's parser: the verbs, their options and examples, and the checks of
option values (argparse lives here and in :mod:`patchcore_fast.cli` only)."""

from __future__ import annotations

import argparse
import math

from ._version import __version__
from .calibration import DEFAULT_FALSE_REJECT_RATE, MAX_FALSE_REJECT_RATE
from .overlays import JPEG_QUALITY, OVERLAY_FORMATS
from .regions import DEFAULT_MIN_REGION_AREA
from .geometry import DEFAULT_CROP, DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE, MAPS_AT, RESIZE_MODES
from .serve_io import (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAIT_MS, DEFAULT_QUEUE_SIZE,
                       DEFAULT_TIMEOUT_S, DEFAULT_WORKER_NICE, TOKEN_ENV)

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
_SERVE_EXAMPLES = f"""examples:
  {PROG} serve bottle.safetensors                      # http://127.0.0.1:8000, page at /
  curl --data-binary @photo.png -H 'Content-Type: image/png' localhost:8000/v1/predict
  {PROG} serve bottle.safetensors --host 0.0.0.0 --token-file token.txt
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
_area = _number(int, lambda v: v >= 0, "a whole number of pixels >= 0")
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


def _overlay_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overlay-format", choices=OVERLAY_FORMATS, default="png",
                   help="the overlays' format: png (lossless, default) or jpg (JPEG quality "
                        f"{JPEG_QUALITY}: about 10 times cheaper to write and 8 times smaller, "
                        "for keeping an overlay of every photo)")


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


def empty_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
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


def _moved_weights_option(p) -> None:
    """``--weights`` of the verbs that load a fitted model (score, evaluate, export, serve)."""
    p.add_argument("--weights", metavar="FILE", help="backbone weights, if the model was "
                   "fitted with a local file that has moved")


def _loaded_model_options(p: argparse.ArgumentParser) -> None:
    """Options of the verbs that run a fitted model (score, evaluate)."""
    _moved_weights_option(p)
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


def _serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file written by fit")
    g = p.add_argument_group("listening and access")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1: this machine only; any other needs a token or --insecure)")
    g.add_argument("--port", type=_number(int, lambda v: 0 <= v <= 65535, "a port number "
                   "from 0 to 65535"), default=8000, help="port (default 8000; 0: a free one, "
                   "printed at start)")
    g.add_argument("--token-file", metavar="FILE", help=f"file whose first line is the bearer "
                   f"token that /v1/predict, /v1/model and /metrics then require (default: "
                   f"${TOKEN_ENV} when set)")
    g.add_argument("--insecure", action="store_true", help="serve an address other machines "
                   "can reach without a token (anyone who reaches it can use the model)")
    g.add_argument("--access-log", action="store_true", help="log every request")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--batch-size", type=_number(int, lambda v: v >= 1, "a positive integer"),
                   default=None, help="largest batch of requests scored together (default: "
                   "the model's saved setting)")
    g.add_argument("--max-wait-ms", type=_number(float, lambda v: 0 <= v <= 10_000, "a number "
                   "of milliseconds from 0 to 10,000"), default=DEFAULT_MAX_WAIT_MS,
                   help=f"longest wait for more requests once one is waiting (default "
                        f"{DEFAULT_MAX_WAIT_MS:g}, chosen by measurement: README, 'Serving')")
    g.add_argument("--queue-size", type=_number(int, lambda v: v >= 1, "a positive integer"),
                   default=DEFAULT_QUEUE_SIZE, help=f"requests in progress at once; more "
                   f"are answered 503 with Retry-After (default {DEFAULT_QUEUE_SIZE})")
    g.add_argument("--timeout", type=_number(float, lambda v: 0 < v <= 3600, "a number of "
                   "seconds in (0, 3600]"), default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds before a request is answered 504 (default "
                        f"{DEFAULT_TIMEOUT_S:g})")
    g.add_argument("--max-body-mb", type=_number(float, lambda v: 0 < v <= 4096, "a number "
                   "of MiB in (0, 4096]"), default=DEFAULT_MAX_BODY_BYTES / 2 ** 20,
                   metavar="MB", help=f"largest request body (default "
                   f"{DEFAULT_MAX_BODY_BYTES / 2 ** 20:g} MiB)")
    g.add_argument("--worker-nice", type=_number(int, lambda v: 0 <= v <= 19, "an integer "
                   "from 0 to 19"), default=DEFAULT_WORKER_NICE, metavar="N",
                   help=f"nice value of the model's and decoding threads, so that the "
                   f"event loop answers (and refuses) at once on a busy machine; 0: "
                   f"the process's own (default {DEFAULT_WORKER_NICE})")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (auto: CUDA when available)")
    g.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="the backbone's arithmetic (default: the model's saved setting)")
    _moved_weights_option(g)
    g.add_argument("--quiet", "-q", action="store_true", help="no messages but errors")


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
    p.add_argument("--min-region-area", type=_area, default=DEFAULT_MIN_REGION_AREA,
                   metavar="PIXELS", help="leave out defect regions of fewer pixels (of the "
                   f"photo; default {DEFAULT_MIN_REGION_AREA}: the maps are smooth)")
    p.add_argument("--save-maps", action="store_true", help="also write each raw map as .npy")
    p.add_argument("--save-masks", action="store_true", help="also write each image's "
                   "defect regions as a mask, masks/<image>.png (255 in a region, 0 elsewhere; "
                   "at the photo's size; needs a calibrated model)")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlays")
    _overlay_format(p)
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
    p.add_argument("--no-overlays", action="store_true", help="do not write overlays")
    _overlay_format(p)
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
    _moved_weights_option(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no messages")

    p = sub.add_parser("serve", help="serve a model over HTTP (batching, limits, a web page)",
                       epilog=_SERVE_EXAMPLES, formatter_class=raw,
                       description="Keep a model loaded and warm behind HTTP: POST /v1/predict "
                       "(an image as the body or a multipart form), GET /v1/health, /v1/model, "
                       "/metrics (Prometheus) and an operator's page at /. Concurrent requests "
                       "are scored in batches. SIGTERM or Ctrl-C stops it gracefully.")
    _serve_options(p)

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
