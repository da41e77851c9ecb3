"""Bounded memory: fit's peak RSS grows with the projected bank, not with the full bank;
evaluate holds no arrays of the whole test set.

The small version of ``bench/bench_memory.py`` (the 1,000-image acceptance run). Absolute
peaks depend on the machine's torch build and allocator, so the test compares how the peak
grows from 8 to 120 images on both paths: the in-memory path by at least the full bank
(N x 784 x 1,024 x 4 bytes, twice while it is concatenated); the streaming path by the
128-d projections (an eighth of it) plus allocator noise.
"""

import importlib.util
import json
import tracemalloc
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_memory.py"
_spec = importlib.util.spec_from_file_location("bench_memory", _BENCH)
bench_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_memory)

ARGS = ["--backbone", "wide_resnet50_2", "--pretrained", "false", "--coreset-ratio", "0.01",
        "--image-size", "224", "--crop", "224", "--device", "cpu", "--quiet"]
BANK_BYTES_PER_IMAGE = 784 * 1024 * 4  # full-width rows of one 224 x 224 image


@pytest.mark.slow
def test_streaming_fit_peak_rss_grows_with_projections_only(tmp_path):
    # A wide gap (112 images: 343 MiB of full-width rows) keeps the comparison far above
    # the allocator's noise (70-140 MiB seen between runs of the same fit).
    small, large = 8, 120
    peaks = {}
    for n in (small, large):
        folder = tmp_path / f"good{n}"
        bench_memory.write_images(folder, n)
        for path, extra in (("streaming", []), ("in-memory", ["--in-memory"])):
            peaks[path, n], _, _ = bench_memory.fit_peak_rss(
                folder, tmp_path / f"m{n}.safetensors", ARGS + extra)
    growth = {path: peaks[path, large] - peaks[path, small]
              for path in ("streaming", "in-memory")}
    full = (large - small) * BANK_BYTES_PER_IMAGE  # 343 MiB of full-width rows
    print("peak RSS (MiB): " + ", ".join(f"{path} {n} images {v / 2**20:.0f}"
                                         for (path, n), v in peaks.items())
          + f"; full-width rows added: {full / 2**20:.0f}")
    # The in-memory path holds the rows (and a second copy while concatenating them): the
    # measurement sees at least them. Streaming adds (large - small) x 784 x 128 x 4 bytes
    # (43 MiB) of projections plus allocator noise (70-140 MiB measured on 2 cores).
    assert growth["in-memory"] >= full
    assert growth["streaming"] < growth["in-memory"] / 2
    assert peaks["streaming", large] < peaks["in-memory", large]


def test_evaluate_holds_no_maps_of_the_whole_set(tmp_path, monkeypatch):
    # The numpy memory evaluate holds at its peak must not grow with the number of test
    # images: maps are counted into histograms (kept tiny here by a small MAX_BINS) and
    # parked in a temporary file. Holding the maps of 40 more 224 x 224 images would add
    # 8 MB (and sorting all their pixels for exact metrics tens of MB more). tracemalloc
    # sees numpy's buffers (not torch's, nor Pillow's: the backbone does not count).
    from patchcore_fast import metrics, overlays
    from patchcore_fast.cli import main

    monkeypatch.setattr(metrics, "MAX_BINS", 4096)
    # The overlay writers hold at most 2 x threads maps in flight: a constant, but the peak
    # of several threads drawing at once depends on their timing, and with 4 threads (a
    # 4-core host) the 6-image run cannot reach the cap of 8 that the 46-image run reaches
    # (2.3 MB more, seen on CI). One writer thread makes the peak the same on every host.
    monkeypatch.setattr(overlays, "writer_threads", lambda: 1)
    bench_memory.write_images(tmp_path / "train", 3, 224, seed=0)
    model = tmp_path / "m.safetensors"
    args = ["--device", "cpu", "--quiet", "--batch-size", "4"]
    assert main(["fit", str(tmp_path / "train"), "-o", str(model), "--backbone", "resnet18",
                 "--pretrained", "false", "--image-size", "224", "--crop", "224",
                 "--coreset-ratio", "0.1", *args]) == 0
    peaks = {}
    for n in (6, 46):
        layout = bench_memory.write_labelled_set(tmp_path / f"test{n}", n // 2,
                                                  n - n // 2)
        if not peaks:  # a first, untraced run: imports and one-off caches (matplotlib's)
            assert main(["evaluate", str(model), *layout, "-o", str(tmp_path / "warm"),
                         *args]) == 0
        tracemalloc.start()
        try:
            assert main(["evaluate", str(model), *layout, "-o", str(tmp_path / f"eval{n}"),
                         *args]) == 0
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        m = json.loads((tmp_path / f"eval{n}" / "metrics.json").read_text())
        assert m["counts"]["images"] == n and m["pixel_auroc"] is not None
        assert not m["pixel_binning"]["exact"]   # the small MAX_BINS was in force
        assert len(list((tmp_path / f"eval{n}" / "overlays").rglob("*.png"))) == n
    extra_maps = (46 - 6) * 224 * 224 * 4
    print(f"traced numpy peak: 6 images {peaks[6] / 2**20:.1f} MiB, 46 images "
          f"{peaks[46] / 2**20:.1f} MiB; the 40 extra maps alone: {extra_maps / 2**20:.1f} MiB")
    assert peaks[46] - peaks[6] < extra_maps / 4
