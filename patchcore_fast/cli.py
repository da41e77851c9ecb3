"""The ``patchcore-fast`` command: fit, score, evaluate, study, serve, demo-data, export.

Every problem with the user's input ends the run with one line on stderr,
``patchcore-fast: error: <what is wrong>``, and exit code 2; every output file is written
atomically, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence, Union

from . import datasets, distributed, evaluation, outputs, score_run
from .config import PatchCoreConfig, resolve_device
from .datasets import list_images, mvtec_categories
from .demo import write_demo_data
from .errors import (InputWarning, PatchCoreError, SkippedFileWarning, first_line,
                     os_error_text, out_of_memory)
from .files import check_outputs, check_temp_dir, file_problem, file_sha256, output_lock
from .calibration import denormalise, normalise
from .cli_parser import PROG, build_parser, empty_path
from .model import PatchCore
from .streams import guarded_streams


# ----- helpers ------------------------------------------------------------------------

#: The run's message sink: a message, or a function that makes it (see :func:`_logger`).
Log = Callable[[Union[str, Callable[[], str]]], None]


def _logger(quiet: bool) -> Log:
    """The run's messages: to stderr, or nowhere with --quiet. A message may be a function
    that makes it, called only when it is shown (the calibration's summary imports
    scipy.special: 0.15 s that --quiet does not pay)."""
    return (lambda message: None) if quiet else (
        lambda message: print(message if isinstance(message, str) else message(),
                              file=sys.stderr, flush=True))


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


def cmd_update(args: argparse.Namespace, log: Log) -> int:
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
        log(lambda: f"calibrated: {model.calibration.summary()}")
    return 0


def cmd_fit(args: argparse.Namespace, log: Log) -> int:
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
            log(lambda: f"calibrated: {model.calibration.summary()} (cross-fitting took "
                        f"{s['calibration_seconds']:.1f} s of the fit)")
    return 0


def _score_threshold(args: argparse.Namespace, model: PatchCore,
                     log: Log) -> tuple[float | None, str]:
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
    log(lambda: f"labels: defective above the model's calibrated threshold, "
                f"{cal.summary()}")
    return cal.image_threshold, ">"


def cmd_score(args: argparse.Namespace, log: Log) -> int:
    model = _load(args.model, args)  # its errors first; nothing is read or written yet
    out = Path(args.output)
    skipped: list[str] = []
    inputs = list_images(args.inputs, "input", skipped)
    overlays = not args.no_overlays
    if args.save_masks and model.calibration is None:
        raise PatchCoreError(f"--save-masks needs the model's pixel threshold, and "
                             f"{args.model} has no calibration (fitted before it existed): "
                             f"refit it")
    threshold, above = _score_threshold(args, model, log)
    names, run = score_run.plan_score(
        f"-o {args.output}", args.model, args.inputs, inputs, out, threshold, overlays,
        args.save_maps, args.weights, args.resume, args.launch, args.save_masks,
        args.min_region_area, args.overlay_format)
    # Regions need the model's pixel threshold: a calibrated model's only.
    regions: dict | None = {} if model.calibration is not None else None
    with output_lock(f"-o {args.output}", out, args.launch.is_main):
        done, todo = score_run.earlier_results(out, run, inputs, args.resume, regions)
        if done:
            log(f"resuming: {len(inputs) - len(todo)} of {len(inputs)} images already scored")
        new = score_run.score_images(model, todo, names, out, skipped, args.resume, overlays,
                                      args.save_maps, args.temp_dir, not args.quiet, run,
                                      args.save_masks, args.min_region_area, regions,
                                      args.overlay_format)
        scores = {**done, **new}
        if not scores:
            raise PatchCoreError("none of the input images could be read")
        written = outputs.write_scores(out, str(args.model), scores, inputs, threshold,
                                       skipped, run, model.calibration, above, regions
                                       ) if args.launch.is_main else 0
    log(f"scored {len(new)} images -> {out}/scores.csv"
        + (f" ({written - len(new)} from the earlier run)" if args.resume else "")
        + _skipped(skipped))
    return 0


def cmd_evaluate(args: argparse.Namespace, log: Log) -> int:
    sets = evaluation.evaluation_sets(args.model, args.data, args.category, args.good,
                                args.defective, args.masks)
    out = Path(args.output)
    evaluation.check_evaluation_outputs(f"-o {args.output}", out, sets, not args.no_overlays,
                                        args.save_maps, args.weights, args.overlay_format)
    results = []
    with output_lock(f"-o {args.output}", out, args.launch.is_main):
        for name, file, items, skipped, _ in sets:
            model = _load(file, args)
            sub = out / name if len(sets) > 1 else out
            r = evaluation.evaluate_category(name, model, items, skipped, sub, args.model,
                                             not args.no_overlays, args.save_maps,
                                             args.temp_dir, not args.quiet, args.maps_at,
                                             args.overlay_format)
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


def cmd_study(args: argparse.Namespace, log: Log) -> int:
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


def cmd_demo_data(args: argparse.Namespace, log: Log) -> int:
    counts = write_demo_data(args.output, seed=args.seed, overwrite=args.overwrite)
    log(f"wrote synthetic categories widget and rod to {args.output}: " +
        ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_export(args: argparse.Namespace, log: Log) -> int:
    from .export import check_export_target, export_onnx

    check_export_target(args.output, args.model)  # before the model is read
    model = PatchCore.load(args.model, device="cpu", weights=args.weights)
    r = export_onnx(model, args.output, args.model)
    log(f"wrote {r.path}" + (f" and {r.data_path}" if r.data_path else "")
        + f": {r.file_bytes / 1e6:,.1f} MB, input [N, 3, {r.input_size[0]}, "
        f"{r.input_size[1]}], outputs {', '.join(r.outputs)}, {r.seconds:.1f} s")
    return 0


def cmd_serve(args: argparse.Namespace, log: Log) -> int:
    from . import serve  # fastapi and uvicorn: only this verb pays their import

    token = serve.read_token(args.token_file)
    loopback = serve.is_loopback(args.host)
    if token is None and not args.insecure and not loopback:
        raise PatchCoreError(f"--host {args.host} can be reached from other machines: give "
                             f"--token-file FILE (or set {serve.TOKEN_ENV}), or --insecure to "
                             f"serve it without a token")
    options = serve.ServeOptions(
        max_wait_ms=args.max_wait_ms, queue_size=args.queue_size, timeout_s=args.timeout,
        max_body_bytes=int(args.max_body_mb * 2 ** 20), token=token,
        model_name=Path(args.model).name, local_hosts_only=loopback,
        worker_nice=args.worker_nice)
    options.validate()
    model = PatchCore.load(args.model, device=args.device, weights=args.weights,
                           batch_size=args.batch_size, precision=args.precision)
    options = dataclasses.replace(options, model_sha256=file_sha256(args.model))
    sock = serve.bind(args.host, args.port)
    return serve.serve(model, args.host, sock, options, log, args.access_log)


_VERBS = {"fit": cmd_fit, "score": cmd_score, "evaluate": cmd_evaluate, "study": cmd_study,
          "serve": cmd_serve, "demo-data": cmd_demo_data,
          "export": cmd_export}


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


def process_main(argv: Sequence[str] | None = None) -> int:
    """:func:`main` as the last thing a process does (the console script, ``python -m
    patchcore_fast.cli``); tests call :func:`main` itself."""
    code = main(argv)
    # At exit the interpreter's garbage collector walks every object still alive, and with
    # torch, torchvision (which imports torch._dynamo) and timm loaded that takes 0.5-0.8 s
    # of a 2-core CPU after the command is done (bench/RESULTS.md, "fit --update, fifth
    # session"). Frozen objects are left out of those passes. Nothing of the command waits
    # on them: its files are closed and renamed by now, and the standard streams and
    # weakref finalizers are flushed and run at exit all the same.
    gc.freeze()
    return code


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse errors
        return int(exc.code or 0)
    empty = empty_path(parser, args)
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
        sys.exit(process_main())
