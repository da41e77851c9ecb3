"""End-to-end throughput (issue #12): images -> scores and heatmaps, ours vs anomalib.

The workload of the issue: WideResNet-50-2 with random weights (the speed does not depend
on the weights; no download), layers 2 + 3, 224 px crops, a 16,386-row memory bank of that
backbone's own patch embeddings (the bank a 10 % coreset of ~21 images gives; real
features, not Gaussian data, whose norms hide the k-NN's slow paths), reweighting with
b = 9, Gaussian-blurred maps.

Groups, side by side in one run (each entry's ``extra_info`` has ``images_per_s``):

- ``tensors-<device>-b<B>-<inputs>``: a batch of B preprocessed images on the device ->
  scores and maps (``PatchCore.embedder`` + ``score_embeddings``), fp32 and bf16, against
  anomalib 2.7's ``PatchcoreModel`` (same backbone, layers and bank size; its embeddings
  are 1,536-d) when installed. B = 1 is the latency of one image. ``photos``: generated
  product photos held out of the bank (what a line scores: mostly good parts); ``noise``:
  Gaussian noise in the normalised input space, every patch far from the bank (further
  than a defect's), the hard case for the k-NN's exactness certificate.
- ``tensors-cuda-b<B>-photos-graphs-<precision>``: the same from tensors on CUDA with the
  embedder run as it is against replayed from CUDA graphs (``model.cuda_graphs``).
- ``files-<device>-b<B>``: PNG files -> scores (and overlays) through the CLI's score path
  (:func:`patchcore_fast.score_run.score_images`), beside decoding alone (files ->
  normalised tensors with the same workers: the limit the files path can reach). The
  model is calibrated as a fit calibrates (one pass: regions found and overlays written
  in the model's colour scale as each batch is scored), its calibration taken from the
  query images' own scores at a 1 % rate (the speed does not depend on where the
  threshold sits, beyond the few regions drawn); ``overlays-jpg`` writes them as JPEG
  (``--overlay-format jpg``); ``no-overlays`` still finds the regions
  (scores.json's); ``overlays-uncalibrated`` is a model file from before calibration (no
  regions; overlays in a second pass, after a histogram of every map).
- ``files-jpeg900-<device>-b<B>``: 900 x 900 JPEG files (issue #24's workload) to scores
  and JPEG (or PNG) overlays at the photo's size, beside decoding alone.
- ``files-<device>-b<B>-paired``: the files path with overlays against the tensors path,
  round by round (:func:`test_files_paired_with_tensors`).
- ``overlay-bottle-photo`` and ``overlay-file-<size>``: one overlay's work at a real
  photo's size, and the overlay file's encoders.

Small sizes by default (CI runs this on 2 CPU cores in a few minutes); full sizes with
``PATCHCORE_FAST_BENCH_FULL=1`` (batch 64 too, and 512 files instead of 16);
``PATCHCORE_FAST_BENCH_FILES`` and ``PATCHCORE_FAST_BENCH_ROUNDS`` set those two alone;
``PATCHCORE_FAST_BENCH_WORKERS`` the files path's reader processes (default: on the CPU
0, reading in the scoring process as the CLI does by default: reader processes would
compete with the backbone for the same cores (bench/RESULTS.md, "Seventh session");
with CUDA one per CPU, at most 8, to keep the device fed).
Every query image is held out of the bank.

    .venv/bin/pytest bench/bench_e2e.py --benchmark-only --benchmark-json=/tmp/e2e.json -s
    .venv/bin/python bench/report.py /tmp/e2e.json
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from patchcore_fast.calibration import calibrate
from patchcore_fast.datasets import iterate_images, list_images
from patchcore_fast.demo import write_demo_data
from patchcore_fast.score_run import score_images
from patchcore_fast.model import PatchCore, PatchCoreConfig

try:  # the peer, in the bench environment only
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
except ImportError:  # pragma: no cover
    PatchcoreModel = None

FULL = os.environ.get("PATCHCORE_FAST_BENCH_FULL", "") not in ("", "0")
BANK_ROWS = 16_386
BANK_IMAGES = 21          # 21 x 784 = 16,464 patches >= BANK_ROWS
BATCHES = (1, 8, 64) if FULL else (1, 8)
FILES = int(os.environ.get("PATCHCORE_FAST_BENCH_FILES", 512 if FULL else 16))
HELD_OUT = max(FILES, max(BATCHES))  # query images, none of them in the bank
ROUNDS = int(os.environ.get("PATCHCORE_FAST_BENCH_ROUNDS", 3 if FULL else 2))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))]
_WORKERS = os.environ.get("PATCHCORE_FAST_BENCH_WORKERS")


def workers(device: str) -> int:
    """Reader processes of the files path on ``device`` (module docstring)."""
    if _WORKERS is not None:
        return int(_WORKERS)
    return 0 if device == "cpu" else min(8, os.cpu_count() or 1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def images_dir():
    """Generated 256 x 256 PNG photos (demo data): BANK_IMAGES good ones for the banks,
    then HELD_OUT ones for the queries."""
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_data(tmp, seed=0, n_train=BANK_IMAGES + HELD_OUT, n_test_good=0,
                        n_test_defect=0)
        yield Path(tmp) / "widget" / "train" / "good"


def _query_paths(images_dir: Path) -> list:
    return list_images([images_dir])[BANK_IMAGES:]


@pytest.fixture(scope="module")
def train_batch(images_dir):
    """(Tensor[BANK_IMAGES, 3, 224, 224], Tensor[max(BATCHES), 3, 224, 224]): the bank's
    images and held-out query images, preprocessed."""
    model = PatchCore(PatchCoreConfig())
    bank = list_images([images_dir])[:BANK_IMAGES]
    held = _query_paths(images_dir)[:max(BATCHES)]
    return tuple(torch.cat([b for _, b, _ in iterate_images(paths, model.preprocess, 8)])
                 for paths in (bank, held))


_MODELS: dict = {}


def ours(device: str, precision: str) -> PatchCore:
    """Our model on ``device``, bank of BANK_ROWS of its own embeddings (built once)."""
    key = (device, precision)
    if key not in _MODELS:
        model = PatchCore(PatchCoreConfig(backbone="wide_resnet50_2", pretrained=False,
                                          device=device, seed=0, precision=precision,
                                          num_workers=workers(device)))
        base = _MODELS.get(("bank", device))
        if base is None and precision != "fp32":
            ours(device, "fp32")  # the bank is always the fp32 embeddings
            base = _MODELS[("bank", device)]
        if base is None:
            images = _MODELS["train"].to(device)
            with torch.inference_mode():
                feats = torch.cat([model.embedder(images[i:i + 8])[0].flatten(0, 1)
                                   for i in range(0, len(images), 8)])
            model._set_bank(feats[:BANK_ROWS].contiguous())
            _MODELS[("bank", device)] = (model.bank, model.neighbors)
        else:
            model.bank, model.neighbors = base
        model.grid = (28, 28)
        with torch.inference_mode():
            held = _MODELS["held"].to(device)
            scores, maps = model.score_embeddings(*model.embedder(held))
        _MODELS[("calibration", device)] = calibrate(
            scores.cpu().tolist(), maps.amax(dim=(1, 2)).cpu().tolist(),
            float(maps.median()), 0.01, "holdout", 1)
        _MODELS[key] = model
    return _MODELS[key]


def peer(device: str):
    """anomalib's PatchcoreModel, bank of BANK_ROWS of its own (1,536-d) embeddings."""
    key = ("anomalib", device)
    if key not in _MODELS:
        torch.manual_seed(0)
        m = PatchcoreModel(layers=["layer2", "layer3"], backbone="wide_resnet50_2",
                           pre_trained=False, num_neighbors=9).to(device)
        m.train()
        images = _MODELS["train"].to(device)
        with torch.no_grad():
            emb = torch.cat([m(images[i:i + 8]) for i in range(0, len(images), 8)])
        m.memory_bank = emb[:BANK_ROWS].contiguous()
        m.eval()
        _MODELS[key] = m
    return _MODELS[key]


