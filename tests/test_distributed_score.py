"""score and evaluate under the torchrun environment (CPU, gloo, 2 ranks started here).

Each rank scores its share of the images; the merged outputs must be those of one
process, byte for byte: scores.csv, scores.json, metrics.json (less the timings and the
run's ``distributed`` record), the maps, and the overlays (whose colour scale comes from
the merged pixel histogram). Both sides run with one intra-op thread, and the ranks' shares
are whole batches of the one-process run, so the backbone sees the same batches with the
same arithmetic on either side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchcore_fast import ops

from gloo_ranks import cli_env, spawn_ranks, start_cli_ranks, wait_ranks

N_GOOD, N_DEFECT = 4, 3                # test images: 4 good, 3 scratch, 3 spot
BATCH = 2
RUN = ["--batch-size", str(BATCH), "--device", "cpu", "--quiet"]


def _ranks(argv: list[str], cwd: Path, world: int = 2, timeout: float = 240
           ) -> list[tuple[int, str]]:
    """Run ``patchcore_fast.cli argv`` as ``world`` ranks; (exit code, stderr) by rank."""
    return wait_ranks(start_cli_ranks(argv, world, cwd), timeout)


def _one(argv: list[str], cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "patchcore_fast.cli", *argv], env=cli_env(),
                       cwd=cwd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def _same_files(one: Path, two: Path, skip: tuple[str, ...] = ()) -> None:
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)
    assert not [n for n in a if ".tmp" in n or n.startswith(".")], sorted(a)
    for name in a:
        if name not in skip:
            assert a[name] == b[name], name


@pytest.fixture(scope="module")
def demo(fit_demo):
    root, model = fit_demo("dist-score", seed=5, n_train=6, n_test_good=N_GOOD,
                           n_test_defect=N_DEFECT)
    extra = root / "extra"                 # the last input: in rank 1's share
    extra.mkdir()
    (extra / "zz_broken.png").write_bytes(b"not a png")
    inputs = [str(root / "widget" / "test" / d) for d in ("good", "scratch", "spot")]
    return root, model, [*inputs, str(extra)]


def _score_argv(demo) -> list[str]:
    _, model, inputs = demo
    return ["score", str(model), *inputs, "--save-maps", "--threshold", "1.0", *RUN]


def _evaluate_argv(demo) -> list[str]:
    root, model, _ = demo
    return ["evaluate", str(model), str(root), "--category", "widget", "--save-maps", *RUN]


@pytest.fixture(scope="module")
def one_process(demo, tmp_path_factory):
    """The one-process outputs of score and evaluate (each compared with two runs)."""
    out = tmp_path_factory.mktemp("one")
    _one([*_score_argv(demo), "-o", str(out / "score")], out)
    _one([*_evaluate_argv(demo), "-o", str(out / "evaluate")], out)
    return out


@pytest.mark.parametrize("shards", [False, True], ids=["images-split", "bank-shards"])
def test_score_equals_one_process(demo, one_process, tmp_path, shards):
    inputs = demo[2]
    two = _ranks([*_score_argv(demo), *(["--bank-shards"] if shards else []),
                  "-o", str(tmp_path / "two")], tmp_path)
    for rank, (rc, err) in enumerate(two):
        assert rc == 0, f"rank {rank}: {err}"
    _same_files(one_process / "score", tmp_path / "two")
    got = json.loads((tmp_path / "two" / "scores.json").read_text())
    assert len(got["images"]) == N_GOOD + 2 * N_DEFECT
    assert got["skipped"] == [inputs[-1] + "/zz_broken.png"]
    assert len(list((tmp_path / "two" / "overlays").rglob("*.png"))) == N_GOOD + 2 * N_DEFECT


@pytest.mark.parametrize("shards", [False, True], ids=["images-split", "bank-shards"])
def test_evaluate_equals_one_process(demo, one_process, tmp_path, shards):
    two = _ranks([*_evaluate_argv(demo), *(["--bank-shards"] if shards else []),
                  "-o", str(tmp_path / "two")], tmp_path)
    for rank, (rc, err) in enumerate(two):
        assert rc == 0, f"rank {rank}: {err}"
    one = one_process / "evaluate"
    _same_files(one, tmp_path / "two", skip=("metrics.json",))
    want = json.loads((one / "metrics.json").read_text())
    got = json.loads((tmp_path / "two" / "metrics.json").read_text())
    n = N_GOOD + 2 * N_DEFECT
    first = -(-n // BATCH) // 2 * BATCH  # rank 0: the first half of the batches
    assert got.pop("distributed") == {"world_size": 2, "bank_shards": shards,
                                      "rank_images": [n, n] if shards else [first, n - first]}
    for timing in ("score_seconds", "seconds_per_image"):
        assert got.pop(timing) > 0 and want.pop(timing) > 0
    assert got == want
    assert want["pixel_auroc"] is not None and want["pro"] is not None


def test_failed_rank_stops_the_others(demo, tmp_path):
    """--on-error fail: rank 1 meets the broken file; both stop with one line, nothing
    merged. (A calibrated model's overlays are written as each batch is scored, so the
    overlays of images scored before the failure may stay, each complete; no table is
    written.)"""
    _, model, inputs = demo
    out = tmp_path / "out"
    two = _ranks(["score", str(model), *inputs, "--on-error", "fail", *RUN, "-o", str(out)],
                 tmp_path)
    (rc0, err0), (rc1, err1) = two
    assert rc0 == 2 and rc1 == 2
    assert err0.splitlines() == [f"patchcore-fast: error: rank 0 of 2: rank 1 of 2 failed "
                                 f"(cannot use {inputs[-1]}/zz_broken.png: not an image); "
                                 f"nothing was merged"]
    assert err1.splitlines() == [f"patchcore-fast: error: rank 1 of 2: cannot use "
                                 f"{inputs[-1]}/zz_broken.png: not an image (--on-error fail; "
                                 f"--on-error skip leaves such files out)"]
    assert not (out / "scores.csv").exists() and not (out / "scores.json").exists()
    assert all(p.suffix == ".png" and not p.name.startswith(".")
               for p in out.rglob("*") if p.is_file())  # complete overlays only


@pytest.mark.parametrize("verb", ["score-resume", "study"])
def test_refused_under_torchrun(demo, tmp_path, verb):
    root, model, inputs = demo
    argv = (["score", str(model), *inputs, "--resume", "-o", str(tmp_path / "out")]
            if verb == "score-resume" else
            ["study", str(root), "--category", "widget", "-o", str(tmp_path / "out")])
    why = ("--resume does not run under torchrun (the resume journal is written by one "
           "process); resume the run as one process" if verb == "score-resume" else
           "study does not run under torchrun yet; run it as one process")
    for rank, (rc, err) in enumerate(_ranks([*argv, *RUN], tmp_path)):
        assert rc == 2
        assert err.splitlines() == [f"patchcore-fast: error: rank {rank} of 2: {why}"]
    assert not (tmp_path / "out").exists()


# ----- the sharded bank's k nearest, 2 gloo processes ---------------------------------------

def _bank_cases() -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """(bank, queries, ks): ties across the two shards, k above a shard's rows, a rank
    with no rows."""
    g = torch.Generator().manual_seed(7)
    bank = torch.randn(37, 16, generator=g) * 3 + 1
    bank[30] = bank[3]                     # a tie across the shards (rows 0-17 | 18-36)
    bank[20] = bank[19]                    # and inside one
    queries = torch.cat([torch.randn(20, 16, generator=g) * 3 + 1, bank[[3, 19, 30, 0]]])
    one = torch.randn(1, 8, generator=g)   # 1 row: rank 0 holds none
    return [(bank, queries, [1, 2, 5, 18, 19, 37]), (one, torch.randn(3, 8, generator=g), [1])]


def _bank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from patchcore_fast.sharded import ShardedBank

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = []
        for bank, queries, ks in _bank_cases():
            sharded = ShardedBank(bank, rank, world, torch.device("cpu"))
            index = torch.tensor([[0, bank.shape[0] - 1], [bank.shape[0] // 2, 0]])
            results.append(([sharded.knn(queries, k) for k in ks], sharded[index],
                             sharded.knn(queries[:0], 1), sharded.hi - sharded.lo))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_bank_knn_equals_whole_bank(tmp_path):
    per_rank = spawn_ranks(_bank_worker, 2, tmp_path, timeout_s=120,
                           what="the sharded-bank workers")
    for c, (bank, queries, ks) in enumerate(_bank_cases()):
        index = torch.tensor([[0, bank.shape[0] - 1], [bank.shape[0] // 2, 0]])
        assert [per_rank[r][c][3] for r in range(2)] == [bank.shape[0] // 2,
                                                        bank.shape[0] - bank.shape[0] // 2]
        for r in range(2):
            knns, rows, empty, _ = per_rank[r][c]
            for k, (d, i) in zip(ks, knns):
                want_d, want_i = ops.knn(queries, bank, k)
                assert torch.equal(d, want_d) and torch.equal(i, want_i), (c, r, k)
            assert torch.equal(rows, bank[index]), (c, r)
            assert empty[0].shape == (0, 1) and empty[1].shape == (0, 1)
    # The ties: the kernel puts row 3 before 30 and 19 before 20; the merge agrees.
    d, i = per_rank[0][0][0][1]  # k = 2
    assert i[20:23].tolist() == [[3, 30], [19, 20], [3, 30]]
    assert d[20:23].tolist() == [[0.0, 0.0]] * 3


def test_rank_killed_mid_score(demo, tmp_path):
    """A rank that dies: the other ends with one line and exit code 1 at the next exchange;
    the merged scores.csv / scores.json are never written."""
    import shutil
    import signal

    root, model, _ = demo
    many = tmp_path / "many"                # 40 images: rank 1 is still busy when killed
    many.mkdir()
    for n in range(10):
        for src in sorted((root / "widget" / "test" / "good").glob("*.png")):
            shutil.copy(src, many / f"{n}_{src.name}")
    out = tmp_path / "out"
    argv = ["score", str(model), str(many), "--batch-size", "1", "--device", "cpu",
            "--dist-timeout", "60", "-o", str(out)]
    procs = start_cli_ranks(argv, 2, tmp_path)
    try:
        assert procs[0].stderr.read(1)      # rank 0's progress bar: the group is up
        os.kill(procs[1].pid, signal.SIGKILL)
        _, err0 = procs[0].communicate(timeout=120)
        procs[1].wait(timeout=30)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 1
    lines = [line for line in err0.replace("\r", "\n").splitlines()
             if line.startswith("patchcore-fast:")]
    assert len(lines) == 1 and "rank 0 of 2" in lines[0] and "another process" in lines[0], \
        err0
    assert "Traceback" not in err0
    assert not (out / "scores.csv").exists() and not (out / "scores.json").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_merged_rank_histograms_equal_one_histogram():
    """What evaluate's ranks send (pickled PixelHistograms) merges into the histogram one
    process builds: same bins (also once coarsened), so the same colour scale and AUROC."""
    import pickle

    import numpy as np

    from patchcore_fast.metrics import PixelHistogram

    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, size=(7, 32, 32)).astype(np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[1, 5:12, 5:12] = masks[4, 20:30, 2:9] = masks[6, 0:3, 0:30] = True
    for max_bins in (None, 300):
        one = PixelHistogram(max_bins)
        for m, k in zip(maps, masks):
            one.add(m, k)
        parts = []
        for share in (slice(0, 3), slice(3, 3), slice(3, 7)):  # an empty rank too
            h = PixelHistogram(max_bins)
            for m, k in zip(maps[share], masks[share]):
                h.add(m, k)
            sent = pickle.dumps(h)
            assert not h._pending  # pickling bins the waiting pixels first
            parts.append(pickle.loads(sent))
        merged = PixelHistogram.combined(parts)
        assert merged.exact == one.exact == (max_bins is None)
        assert merged.shift == one.shift
        for name in ("keys", "normal", "defect"):
            assert np.array_equal(getattr(merged, name), getattr(one, name)), name
        np.testing.assert_allclose(merged.weight, one.weight, rtol=1e-12)
        assert (merged.regions, merged.images) == (one.regions, one.images) == (3, 7)
        for q in (0.01, 0.5, 0.999):
            assert merged.quantile(q) == one.quantile(q)
        assert merged.auroc() == one.auroc()
        assert merged.pro() == pytest.approx(one.pro(), rel=1e-12)
