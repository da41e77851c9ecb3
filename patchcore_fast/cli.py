"""The ``patchcore-fast`` command: fit, score, evaluate, study, demo-data.

Every problem with the user's input ends the run with one line on stderr,
``patchcore-fast: error: <what is wrong>``, and exit code 2; every output file is written
atomically, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Sequence

from . import distributed, evaluation, outputs
from ._version import __version__
from .data import list_images, mvtec_categories
from .demo import write_demo_data
from .errors import PatchCoreError, SkippedFileWarning
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


def _common(p: argparse.ArgumentParser, seed: bool = True) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (auto: CUDA when available)")
    if seed:  # a fitted model keeps the seed it was fitted with
        g.add_argument("--seed", type=int, default=None, help="random seed of the coreset "
                       "projection and start point (default 0)")
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
    g.add_argument("--dist-timeout", type=float, default=1800.0, metavar="S",
                   help="under torchrun: seconds a collective waits for the other processes "
                        "before the run fails (default 1800)")


def _loaded_model_options(p: argparse.ArgumentParser) -> None:
    """Options of the verbs that run a fitted model (score, evaluate)."""
    p.add_argument("--weights", metavar="FILE", help="backbone weights, if the model was "
                   "fitted with a local file that has moved")
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


def _config_from_args(args: argparse.Namespace, ratio: float | None = None
                      ) -> PatchCoreConfig:
    """The settings of a model to fit, from the command line (validated)."""
    runtime = {k: v for k, v in (("seed", args.seed), ("batch_size", args.batch_size),
                                 ("num_workers", args.workers)) if v is not None}
    config = PatchCoreConfig(
        backbone=args.backbone, layers=args.layers, weights=args.weights,
        pretrained=args.pretrained, image_size=args.image_size, crop=args.crop,
        coreset_ratio=args.coreset_ratio if ratio is None else ratio,
        num_neighbors=args.num_neighbors, pretrain_embed_dim=args.embed_dim,
        target_embed_dim=args.embed_dim, device=args.device, **runtime)
    config.validate()
    if args.weights and not Path(args.weights).is_file():
        raise PatchCoreError(f"weights file {args.weights} does not exist")
    return config


def _load(path: str | Path, args: argparse.Namespace) -> PatchCore:
    """A fitted model with this run's device, batch size and workers."""
    return PatchCore.load(path, device=args.device, weights=args.weights,
                          batch_size=args.batch_size, num_workers=args.workers)


# ----- verbs --------------------------------------------------------------------------

def _fit_targets(args: argparse.Namespace) -> list[tuple[str, Path, Path]]:
    """(name, training folder, model file) per model to fit."""
    data, out = Path(args.data), Path(args.output)
    cats = mvtec_categories(data, args.category)
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
        if model.bank is None:  # a rank other than 0 of a distributed fit
            continue
        model.save(out)
        s = model.fit_stats
        log(f"wrote {out}: {s['bank_rows']:,} of {s['patches']:,} patches x {s['embed_dim']} "
            f"from {s['images']} images in {s['fit_seconds']:.1f} s"
            + (f"; skipped {len(skipped)} unreadable files" if skipped else ""))
    return 0