def _run(benchmark, fn, device: str, images: int) -> None:
    def call():
        out = fn()
        _sync(device)
        return out

    call()  # warm-up (lazy init, allocator, oneDNN primitives)
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1)
    per_call = benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = round(images / per_call, 2)
    benchmark.extra_info["ms_per_image"] = round(1e3 * per_call / images, 1)
    print(f"\n{benchmark.name}: {images / per_call:.2f} images/s "
          f"({1e3 * per_call / images:.1f} ms per image)")


@pytest.fixture(scope="module", autouse=True)
def _train(train_batch):
    _MODELS["train"], _MODELS["held"] = train_batch
    yield
    _MODELS.clear()


def _batch(b: int, device: str, inputs: str) -> torch.Tensor:
    if inputs == "photos":
        return _MODELS["held"][:b].to(device)
    g = torch.Generator().manual_seed(b)
    return torch.randn(b, 3, 224, 224, generator=g).to(device)


INPUTS = ["photos", "noise"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("inputs", INPUTS)
def test_kernel_tensors(benchmark, device, batch, precision, inputs):
    """Ours: preprocessed tensors on the device -> scores and maps."""
    benchmark.group = f"tensors-{device}-b{batch}-{inputs}"
    if precision == "bf16" and device == "cpu" and batch > 1 and not FULL:
        pytest.skip("bf16 on the CPU beyond batch 1: full runs only (emulated without "
                    "AVX512-BF16, minutes per batch)")
    if precision == "bf16" and inputs == "noise":
        pytest.skip("bf16: photos only")
    model = ours(device, precision)
    x = _batch(batch, device, inputs)

    def fn():
        with torch.inference_mode():
            patches, grid = model.embed(x)
            return model.score_embeddings(patches, grid)

    _run(benchmark, fn, device, batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tensors_cuda_graphs(benchmark, batch, precision):
    """From tensors on CUDA to scores and maps (as ``test_kernel_tensors``, photos), the
    embedder run as it is against replayed from CUDA graphs (``model.cuda_graphs``,
    issue #24 item 4), alternated call by call; ``extra_info``: both medians, the median of
    the per-pair ratios, and the median of 100 graphed calls after the pairs (the issue's
    one-image figure at batch 1)."""
    benchmark.group = f"tensors-cuda-b{batch}-photos-graphs-{precision}"
    model = ours("cuda", precision)
    x = _batch(batch, "cuda", "photos")

    def once(graphs: bool):
        model.cuda_graphs = graphs
        with torch.inference_mode():
            out = model.score_embeddings(*model.embed(x))
        torch.cuda.synchronize()
        return out

    times: dict[str, list[float]] = {"eager": [], "graphs": []}

    def pair():
        for name in ("eager", "graphs"):
            start = time.perf_counter()
            once(name == "graphs")
            times[name].append(time.perf_counter() - start)

    try:
        eager, graphed = once(False), once(True)  # the second captures the graph
        torch.testing.assert_close(graphed[0], eager[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graphed[1], eager[1], rtol=1e-5, atol=1e-5)
        benchmark.pedantic(pair, rounds=max(20, 5 * ROUNDS), iterations=1, warmup_rounds=2)
        hundred = []
        for _ in range(100):
            start = time.perf_counter()
            once(True)
            hundred.append(time.perf_counter() - start)
    finally:
        model.cuda_graphs = False
    ratios = [g / e for g, e in zip(times["graphs"], times["eager"])]
    info = {"eager_ms": round(1e3 * statistics.median(times["eager"]), 3),
            "graphs_ms": round(1e3 * statistics.median(times["graphs"]), 3),
            "graphs_over_eager": round(statistics.median(ratios), 3),
            "graphs_median_of_100_ms": round(1e3 * statistics.median(hundred), 3),
            "graphs_images_per_s": round(batch / statistics.median(hundred), 1)}
    benchmark.extra_info.update(info)
    print(f"\n{benchmark.group}: {info}")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("inputs", INPUTS)
def test_tensors_bank_operands(benchmark, batch, inputs):
    """Ours from tensors on the CPU (as ``test_kernel_tensors``) with the k-NN's bank
    operands kept by the model (``ops.knn_bank``, made on the first call) against made on
    every call, alternated call by call (this machine drifts between seconds);
    ``extra_info``: both medians and the median of the per-pair ratios."""
    benchmark.group = f"tensors-cpu-b{batch}-{inputs}-operands"
    model = ours("cpu", "fp32")
    x = _batch(batch, "cpu", inputs)
    kept = model._knn_operands
    times: dict[str, list[float]] = {"per_call": [], "kept": []}

    def pair():
        try:
            for name in ("per_call", "kept"):
                model._knn_operands = (lambda bank: None) if name == "per_call" else kept
                start = time.perf_counter()
                with torch.inference_mode():
                    model.score_embeddings(*model.embedder(x))
                times[name].append(time.perf_counter() - start)
        finally:
            del model._knn_operands  # the class's method again

    benchmark.pedantic(pair, rounds=max(5, 3 * ROUNDS), iterations=1, warmup_rounds=1)
    ratios = [k / p for k, p in zip(times["kept"], times["per_call"])]
    info = {"per_call_ms": round(1e3 * statistics.median(times["per_call"]), 1),
            "kept_ms": round(1e3 * statistics.median(times["kept"]), 1),
            "kept_over_per_call": round(statistics.median(ratios), 3)}
    benchmark.extra_info.update(info)
    print(f"\n{benchmark.group}: {info}")


@pytest.mark.skipif(PatchcoreModel is None, reason="anomalib is not installed")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("inputs", INPUTS)
def test_anomalib_tensors(benchmark, device, batch, inputs):
    """anomalib 2.7's PatchcoreModel, same backbone, layers and bank size."""
    benchmark.group = f"tensors-{device}-b{batch}-{inputs}"
    model = peer(device)
    x = _batch(batch, device, inputs)

    def fn():
        with torch.inference_mode():
            out = model(x)
            return out.pred_score.cpu(), out.anomaly_map.cpu()

    _run(benchmark, fn, device, batch)


FILE_BATCHES = (8, 64) if FULL else (8,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", FILE_BATCHES)
def test_decode_only(benchmark, images_dir, device, batch):
    """Files -> normalised tensors on the device, the same reader and workers as scoring."""
    benchmark.group = f"files-{device}-b{batch}"
    model = ours(device, "fp32")
    paths = _query_paths(images_dir)[:FILES]
    _run(benchmark, lambda: _decode_files(model, paths, batch, device), device, len(paths))


def _decode_files(model: PatchCore, paths: list, batch: int, device: str) -> None:
    """Files -> normalised tensors on the device, with the score path's reader and workers
    (the decode-only entries)."""
    for _, x, _ in iterate_images(paths, model.preprocess, batch, workers(device)):
        x.to(device)


def _score_files(model: PatchCore, paths: list, overlays: bool,
                 overlay_format: str = "png") -> dict:
    """The CLI's score path over ``paths`` into a temporary folder (regions found)."""
    with tempfile.TemporaryDirectory() as out:
        return score_images(model, paths, {p: p.stem for p in paths}, Path(out), [],
                            overlays=overlays, regions={}, overlay_format=overlay_format)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", FILE_BATCHES)
@pytest.mark.parametrize("kind", ["no-overlays", "overlays", "overlays-jpg",
                                  "overlays-uncalibrated"])
def test_kernel_files(benchmark, images_dir, device, batch, kind):
    """Ours through the CLI's score path: files -> scores.csv inputs and regions (+ overlay
    PNGs)."""
    benchmark.group = f"files-{device}-b{batch}"
    model = ours(device, "fp32")
    model.config.batch_size = batch
    overlays = kind != "no-overlays"
    model.calibration = None if kind == "overlays-uncalibrated" \
        else _MODELS[("calibration", device)]
    paths = _query_paths(images_dir)[:FILES]
    fmt = "jpg" if kind == "overlays-jpg" else "png"

    def fn():
        return _score_files(model, paths, overlays, fmt)

    try:
        _run(benchmark, fn, device, len(paths))
        if overlays:
            with tempfile.TemporaryDirectory() as out:
                regions: dict = {}
                score_images(model, paths[:2], {p: p.stem for p in paths}, Path(out), [],
                             overlays=True, regions=regions, overlay_format=fmt)
                assert len(list((Path(out) / "overlays").glob(f"*.{fmt}"))) == 2
                assert len(regions) == (0 if model.calibration is None else 2)
    finally:
        model.calibration = None


JPEG_SIZE = 900


@pytest.fixture(scope="module")
def jpeg_dir(images_dir):
    """The query photos as 900 x 900 JPEG files at quality 95 (the generated photos
    upscaled: a line camera's size and format, issue #24's workload; the MVTec data does
    not travel to the GPU machine)."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        for p in _query_paths(images_dir)[:FILES]:
            with Image.open(p) as im:
                im.convert("RGB").resize((JPEG_SIZE, JPEG_SIZE), Image.BICUBIC).save(
                    Path(tmp) / f"{p.stem}.jpg", quality=95)
        yield Path(tmp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", FILE_BATCHES)
@pytest.mark.parametrize("kind", ["decode-only", "overlays-jpg", "overlays"])
def test_jpeg_files(benchmark, jpeg_dir, device, batch, kind):
    """900 x 900 JPEG files, side by side in one run (issue #24: files to scores and JPEG
    overlays at least 80 % of the decoding rate): ``decode-only`` (files -> normalised
    tensors on the device, the same reader and workers as scoring), ``overlays-jpg``
    (the CLI's score path, regions found and JPEG overlays at the photo's size written as
    each batch is scored) and ``overlays`` (the same with PNG overlays)."""
    benchmark.group = f"files-jpeg{JPEG_SIZE}-{device}-b{batch}"
    model = ours(device, "fp32")
    model.config.batch_size = batch
    paths = list_images([jpeg_dir])
    assert len(paths) == FILES and all(p.suffix == ".jpg" for p in paths)
    if kind == "decode-only":
        def fn():
            _decode_files(model, paths, batch, device)
    else:
        fmt = "jpg" if kind == "overlays-jpg" else "png"
        model.calibration = _MODELS[("calibration", device)]

        def fn():
            return _score_files(model, paths, True, fmt)

    try:
        _run(benchmark, fn, device, len(paths))
        if kind != "decode-only":
            with tempfile.TemporaryDirectory() as out:
                score_images(model, paths[:1], {p: p.stem for p in paths}, Path(out), [],
                             overlays=True, regions={}, overlay_format=fmt)
                from PIL import Image

                with Image.open(Path(out) / "overlays" / f"{paths[0].stem}.{fmt}") as im:
                    assert im.size == (JPEG_SIZE, JPEG_SIZE)
    finally:
        model.calibration = None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", FILE_BATCHES)
def test_files_paired_with_tensors(benchmark, images_dir, device, batch):
    """The files path with overlays (one pass, calibrated) against the tensors path on the
    same images, round by round: each round scores the query images once preprocessed in
    memory (batches of ``batch``: the embedder and ``score_embeddings``, as the tensors
    groups) and once as files through the CLI's score path with overlays. This machine's
    speed drifts by tens of percent between minutes, more than the gap measured, so each
    files run is compared with the tensors runs just before and after it (their mean;
    ``extra_info``: both rates' medians and the median of the per-round ratios)."""
    benchmark.group = f"files-{device}-b{batch}-paired"
    model = ours(device, "fp32")
    model.config.batch_size = batch
    model.calibration = _MODELS[("calibration", device)]
    paths = _query_paths(images_dir)[:FILES]
    x = torch.cat([b for _, b, _ in iterate_images(paths, model.preprocess, batch)]).to(device)
    rates: dict[str, list[float]] = {"tensors": [], "files": []}

    def tensors():
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                model.score_embeddings(*model.embedder(x[i:i + batch]))

    def files():
        _score_files(model, paths, overlays=True)

    def timed(name, fn):
        start = time.perf_counter()
        fn()
        _sync(device)
        rates[name].append(len(paths) / (time.perf_counter() - start))

    def round_():
        timed("tensors", tensors)
        timed("files", files)

    try:
        round_()  # warm-up
        rates = {k: [] for k in rates}
        benchmark.pedantic(round_, rounds=max(3, ROUNDS), iterations=1)
        timed("tensors", tensors)  # after the last files run too
    finally:
        model.calibration = None
    # Each files run against the mean of the tensors runs just before and after it: a
    # drift of the machine's speed that is linear over the three runs cancels out.
    t = rates["tensors"]
    ratios = [f / ((t[i] + t[i + 1]) / 2) for i, f in enumerate(rates["files"])]
    info = {"tensors_images_per_s": round(statistics.median(rates["tensors"]), 2),
            "files_overlays_images_per_s": round(statistics.median(rates["files"]), 2),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratios": [round(r, 3) for r in ratios]}
    benchmark.extra_info.update(info)
    print(f"\n{benchmark.name}: {info}")


def _smooth_map(gen: torch.Generator, size: int) -> np.ndarray:
    """A map as the model's are: 28 x 28 noise around 1 brought up to ``size`` x ``size``."""
    return torch.nn.functional.interpolate(1 + 0.3 * torch.randn(1, 1, 28, 28, generator=gen),
                                           size=(size, size), mode="bilinear")[0, 0].numpy()


@pytest.mark.parametrize("photo", ["pixels-of-the-map", "read-again"])
def test_overlay_of_a_bottle_photo(benchmark, photo):
    """One overlay's work at a real photo's size, as a score run's writer thread does it:
    the regions of a 900 x 900 map at a threshold, then the overlay PNG with their
    outlines, on MVTec AD bottle's photos. ``pixels-of-the-map``: the one pass's way (the
    pixels read for the map are handed over); ``read-again``: the photo decoded a second
    time (the two-pass way: evaluate, a model without calibration). The maps are smooth
    fields (28 x 28 noise brought up to the photo's size, as the model's are) with a few
    regions above the threshold. Time per photo (10 photos a round)."""
    import _common
    from patchcore_fast.geometry import Preprocess
    from patchcore_fast.images import read_image
    from patchcore_fast.overlays import write_overlay
    from patchcore_fast.regions import find_regions

    files = sorted((_common.mvtec_root() / "bottle" / "test" / "broken_large").glob("*.png"))
    files = files[:10]
    if not files:
        pytest.skip("MVTec AD bottle not found")
    benchmark.group = "overlay-bottle-photo"
    gen = torch.Generator().manual_seed(0)
    maps = [_smooth_map(gen, 900) for _ in files]
    pixels = [np.asarray(read_image(f)) if photo == "pixels-of-the-map" else None
              for f in files]
    pre = Preprocess(256, 224)
    with tempfile.TemporaryDirectory() as out:
        def draw():
            for i, source in enumerate(files):
                _, mask = find_regions(maps[i], 1.5)
                write_overlay(Path(out) / f"{i}.png", source, maps[i], pre, 0.5, 2.0, mask,
                              pixels[i])

        draw()  # warm-up
        benchmark.pedantic(draw, rounds=max(3, ROUNDS), iterations=1)
        size = sum((Path(out) / f"{i}.png").stat().st_size for i in range(len(files)))
    benchmark.extra_info.update(photos=len(files), ms_per_photo=round(
        benchmark.stats.stats.median / len(files) * 1e3, 1),
        overlay_kb=round(size / len(files) / 1024))


def _overlays_of(files: list, size: int) -> list:
    """The overlays (uint8 [size, size, 3]) of ``files``' photos under smooth maps."""
    from patchcore_fast.images import read_image
    from patchcore_fast.overlays import overlay

    gen = torch.Generator().manual_seed(1)
    out = []
    for f in files:
        photo = np.asarray(read_image(f).resize((size, size)))
        out.append(overlay(photo, _smooth_map(gen, size), 0.5, 2.0))
    return out


@pytest.mark.parametrize("size", [256, 900])
@pytest.mark.parametrize("encoder", ["png_bytes", "pillow-png", "jpg"])
def test_overlay_file_encoder(benchmark, size, encoder):
    """Encoding overlays: ours as PNG (:func:`~patchcore_fast.overlays.png_bytes`: the Up
    filter on every row, zlib level 1 run-length) against Pillow's PNG at the same zlib
    settings (which tries all five filters on every row), and ``--overlay-format jpg``
    (:func:`~patchcore_fast.overlays.encode_overlay`: Pillow's JPEG at quality 90), on
    overlays of bottle's photos at the bench's photo size (256) and the real one (900).
    Time per overlay and size."""
    import io

    import _common
    from PIL import Image

    from patchcore_fast.overlays import ZLIB_LEVEL, ZLIB_STRATEGY, encode_overlay, png_bytes

    files = sorted((_common.mvtec_root() / "bottle" / "test" / "broken_large").glob("*.png"))
    if not files:
        pytest.skip("MVTec AD bottle not found")
    images = _overlays_of(files[:10], size)
    benchmark.group = f"overlay-file-{size}"

    def pillow(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=ZLIB_LEVEL,
                                compress_type=ZLIB_STRATEGY)
        return buf.getvalue()

    encode = {"png_bytes": png_bytes, "pillow-png": pillow,
              "jpg": lambda a: encode_overlay(a, "jpg")}[encoder]
    for a in images:  # PNG is lossless; the JPEG is the same picture up to its loss
        with Image.open(io.BytesIO(encode(a))) as img:
            got = np.asarray(img, dtype=np.int16)
            if encoder == "jpg":
                assert np.abs(got - a).mean() < 4
            else:
                assert np.array_equal(got, a)
    sizes = benchmark.pedantic(lambda: [len(encode(a)) for a in images],
                               rounds=max(5, ROUNDS), iterations=1)
    benchmark.extra_info.update(ms_per_overlay=round(
        benchmark.stats.stats.median / len(images) * 1e3, 2),
        kb_per_overlay=round(sum(sizes) / len(sizes) / 1024))
