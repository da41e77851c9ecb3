"""The distributed fit through the CLI under the torchrun environment (CPU, gloo, 2 ranks).

The ranks are started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), with one intra-op thread each, as torchrun sets; the one-process fit it is
compared with also uses one thread, since the backbone's convolutions round differently
with other thread counts (the bank is then equal to about 1e-5, not bit for bit).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gloo_ranks import cli_env, spawn_ranks, start_cli_ranks, wait_ranks

# 128 px keeps each fit short here; the grid (16 x 16 = 256 rows per image, 53,504 rows)
# still has projection blocks that straddle the two ranks' rows.
SIZE = ["--image-size", "128", "--crop", "128"]


def _tensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


@pytest.mark.parametrize("ratio", ["0.01", "0.1"])
def test_distributed_fit_equals_one_process(mvtec_root, tmp_path, ratio):
    argv = ["fit", str(mvtec_root), "--category", "bottle", "--backbone",
            "efficientnet_lite0", "--coreset-ratio", ratio, "--device", "cpu", "--quiet",
            *SIZE, "-o"]
    t0 = time.perf_counter()
    results = wait_ranks(start_cli_ranks([*argv, str(tmp_path / "two.safetensors")], 2,
                                          tmp_path), timeout=300)
    t1 = time.perf_counter()
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank}: {err}"
    one = subprocess.run([sys.executable, "-m", "patchcore_fast.cli", *argv,
                          str(tmp_path / "one.safetensors")], env=cli_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    t2 = time.perf_counter()
    assert one.returncode == 0, one.stderr
    print(f"bottle {ratio}: 2 ranks {t1 - t0:.1f} s, 1 process {t2 - t1:.1f} s")
    got, meta = _tensors(tmp_path / "two.safetensors")
    want, want_meta = _tensors(tmp_path / "one.safetensors")
    assert sorted(got) == sorted(want) == ["bank", "neighbourhoods", "projection"]
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert meta["config"] == want_meta["config"]
    # The calibration (folds, fold banks, out-of-sample scores, thresholds, pixel
    # quantiles) is the one-process fit's: the same JSON, number for number.
    assert "calibration" in want_meta
    assert meta["calibration"] == want_meta["calibration"]
    stats = json.loads(meta["fit_stats"])
    assert stats["calibration_seconds"] > 0
    assert stats["world_size"] == 2
    assert stats["rank_images"] == [104, 105]  # 209 good bottles, split in rank order
    assert stats["images"] == 209 and stats["patches"] == 209 * 256
    assert stats["rank_patches"] == [104 * 256, 105 * 256]
    assert "world_size" not in json.loads(want_meta["fit_stats"])
    assert not list(tmp_path.glob("*.tmp*")), "a temporary file was left behind"
    if ratio == "0.01":  # the 2-rank model labels images with its own threshold
        good = mvtec_root / "bottle" / "test" / "good"
        r = subprocess.run([sys.executable, "-m", "patchcore_fast.cli", "score",
                            str(tmp_path / "two.safetensors"),
                            *map(str, sorted(good.iterdir())[:4]), "-o", str(tmp_path / "s"),
                            "--no-overlays", "--device", "cpu"], env=cli_env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "labels: defective above the model's calibrated threshold" in r.stderr
        assert "no calibrated threshold" not in r.stderr
        scored = json.loads((tmp_path / "s" / "scores.json").read_text())
        cal = json.loads(meta["calibration"])
        assert scored["threshold"] == cal["image_threshold"]
        assert len(scored["images"]) == 4
        for rec in scored["images"]:
            assert rec["label"] == ("defective" if rec["score"] > cal["image_threshold"]
                                    else "good")
            assert 0 < rec["normalised"] < 1


def test_rank_killed_mid_fit(mvtec_root, tmp_path):
    model = tmp_path / "m.safetensors"
    argv = ["fit", str(mvtec_root), "--category", "bottle", "--backbone",
            "efficientnet_lite0", "--coreset-ratio", "0.01", "--device", "cpu",
            "--dist-timeout", "60", *SIZE, "-o", str(model)]
    procs = start_cli_ranks(argv, 2, tmp_path)
    # Rank 0 prints its first line once the process group is up and the fit starts; the
    # features of 104 images take several seconds more, so rank 1 dies mid-fit.
    first = procs[0].stderr.readline()
    assert first.startswith("fit bottle"), first
    time.sleep(1.0)
    os.kill(procs[1].pid, signal.SIGKILL)
    (rc0, err0), (rc1, _) = wait_ranks(procs, timeout=180)
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0
    lines = [line for line in err0.splitlines() if line.startswith("patchcore-fast: error")]
    assert len(lines) == 1, err0
    assert "rank 0 of 2" in lines[0] and "another process" in lines[0], lines[0]
    assert "Traceback" not in err0, err0
    assert not model.exists()
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_incomplete_launch_environment(tmp_path):
    r = subprocess.run([sys.executable, "-m", "patchcore_fast.cli", "fit", str(tmp_path),
                        "-o", str(tmp_path / "m.safetensors")], cwd=tmp_path,
                       env=cli_env(RANK="0", WORLD_SIZE="2"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "patchcore-fast: error: the distributed launch variables are incomplete: RANK, "
        "WORLD_SIZE set but not LOCAL_RANK, MASTER_ADDR, MASTER_PORT (start the run with "
        "torchrun)"]


# ----- the fit's pieces, 3 gloo processes on synthetic rows --------------------------------

# Rows per rank. Case 0: block 1 ([8192, 16384)) straddles all three ranks, with pieces of
# 1 and 2 rows (MKL rounds products of 1-3 rows differently from a whole block: projecting
# each rank's piece on its own fails this test). Case 1: an empty rank 0 and a block
# boundary exactly at a rank boundary.
FIT_CASES = [dict(counts=[8193, 2, 12000], dim=200, ratio=0.003, seed=3, in_memory=False),
             dict(counts=[0, 8192, 7001], dim=160, ratio=0.004, seed=5, in_memory=True)]


def _rows(case: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(case["seed"])
    return torch.randn(sum(case["counts"]), case["dim"], generator=g) * 4 + 2


def _fit_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from patchcore_fast import distributed, sharded
    from patchcore_fast.coreset import StreamingCoreset

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        launch = distributed.Launch(rank, world, rank)
        results = []
        for case in FIT_CASES:
            rows, counts = _rows(case), case["counts"]
            lo = sum(counts[:rank])
            with StreamingCoreset(case["ratio"], 128, case["seed"], in_memory=case["in_memory"],
                                  project=False) as sc:
                for a in range(lo, lo + counts[rank], 1000):  # arbitrary batches
                    sc.add(rows[a:min(a + 1000, lo + counts[rank])])
                shard = sharded.project_shard(sc, launch, case["dim"], counts,
                                                  torch.device("cpu"))
                n = sum(counts)
                idx = sharded.select_sharded(shard, n, case["ratio"], sc, case["dim"],
                                                 torch.device("cpu"))
                bank = sharded.gather_bank(sc, idx, launch, case["dim"], counts,
                                               torch.device("cpu"))
                everything = _everything(sc, launch, counts[rank], rank)
            results.append((shard, idx, bank, everything))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _everything(sc, launch, count: int, rank: int):
    """What the calibration gets on rank 0 (TrainingRows.everything): every row projected
    and read back, and the joined layout; None on the other ranks."""
    from patchcore_fast import sharded
    from patchcore_fast.verdict import ImageRows

    layout = ImageRows()  # this rank's rows as one "image" per 1,000 rows, and the rest
    for i, a in enumerate(range(0, count, 1000)):
        layout.add([Path(f"r{rank}-{i}")], a, min(1000, count - a), (1, 1), (rank, i),
                   [(rank, i)])
    rows = sharded.TrainingRows(sc, launch, len(layout.paths), (1, 1), torch.device("cpu"))
    got = rows.everything(layout)
    if got is None:
        return None
    store, joined = got
    with store:
        return (store.projected().clone(), store.gather(torch.arange(store.n)),
                [str(p) for p in joined.paths], joined.spans, joined.shapes, joined.sizes)


def test_projection_selection_and_bank_equal_one_process(tmp_path):
    per_rank = spawn_ranks(_fit_worker, 3, tmp_path, timeout_s=180,
                           what="the distributed fit pieces")
    # The one-process reference with the ranks' one thread: MKL splits a product's rows
    # across threads, and how it splits them changes the rounding of small pieces.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_fit_cases(per_rank)
    finally:
        torch.set_num_threads(threads)


def _check_fit_cases(per_rank: list) -> None:
    from patchcore_fast.coreset import StreamingCoreset

    for i, case in enumerate(FIT_CASES):
        rows, counts = _rows(case), case["counts"]
        with StreamingCoreset(case["ratio"], 128, case["seed"], in_memory=True) as sc:
            for a in range(0, len(rows), 3000):
                sc.add(rows[a:a + 3000])
            projected = sc.projected().clone()
            want_idx = sc.select()
            want_bank = sc.gather(want_idx)
            want_rows = sc.gather(torch.arange(len(rows)))
        for r in range(3):
            shard, idx, bank, everything = per_rank[r][i]
            lo = sum(counts[:r])
            assert torch.equal(shard, projected[lo:lo + counts[r]]), f"case {i} rank {r}"
            assert torch.equal(idx, want_idx), f"case {i} rank {r}"
            assert (bank is None) == (r != 0)
            assert (everything is None) == (r != 0)
        assert torch.equal(per_rank[0][i][2], want_bank), f"case {i}"
        # The calibration's rows on rank 0: every row, and the one-process projection
        # bit for bit (straddling blocks, an empty rank, a block boundary at a rank's).
        got_projected, got_rows, paths, spans, shapes, sizes = per_rank[0][i][3]
        assert torch.equal(got_projected, projected), f"case {i}"
        assert torch.equal(got_rows, want_rows), f"case {i}"
        want_spans = [(sum(counts[:r]) + a, sum(counts[:r]) + min(a + 1000, counts[r]))
                      for r in range(3) for a in range(0, counts[r], 1000)]
        assert spans == want_spans, f"case {i}"
        assert paths == [f"r{r}-{j}" for r in range(3)
                         for j in range(len(range(0, counts[r], 1000)))]
        assert sizes == [(r, j) for r in range(3) for j in range(len(range(0, counts[r], 1000)))]
        assert shapes == [((1, 1), s) for s in sizes]


def test_launch_share_and_environment():
    from patchcore_fast.distributed import Launch, launch_from_environment

    items = list(range(10))
    shares = [Launch(r, 3, r).share(items) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [Launch(r, 4, 0).share([1, 2]) for r in range(4)] == [[], [1], [], [2]]
    assert launch_from_environment({}) is None
    env = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1")
    assert launch_from_environment(env) == Launch(1, 2, 1)
    with pytest.raises(ValueError, match="RANK 2 should be in"):
        launch_from_environment({**env, "RANK": "2"})
    with pytest.raises(ValueError, match="should be integers"):
        launch_from_environment({**env, "WORLD_SIZE": "two"})