def cmd_score(args: argparse.Namespace, log: _Log) -> int:
    model = _load(args.model, args)
    out = Path(args.output)
    skipped: list[str] = []
    inputs = list_images(args.inputs, "input", skipped)
    # Names from the whole input list, so that a resumed run names files the same way.
    names = dict(zip(inputs, outputs.unique_names(inputs)))
    done = outputs.read_done(out) if args.resume else {}
    todo = [p for p in inputs if str(p) not in done]
    if done:
        log(f"resuming: {len(inputs) - len(todo)} of {len(inputs)} images already scored")
    new = evaluation.score_images(model, todo, names, out, skipped, args.resume,
                                  not args.no_overlays, args.save_maps, args.temp_dir,
                                  progress=not args.quiet)
    scores = {**done, **new}
    if not scores:
        raise PatchCoreError("none of the input images could be read")
    written = outputs.write_scores(out, str(args.model), scores, inputs, args.threshold,
                                   skipped)
    log(f"scored {len(new)} images -> {out}/scores.csv"
        + (f" ({written - len(new)} from the earlier run)" if args.resume else "")
        + (f"; skipped {len(skipped)} unreadable files" if skipped else ""))
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def cmd_evaluate(args: argparse.Namespace, log: _Log) -> int:
    sets = evaluation.evaluation_sets(args.model, args.data, args.category, args.good,
                                args.defective, args.masks)
    for name, file, _, _ in sets:
        if not file.is_file():
            raise PatchCoreError(f"model file {file} does not exist")
    out = Path(args.output)
    results = []
    for name, file, items, skipped in sets:
        model = _load(file, args)
        sub = out / name if len(sets) > 1 else out
        r = evaluation.evaluate_category(name, model, items, skipped, sub, args.model,
                                         not args.no_overlays, args.save_maps,
                                         args.temp_dir, progress=not args.quiet)
        log(f"{name}: image AUROC {_fmt(r['image_auroc'])}, pixel AUROC "
            f"{_fmt(r['pixel_auroc'])}, PRO {_fmt(r['pro'])}, F1-max {_fmt(r['f1_max'])} "
            f"({r['counts']['images']} images, {r['score_seconds']:.1f} s) -> "
            f"{sub}/metrics.json")
        results.append(r)
    if len(sets) > 1:
        outputs.write_summary(out, results)
        log(f"summary of {len(results)} categories -> {out}/summary.csv")
    return 0


def cmd_study(args: argparse.Namespace, log: _Log) -> int:
    data = Path(args.data)
    cats = mvtec_categories(data, args.category)
    if cats is None:
        raise PatchCoreError(f"{data} is not an MVTec-style category; give --category")
    ratios = sorted(set(args.coreset_ratio))
    out = Path(args.output)
    base = _config_from_args(args, ratio=ratios[0])
    rows = []
    for name, folder in cats:
        for r in evaluation.study_category(name, folder, base, ratios, args.temp_dir,
                                           progress=not args.quiet):
            log(f"{name} ratio {r['coreset_ratio']}: image AUROC {r['image_auroc']}, pixel "
                f"AUROC {r['pixel_auroc']}, PRO {r['pro']}, fit {r['fit_seconds']:.1f} s")
            rows.append(r)
    outputs.write_study(out, base.to_json(), rows)
    log(f"study of {len(ratios)} ratios -> {out}/study.csv, study.png")
    return 0


def cmd_demo_data(args: argparse.Namespace, log: _Log) -> int:
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
    try:
        launch = distributed.launch_from_environment()
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if launch is not None and (launch.world == 1 or args.verb == "demo-data"):
        launch = None
    error = f"{PROG}: error: " + (f"rank {launch.rank} of {launch.world}: " if launch else "")
    log = _Log(getattr(args, "quiet", False) or (launch is not None and not launch.is_main))
    fail = getattr(args, "on_error", "skip") == "fail"
    with warnings.catch_warnings():
        # --on-error fail turns the first skipped file into an exception, raised where the
        # file is met: nothing after it is computed and no output file is written.
        warnings.simplefilter("error" if fail else "always", SkippedFileWarning)
        warnings.showwarning = _show_warning
        try:
            if launch is None:
                return _VERBS[args.verb](args, log)
            if args.verb not in ("fit",):
                raise PatchCoreError(f"{args.verb} does not run under torchrun yet; run it "
                                     "as one process")
            if args.dist_timeout <= 0:
                raise PatchCoreError(f"--dist-timeout should be positive, got {args.dist_timeout}")
            distributed.init(launch, resolve_device(args.device), args.dist_timeout)
            try:
                return _VERBS[args.verb](args, log)
            finally:
                distributed.finish()
        except distributed.DistError as exc:  # a rank died, failed or timed out
            if launch is None:
                raise
            print(f"{error}{distributed.describe_failure(exc)}", file=sys.stderr)
            return 1
        except SkippedFileWarning as exc:
            why = str(exc).strip().splitlines()[0].removeprefix("skipping ")
            print(f"{error}cannot use {why} (--on-error fail; --on-error skip leaves "
                  f"such files out)", file=sys.stderr)
            return 2
        except PatchCoreError as exc:
            print(f"{error}{exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # disk full, permission denied, ...
            print(f"{error}{exc.strerror or exc}"
                  + (f": {exc.filename}" if getattr(exc, "filename", None) else ""),
                  file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
