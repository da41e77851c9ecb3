"""Benchmark of the exact distributed coreset: steps per second, 1 process vs 2 (gloo).

Workload: bottle-real, the 163,856 x 128 projected bottle features (see
_common.bottle_projected), split in rank order into equal shards; ``STEPS`` steps of
patchcore_fast.sharded.greedy_coreset_sharded. Every configuration runs in freshly
spawned processes on localhost (gloo); each rank times its own loop after a barrier, and
rank 0 reports steps per second (the benchmark's own time also counts process start and
data loading, so compare the printed steps/s). The selections of all configurations
must be identical (and equal to ops.greedy_coreset's first STEPS picks).

    1proc-1thread:   world 1, 1 torch thread
    1proc-allthreads: world 1, all cores as torch threads
    2proc-1thread:   world 2 on this machine, 1 torch thread each (gloo)

Distributed fit (groups bottle-fit-distributed-1pct / -10pct, issue #25): ``patchcore-fast
fit`` on bottle's 209 good images (efficientnet_lite0, default size: 163,856 patches),
coreset ratio 1 % (1,638 centres) and 10 % (16,385), as one process with one thread and as
2 gloo ranks with one thread each, started as torchrun starts them. Printed side by side:
``coreset_seconds`` and ``fit_seconds`` from the model file's fit_stats (rank 0's clock:
features, then the sharded selection and the bank gathered) and the command's wall time.
The 2-rank model must equal the one-process model tensor for tensor. The 2-rank runs
exchange each step's records through shared memory (patchcore_fast/local_exchange.py, the
default for ranks on one host); ``-gloo`` carries every step over gloo instead.

    1proc-1thread, 2proc-1thread, 2proc-1thread-gloo

Distributed evaluate (group bottle-evaluate-distributed): ``patchcore-fast evaluate`` on
the 83 bottle test images (efficientnet_lite0 fitted at 1 %, 128 px, in the module
fixture, not timed), as one process and as 2 gloo ranks started as torchrun starts them;
overlays on. The time is the whole command (process start, model load, scoring, overlays,
merge); ``score_seconds`` from metrics.json (the slowest rank's scoring) is printed too.
Every configuration's metrics must equal the one-process run's with the same threads
(the ranks' shares are whole batches, so the backbone sees the same batches).

    1proc-1thread, 1proc-2threads, 2proc-1thread, 2proc-1thread-bank-shards

Run:  python -m pytest bench/bench_distributed.py --benchmark-only -s
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time

import _common
import pytest
import torch
import torch.multiprocessing as mp

import patchcore_fast

STEPS = 400
CONFIGS = {"1proc-1thread": (1, 1), "1proc-allthreads": (1, os.cpu_count() or 1),
           "2proc-1thread": (2, 1)}
_results: dict[str, torch.Tensor] = {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, threads: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from patchcore_fast.sharded import greedy_coreset_sharded

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    x = _common.bottle_projected(128)
    n = x.shape[0]
    shard = x[n * rank // world:n * (rank + 1) // world].contiguous()
    greedy_coreset_sharded(shard, 5, 0)  # warm-up (collective setup, first allocations)
    dist.barrier()
    t0 = time.perf_counter()
    sel = greedy_coreset_sharded(shard, STEPS, 0)
    elapsed = time.perf_counter() - t0
    if rank == 0:
        torch.save({"seconds": elapsed, "selection": sel}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_distributed_steps(benchmark, config, tmp_path):
    world, threads = CONFIGS[config]
    _common.bottle_projected(128)  # build the cache once, outside the timed processes
    benchmark.group = f"bottle-real-distributed-{STEPS}-steps"
    out = tmp_path / "result.pt"

    def run():
        mp.start_processes(_worker, args=(world, threads, _free_port(), str(out)),
                           nprocs=world, join=True, start_method="spawn")

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    res = torch.load(out)
    rate = STEPS / res["seconds"]
    benchmark.extra_info.update(world=world, threads=threads, steps=STEPS,
                                loop_seconds=res["seconds"], steps_per_second=rate)
    print(f"\n{config}: {STEPS} steps in {res['seconds']:.3f} s = {rate:.1f} steps/s "
          f"({res['seconds'] / STEPS * 1e3:.2f} ms per step)")
    _results[config] = res["selection"]
    want = patchcore_fast.greedy_coreset(_common.bottle_projected(128), STEPS, 0)
    assert torch.equal(res["selection"], want)


# ----- distributed fit on bottle ----------------------------------------------------------

# 2proc-1thread: the steps' records through shared memory (local_exchange.py), the
# default between ranks on one host; -gloo: every step over gloo, as before it.
FIT_CONFIGS = {"1proc-1thread": (1, {}), "2proc-1thread": (2, {}),
               "2proc-1thread-gloo": (2, {"PATCHCORE_FAST_NO_LOCAL_EXCHANGE": "1"})}
FIT_RATIOS = {"1pct": "0.01", "10pct": "0.1"}
_fits: dict[str, dict] = {}


def _fit_tensors(path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, json.loads(fh.metadata()["fit_stats"])


@pytest.mark.parametrize("config", list(FIT_CONFIGS))
@pytest.mark.parametrize("ratio", list(FIT_RATIOS))
def test_distributed_fit(benchmark, ratio, config, tmp_path):
    world, transport = FIT_CONFIGS[config]
    benchmark.group = f"bottle-fit-distributed-{ratio}"
    model = tmp_path / "bottle.safetensors"
    argv = [sys.executable, "-m", "patchcore_fast.cli", "fit", str(_common.mvtec_root()),
            "--category", "bottle", "--backbone", "efficientnet_lite0", "--coreset-ratio",
            FIT_RATIOS[ratio], "--quiet", "--device", "cpu", "-o", str(model)]

    def run():
        if world == 1:
            subprocess.run(argv, check=True, env=_cli_env(1))
            return
        port = str(_free_port())
        procs = [subprocess.Popen(argv, env=_cli_env(
                     1, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **transport))
                 for r in range(world)]
        assert [p.wait() for p in procs] == [0] * world

    t0 = time.perf_counter()
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    wall = time.perf_counter() - t0
    tensors, stats = _fit_tensors(model)
    benchmark.extra_info.update(world=world, threads=1, ratio=FIT_RATIOS[ratio],
                                coreset_seconds=stats["coreset_seconds"],
                                fit_seconds=stats["fit_seconds"],
                                feature_seconds=stats["feature_seconds"], wall_seconds=wall,
                                load_before=os.getloadavg()[0])
    print(f"\nfit {ratio} {config}: coreset {stats['coreset_seconds']:.2f} s, fit "
          f"{stats['fit_seconds']:.2f} s (features {stats['feature_seconds']:.2f} s), command "
          f"{wall:.1f} s, load {os.getloadavg()[0]:.1f}")
    _fits[f"{ratio}-{config}"] = tensors
    one = _fits.get(f"{ratio}-1proc-1thread")
    if world > 1 and one is not None:
        assert sorted(tensors) == sorted(one)
        for name in one:
            assert torch.equal(tensors[name], one[name]), name


# ----- distributed evaluate on bottle ------------------------------------------------------

SIZE = ["--image-size", "128", "--crop", "128"]
EVAL_CONFIGS = {"1proc-1thread": (1, 1, False), "1proc-2threads": (1, 2, False),
                "2proc-1thread": (2, 1, False), "2proc-1thread-bank-shards": (2, 1, True)}
_metrics: dict[str, dict] = {}


def _cli_env(threads: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra)
    return env


@pytest.fixture(scope="module")
def bottle_model(tmp_path_factory) -> tuple:
    root = _common.mvtec_root()
    model = tmp_path_factory.mktemp("model") / "bottle.safetensors"
    subprocess.run([sys.executable, "-m", "patchcore_fast.cli", "fit", str(root), "--category",
                    "bottle", "--backbone", "efficientnet_lite0", "--coreset-ratio", "0.01",
                    "--quiet", "--device", "cpu", *SIZE, "-o", str(model)],
                   check=True, env=_cli_env(2))
    return root, model


@pytest.mark.parametrize("config", list(EVAL_CONFIGS))
def test_distributed_evaluate(benchmark, config, bottle_model, tmp_path):
    world, threads, shards = EVAL_CONFIGS[config]
    root, model = bottle_model
    benchmark.group = "bottle-evaluate-distributed"
    out = tmp_path / "eval"
    argv = [sys.executable, "-m", "patchcore_fast.cli", "evaluate", str(model), str(root),
            "--category", "bottle", "--quiet", "--device", "cpu",
            *(["--bank-shards"] if shards else []), "-o", str(out)]

    def run():
        if world == 1:
            subprocess.run(argv, check=True, env=_cli_env(threads))
            return
        port = str(_free_port())
        procs = [subprocess.Popen(argv, env=_cli_env(
                     threads, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(world)]
        assert [p.wait() for p in procs] == [0] * world

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    got = json.loads((out / "metrics.json").read_text())
    benchmark.extra_info.update(world=world, threads=threads, bank_shards=shards,
                                score_seconds=got["score_seconds"])
    print(f"\n{config}: score_seconds {got['score_seconds']:.2f} s "
          f"(slowest rank), image AUROC {got['image_auroc']}, pixel AUROC {got['pixel_auroc']}")
    keys = ("image_auroc", "pixel_auroc", "pro", "f1_max", "counts", "per_defect")
    _metrics[config] = {k: got[k] for k in keys}
    if world > 1 and "1proc-1thread" in _metrics:
        assert _metrics[config] == _metrics["1proc-1thread"]
