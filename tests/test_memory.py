"""Bounded-memory fit: peak RSS grows with the projected bank, not with the full bank.

The small version of ``bench/bench_memory.py`` (the 1,000-image acceptance run). Absolute
peaks depend on the machine's torch build and allocator, so the test compares two fits
that differ only in the number of images: the in-memory path grows by at least the full
bank (N x 784 x 1,024 x 4 bytes, twice while it is concatenated); the streaming path by
the 128-d projections (an eighth of it) plus allocator noise.
"""

import importlib.util
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
    small, large = 8, 56
    peaks = {}
    for n in (small, large):
        folder = tmp_path / f"good{n}"
        bench_memory.write_images(folder, n)
        peaks[n], _, _ = bench_memory.fit_peak_rss(folder, tmp_path / f"m{n}.safetensors",
                                                   ARGS)
    growth = peaks[large] - peaks[small]
    full = (large - small) * BANK_BYTES_PER_IMAGE  # 150 MiB: what the in-memory bank adds
    print(f"peak RSS: {small} images {peaks[small] / 2**20:.0f} MiB, {large} images "
          f"{peaks[large] / 2**20:.0f} MiB; growth {growth / 2**20:.0f} MiB against "
          f"{full / 2**20:.0f} MiB of full-width bank")
    # Streaming adds (large - small) x 784 x 128 x 4 bytes = 19 MiB of projections; the
    # in-memory path adds at least `full` (and 2 x full while concatenating).
    assert growth < full / 2
