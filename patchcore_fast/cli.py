"""The ``patchcore-fast`` command: fit, score, evaluate, study, serve, demo-data.

Every problem with the user's input ends the run with one line on stderr,
``patchcore-fast: error: <what is wrong>``, and exit code 2; every output file is written
atomically, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from . import distributed, evaluation, outputs
from ._version import __version__
from .data import list_images, mvtec_categories
from .demo import write_demo_data
from .errors import (PatchCoreError, SkippedFileWarning, first_line, os_error_text,
                     out_of_memory)
from .files import check_outputs
from .geometry import add_geometry_options, add_maps_at_option
from .model import PatchCore, PatchCoreConfig, resolve_device

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
    p.add_argument("--bank-shards", action="store_true", help=distributed.BANK_SHARDS_HELP)
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
    g.add_argument("--num-neighbors", type=int, default=9,
                   help="b of the image-score reweighting (paper Eq. 7); 0 turns it off")
    g.add_argument("--embed-dim", type=int, default=1024,
                   help="pretrain and target embedding width (default 1024)")


def _serve_options(p: argparse.ArgumentParser) -> None:
    from .serve import (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAIT_MS, DEFAULT_QUEUE_SIZE,
                        DEFAULT_TIMEOUT_S, TOKEN_ENV)

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
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (auto: CUDA when available)")
    g.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="the backbone's arithmetic (default: the model's saved setting)")
    g.add_argument("--weights", metavar="FILE", help="backbone weights, if the model was "
                   "fitted with a local file that has moved")
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
    p.add_argument("data", help="folder of good images, or MVTec-style root / category folder")
    _categories(p)
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
    p.add_argument("--threshold", type=_finite, help="image score at or above which an image "
                   "is labelled anomalous (e.g. f1_threshold from evaluate's metrics.json)")
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
    p.add_argument("data", help="MVTec-style root or category folder")
    _categories(p)
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    _model_options(p, many_ratios=True)
    _common(p)

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
    if args.weights and not Path(args.weights).is_file():
        raise PatchCoreError(f"weights file {args.weights} does not exist")
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

def cmd_fit(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    config = _config_from_args(args)
    targets = outputs.fit_targets(args.data, args.category, args.output, args.weights)
    _warn_random_weights(config)
    for name, folder, out in targets:
        skipped: list[str] = []
        model = PatchCore(config)
        log(f"fit {name}: {folder} ({config.backbone}, coreset ratio {config.coreset_ratio}, "
            f"device {model.device})")
        model.fit(folder, skipped=skipped, progress=not args.quiet,
                  streaming=not args.in_memory, temp_dir=args.temp_dir)
        if model.bank is None:  # a rank other than 0 of a distributed fit
            continue
        model.save(out)
        s = model.fit_stats
        log(f"wrote {out}: {s['bank_rows']:,} of {s['patches']:,} patches x {s['embed_dim']} "
            f"from {s['images']} images in {s['fit_seconds']:.1f} s"
            + _skipped(skipped))
    return 0


def cmd_score(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    model = _load(args.model, args)  # its errors first; nothing is read or written yet
    out = Path(args.output)
    skipped: list[str] = []
    inputs = list_images(args.inputs, "input", skipped)
    overlays = not args.no_overlays
    names, run, done, todo = evaluation.plan_score(
        f"-o {args.output}", args.model, args.inputs, inputs, out, args.threshold, overlays,
        args.save_maps, args.weights, args.resume)
    if done:
        log(f"resuming: {len(inputs) - len(todo)} of {len(inputs)} images already scored")
    new = evaluation.score_images(model, todo, names, out, skipped, args.resume, overlays,
                                  args.save_maps, args.temp_dir, not args.quiet, run)
    scores = {**done, **new}
    if not scores:
        raise PatchCoreError("none of the input images could be read")
    written = outputs.write_scores(out, str(args.model), scores, inputs, args.threshold,
                                   skipped, run) if distributed.is_main() else 0
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
    for name, file, items, skipped in sets:
        model = _load(file, args)
        sub = out / name if len(sets) > 1 else out
        r = evaluation.evaluate_category(name, model, items, skipped, sub, args.model,
                                         not args.no_overlays, args.save_maps,
                                         args.temp_dir, not args.quiet, args.maps_at)
        m = {k: outputs.fmt_metric(r[k]) for k in ("image_auroc", "pixel_auroc", "pro", "f1_max")}
        log(f"{name}: image AUROC {m['image_auroc']}, pixel AUROC {m['pixel_auroc']}, PRO "
            f"{m['pro']}, F1-max {m['f1_max']} ({r['counts']['images']} images, "
            f"{r['score_seconds']:.1f} s) -> {sub}/metrics.json")
        results.append(r)
    if len(sets) > 1 and distributed.is_main():
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
    for name, folder in cats:
        for r in evaluation.study_category(name, folder, base, ratios, args.temp_dir,
                                           not args.quiet, args.maps_at):
            log(f"{name} ratio {r['coreset_ratio']}: image AUROC {r['image_auroc']}, pixel "
                f"AUROC {r['pixel_auroc']}, PRO {r['pro']}, fit {r['fit_seconds']:.1f} s")
            rows.append(r)
    outputs.write_study(out, base.to_json(), rows)
    log(f"study of {len(ratios)} ratios -> {out}/study.csv, study.png")
    return 0


def cmd_serve(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from . import serve
    from .backbone import file_sha256

    token = serve.read_token(args.token_file)
    loopback = serve.is_loopback(args.host)
    if token is None and not args.insecure and not loopback:
        raise PatchCoreError(f"--host {args.host} can be reached from other machines: give "
                             f"--token-file FILE (or set {serve.TOKEN_ENV}), or --insecure to "
                             f"serve it without a token")
    options = serve.ServeOptions(
        max_wait_ms=args.max_wait_ms, queue_size=args.queue_size, timeout_s=args.timeout,
        max_body_bytes=int(args.max_body_mb * 2 ** 20), token=token,
        model_name=Path(args.model).name, local_hosts_only=loopback)
    options.validate()
    model = PatchCore.load(args.model, device=args.device, weights=args.weights,
                           batch_size=args.batch_size, precision=args.precision)
    options = dataclasses.replace(options, model_sha256=file_sha256(args.model))
    sock = serve.bind(args.host, args.port)
    return serve.serve(model, args.host, sock, options, log, args.access_log)


def cmd_demo_data(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    counts = write_demo_data(args.output, seed=args.seed, overwrite=args.overwrite)
    log(f"wrote synthetic categories widget and rod to {args.output}: " +
        ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


_VERBS = {"fit": cmd_fit, "score": cmd_score, "evaluate": cmd_evaluate, "study": cmd_study,
          "serve": cmd_serve, "demo-data": cmd_demo_data}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``patchcore-fast`` (its console script, ``patchcore_fast_entry``, sets
    the Ctrl-C handler first). Returns the exit code: 0 on success, 1 when a distributed
    run failed, 2 on a user error (one line on stderr), 130 on Ctrl-C."""
    try:
        return _run(argv)
    except KeyboardInterrupt:  # the run's finally blocks have removed its temporary files
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse errors
        return int(exc.code or 0)
    try:
        launch = distributed.launch_for(args.verb)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    error = f"{PROG}: error: " + (f"rank {launch.rank} of {launch.world}: " if launch else "")
    log = _logger(getattr(args, "quiet", False) or (launch is not None and not launch.is_main))
    fail = getattr(args, "on_error", "skip") == "fail"
    with warnings.catch_warnings():
        # --on-error fail turns the first skipped file into an exception, raised where the
        # file is met: nothing after it is computed and no output file is written.
        warnings.simplefilter("error" if fail else "always", SkippedFileWarning)
        warnings.showwarning = _show_warning
        try:
            if getattr(args, "temp_dir", None) and not Path(args.temp_dir).is_dir():
                raise PatchCoreError(f"--temp-dir {args.temp_dir} is not an existing folder")
            return distributed.run(launch, args.verb, lambda: resolve_device(args.device),
                                   getattr(args, "dist_timeout", 0.0),
                                   lambda: _VERBS[args.verb](args, log))
        except MemoryError as exc:
            print(f"{error}{_out_of_memory(exc)}", file=sys.stderr)
        except distributed.DistError as exc:  # a rank died, failed or timed out
            if out_of_memory(exc):  # torch.OutOfMemoryError, the CPU allocator's
                print(f"{error}{_out_of_memory(exc)}", file=sys.stderr)
                return 2
            if launch is None:  # a RuntimeError of one process: a bug, with its traceback
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
