"""Load benchmark of ``patchcore-fast serve`` (issue #22), beside what it replaces.

For each model (``lite0``: EfficientNet-Lite0, ImageNet weights; ``wrn50``: WideResNet-50-2
with random weights, the speed does not depend on the weights), fitted on generated 256 x
256 product photos (``patchcore_fast.demo``, 21 images, every patch kept: a 16,464-row
bank, the size a 10 % coreset of 210 images gives) or, with ``--files bottle``, scoring
MVTec AD bottle's 900 x 900 test photos, one run measures side by side:

* ``score``: the score command's loop (:func:`patchcore_fast.evaluation.score_images`,
  no overlays) on the query files, in this process with the model loaded and warm: the
  rate a batch job reaches once started, measured before and after the server runs (the
  machine is shared: the two bracket the drift). ``score (process)`` is the command run
  as a new process, start-up included, for scale;
* ``tensors``: the preprocessed images in batches of the model's batch size through
  :func:`patchcore_fast.frames.score_inputs` (no decoding, no HTTP): the ceiling;
* ``predict (memory)``: ``PatchCore.predict`` of one image in memory, as encoded bytes
  (decoded as the server decodes) and as a decoded array, interleaved with one client's
  requests to the idle server (medians);
* the server, ``patchcore-fast serve`` as a child process on a loopback port, clients in
  this process (httpx, asyncio): the idle latency of one client; 1, 4 and 16 clients
  sending the query files round-robin for a bounded time (throughput of answered requests,
  latency p50 / p99, error answers); the server's resident memory after warm-up, after 100
  requests and after 1,000; overload (the queue kept full by more clients than it admits,
  a probe timing the 503s, then one request alone).

``--max-wait`` adds, per value, a server with that ``--max-wait-ms`` and 1 and 16 clients
(the measurement behind the default).

    .venv/bin/python bench/bench_serve.py --model lite0 wrn50 --json /tmp/serve.json
    .venv/bin/python bench/bench_serve.py --model lite0 --max-wait 0 5 20 --seconds 20

Prints Markdown tables (bench/RESULTS.md, "Serving") and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from patchcore_fast import frames  # noqa: E402
from patchcore_fast.datasets import list_images  # noqa: E402
from patchcore_fast.demo import write_demo_data  # noqa: E402
from patchcore_fast.images import read_image  # noqa: E402
from patchcore_fast.score_run import score_images  # noqa: E402
from patchcore_fast.config import PatchCoreConfig  # noqa: E402
from patchcore_fast.model import PatchCore  # noqa: E402
from patchcore_fast.outputs import unique_names  # noqa: E402

MODELS = {"lite0": dict(backbone="efficientnet_lite0"),
          "wrn50": dict(backbone="wide_resnet50_2", pretrained=False)}
BANK_IMAGES = 21
QUERIES = 32
PACKAGE_PARENT = Path(frames.__file__).resolve().parents[1]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, every thread."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# ----- data and models ----------------------------------------------------------------------

def data(tmp: Path, files: str) -> tuple[Path, list[Path]]:
    """(training folder, query files)."""
    write_demo_data(tmp / "demo", seed=0, n_train=BANK_IMAGES + QUERIES, n_test_good=0,
                    n_test_defect=0)
    train = tmp / "demo" / "widget" / "train" / "good"
    everything = list_images([train])
    bank, queries = tmp / "bank", everything[BANK_IMAGES:]
    bank.mkdir()
    for p in everything[:BANK_IMAGES]:
        (bank / p.name).symlink_to(p)
    if files == "bottle":
        test = _common.mvtec_root() / "bottle" / "test"
        queries = sorted(p for p in test.rglob("*.png"))
        if not queries:
            sys.exit(f"no MVTec AD bottle test images under {test}")
    return bank, queries


def fit(kind: str, bank: Path, out: Path) -> Path:
    model = PatchCore(PatchCoreConfig(device="cpu", coreset_ratio=1.0, **MODELS[kind]))
    model.fit(bank)
    path = out / f"{kind}.safetensors"
    model.save(path)
    return path


# ----- the baselines ------------------------------------------------------------------------

def score_rate(model: PatchCore, files: list[Path], out: Path) -> float:
    """Images per second of the score command's loop (no overlays) over ``files`` once,
    model warm."""
    return score_for(model, files, out, 0.0)["images_per_s"]


def score_process_rate(model_file: Path, files: list[Path], out: Path) -> float:
    """Images per second of ``patchcore-fast score --no-overlays`` as a new process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "patchcore_fast.cli", "score", str(model_file),
                    *map(str, files), "-o", str(out), "--no-overlays", "--quiet",
                    "--device", "cpu"], check=True, cwd=PACKAGE_PARENT,
                   env={**os.environ, "PYTHONPATH": str(PACKAGE_PARENT)})
    return len(files) / (time.perf_counter() - start)


def tensors_rate(model: PatchCore, files: list[Path]) -> float:
    pre, size = model.preprocess, model.config.batch_size
    inputs = [pre.image(read_image(f)) for f in files]
    frames.score_inputs(model, inputs[:size])  # warm
    start = time.perf_counter()
    for i in range(0, len(inputs), size):
        frames.score_inputs(model, inputs[i:i + size])
    return len(inputs) / (time.perf_counter() - start)


def score_for(model: PatchCore, files: list[Path], out: Path, seconds: float) -> dict:
    """The score command's loop (no overlays) over ``files``, once and then again until
    ``seconds`` have passed: images per second, and this process's CPU milliseconds an
    image."""
    names = dict(zip(files, unique_names(files)))
    images, cpu, start = 0, time.process_time(), time.perf_counter()
    while images == 0 or time.perf_counter() - start < seconds:
        scored = score_images(model, files, names, out, [], overlays=False)
        assert len(scored) == len(files)
        images += len(files)
    elapsed = time.perf_counter() - start
    return {"images_per_s": images / elapsed,
            "cpu_ms_per_image": 1e3 * (time.process_time() - cpu) / images}


# ----- the server and its clients -----------------------------------------------------------

class Server:
    """``patchcore-fast serve MODEL --port 0 ...`` as a child process."""

    def __init__(self, model_file: Path, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "patchcore_fast.cli", "serve", str(model_file), "--port",
             "0", "--device", "cpu", *args], stderr=subprocess.PIPE, text=True,
            cwd=PACKAGE_PARENT, env={**os.environ, "PYTHONPATH": str(PACKAGE_PARENT)})
        line = self.proc.stderr.readline()
        found = re.search(r"http://\S+?:(\d+)", line)
        if not found:
            sys.exit(f"serve did not start: {line}{self.proc.stderr.read()}")
        self.url = f"http://127.0.0.1:{found.group(1)}"
        end = time.monotonic() + 600
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=10).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        sys.exit("serve did not warm up within 600 s")

    def rss(self) -> float:
        return rss_mib(self.proc.pid)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.stderr.read()
        return self.proc.wait(120)


async def _clients(url: str, bodies: list[bytes], clients: int, seconds: float | None = None,
                   total: int | None = None) -> dict:
    """``clients`` clients posting ``bodies`` round-robin, each waiting for its answer
    before the next, for ``seconds`` (requests started before the end are waited for) or
    ``total`` requests in all."""
    latencies: list[float] = []
    codes: collections.Counter = collections.Counter()
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + seconds if seconds else None

        async def worker(k: int) -> None:
            nonlocal sent
            i = k
            while True:
                if total is not None:
                    if sent >= total:
                        return
                    sent += 1
                elif time.perf_counter() >= deadline:
                    return
                body, i = bodies[i % len(bodies)], i + clients
                t = time.perf_counter()
                try:
                    r = await client.post(f"{url}/v1/predict", content=body,
                                          headers={"Content-Type": "image/png"})
                except httpx.TransportError as exc:
                    codes[type(exc).__name__] += 1
                    continue
                codes[r.status_code] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(worker(k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    ok = codes.pop(200, 0)
    return {"clients": clients, "answered": ok, "errors": dict(codes), "seconds": elapsed,
            "images_per_s": ok / elapsed, "p50_ms": 1e3 * (percentile(latencies, 50) or 0),
            "p99_ms": 1e3 * (percentile(latencies, 99) or 0), "load": load_average()}


def clients(url: str, bodies: list[bytes], n: int, seconds: float | None = None,
            total: int | None = None) -> dict:
    return asyncio.run(_clients(url, bodies, n, seconds, total))


async def _overload(url: str, bodies: list[bytes], queue: int, seconds: float,
                    retry_s: float | None = None, extra: int = 32) -> dict:
    """The queue kept full: ``queue + extra`` clients sending in a loop (after a 503 each waits
    the answer's Retry-After, as a well-behaved client does, or ``retry_s``), while one more
    client sends one request at a time and times the answers it gets. Then one request
    alone. The clients share this process and the server's 2 cores: with a short
    ``retry_s`` (0.1 s: ten times the rate the server asks for) the refused clients' own
    churn (hundreds of requests a second, each costing this process and the server CPU
    time) delays the probe's answers in this process's event loop too."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as c:
        end = time.perf_counter() + seconds
        probe: list[tuple[int, float]] = []

        async def post(i: int):
            return await c.post(f"{url}/v1/predict", content=bodies[i % len(bodies)],
                                headers={"Content-Type": "image/png"})

        async def background(k: int) -> None:
            while time.perf_counter() < end:
                r = await post(k)
                if r.status_code == 503:
                    await asyncio.sleep(retry_s if retry_s is not None
                                        else float(r.headers.get("Retry-After", "1")))

        async def prober() -> None:
            await asyncio.sleep(min(2.0, seconds / 4))  # the queue fills first
            while time.perf_counter() < end:
                t = time.perf_counter()
                r = await post(0)
                probe.append((r.status_code, time.perf_counter() - t))
                await asyncio.sleep(0.05)

        await asyncio.gather(prober(), *(background(k) for k in range(queue + extra)))
        after = await post(0)
    refused = [t for code, t in probe if code == 503]
    return {"queue": queue, "clients": queue + extra, "retry_s": retry_s, "probes": len(probe),
            "refused_503": len(refused),
            "other": sorted({code for code, _ in probe} - {200, 503}),
            "503_p50_ms": 1e3 * (percentile(refused, 50) or 0),
            "503_p99_ms": 1e3 * (percentile(refused, 99) or 0),
            "503_max_ms": 1e3 * max(refused, default=0), "next_status": after.status_code,
            "load": load_average()}


def paired_runs(model: PatchCore, server: "Server", files: list[Path], bodies: list[bytes],
                clients_n: int, seconds: float, pairs: int, out: Path) -> dict:
    """``pairs`` times: the score loop for ``seconds``, then ``clients_n`` clients against
    the server for ``seconds``. This machine's speed drifts by tens of percent between
    minutes, so each serve run is compared with the score loop just before it (the ratio
    per pair; their median is the figure). CPU milliseconds an image: the score loop's
    process, and the server's and the clients' processes during the serve run."""
    runs = []
    for k in range(pairs):
        score = score_for(model, files, out / f"pair{k}", seconds)
        server_cpu, client_cpu = cpu_seconds(server.proc.pid), time.process_time()
        served = clients(server.url, bodies, clients_n, seconds)
        n = max(1, served["answered"])
        served["server_cpu_ms_per_image"] = 1e3 * (cpu_seconds(server.proc.pid)
                                                   - server_cpu) / n
        served["client_cpu_ms_per_image"] = 1e3 * (time.process_time() - client_cpu) / n
        runs.append({"score": score, "serve": served,
                     "ratio": served["images_per_s"] / score["images_per_s"]})
    return {"clients": clients_n, "seconds": seconds, "runs": runs,
            "median_ratio": statistics.median(r["ratio"] for r in runs)}


def idle_pairs(model: PatchCore, url: str, file: Path, repeats: int) -> dict:
    """One client on an idle server against ``predict`` of the same image in memory (its
    PNG bytes, and its decoded array), interleaved so that the machine's drift hits all
    three alike: medians in ms."""
    data, array = file.read_bytes(), np.asarray(read_image(file))
    times: dict[str, list[float]] = {"server": [], "bytes": [], "array": []}
    with httpx.Client(timeout=600) as client:
        def request():
            r = client.post(f"{url}/v1/predict", content=data,
                            headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text

        calls = {"server": request, "bytes": lambda: model.predict(data),
                 "array": lambda: model.predict(array)}
        for call in calls.values():
            for _ in range(3):  # warm (the first calls of a shape are slower)
                call()
        for _ in range(repeats):
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


# ----- one model ----------------------------------------------------------------------------

def run_model(kind: str, files_kind: str, seconds: float, rss_requests: int, repeats: int,
              max_waits: list[float], pairs: int = 3) -> dict:
    result: dict = {"model": kind, "files": files_kind, "load_start": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bank, queries = data(tmp, files_kind)
        t = time.perf_counter()
        model_file = fit(kind, bank, tmp)
        result["fit_s"] = time.perf_counter() - t
        model = PatchCore.load(model_file, device="cpu")
        result["batch_size"] = model.config.batch_size
        result["bank_rows"] = int(model.bank.shape[0])
        bodies = [f.read_bytes() for f in queries]
        result["queries"] = len(queries)
        score_rate(model, queries[:model.config.batch_size], tmp / "warm")
        result["score_before"] = score_rate(model, queries, tmp / "s1")
        result["tensors"] = tensors_rate(model, queries)
        result["score_process"] = score_process_rate(model_file, queries, tmp / "s2")

        server = Server(model_file)
        try:
            result["rss_ready_mib"] = server.rss()
            result["idle"] = idle_pairs(model, server.url, queries[0], repeats)
            first = clients(server.url, bodies, 16, total=100 - (repeats + 3))
            result["rss_100_mib"] = server.rss()
            rest = clients(server.url, bodies, 16, total=rss_requests - 100)
            result["rss_1000_mib"] = server.rss()
            result["rss_requests"] = rss_requests
            result["rss_errors"] = {**first["errors"], **rest["errors"]}
            result["runs"] = [clients(server.url, bodies, n, seconds) for n in (1, 4, 16)]
            result["paired"] = paired_runs(model, server, queries, bodies, 16, seconds,
                                           pairs, tmp)
            result["overload"] = asyncio.run(_overload(server.url, bodies, 64, seconds))
            result["overload_fast_retry"] = asyncio.run(_overload(server.url, bodies, 64,
                                                                  seconds, 0.1, 8))
            result["server_exit"] = server.stop()
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
        result["score_after"] = score_rate(model, queries, tmp / "s3")
        for wait in max_waits:
            s = Server(model_file, "--max-wait-ms", str(wait))
            try:
                result.setdefault("max_wait", []).append(
                    {"max_wait_ms": wait, "runs": [clients(s.url, bodies, n, seconds)
                                                   for n in (1, 16)]})
            finally:
                s.stop()
    result["load_end"] = load_average()
    return result


def report(r: dict) -> str:
    score = (r["score_before"] + r["score_after"]) / 2
    lines = [f"**{r['model']}** on {r['queries']} {r['files']} files, batch {r['batch_size']}, "
             f"bank {r['bank_rows']:,} rows (load average {r['load_start']} at the start, "
             f"{r['load_end']} at the end)", "",
             "| what | images/s | vs score | p50 ms | p99 ms | errors | load |",
             "|---|---|---|---|---|---|---|",
             f"| score loop, before / after | {r['score_before']:.2f} / {r['score_after']:.2f} "
             f"| 1.00 | | | | |",
             f"| score (process, start-up included) | {r['score_process']:.2f} | "
             f"{r['score_process'] / score:.2f} | | | | |",
             f"| tensors (batch {r['batch_size']}) | {r['tensors']:.2f} | "
             f"{r['tensors'] / score:.2f} | | | | |"]
    for run in r["runs"]:
        lines.append(f"| serve, {run['clients']} client{'s' * (run['clients'] > 1)} | "
                     f"{run['images_per_s']:.2f} | {run['images_per_s'] / score:.2f} | "
                     f"{run['p50_ms']:.0f} | {run['p99_ms']:.0f} | {run['errors'] or 0} | "
                     f"{run['load']} |")
    idle = r["idle"]
    lines += ["", f"- idle, one client: {idle['server']:.1f} ms a request (median); "
              f"in-memory predict of the same image: {idle['bytes']:.1f} ms from its PNG "
              f"bytes, {idle['array']:.1f} ms from the decoded array (ratios "
              f"{idle['server'] / idle['bytes']:.2f} / {idle['server'] / idle['array']:.2f}; "
              f"interleaved)",
              f"- server memory: {r['rss_ready_mib']:.0f} MiB ready, {r['rss_100_mib']:.0f} "
              f"MiB after 100 requests, {r['rss_1000_mib']:.0f} MiB after 1,000 "
              f"({100 * (r['rss_1000_mib'] / r['rss_100_mib'] - 1):+.1f} %); errors "
              f"{r['rss_errors'] or 0}",
              *(f"- overload, the queue ({o['queue']}) kept full by {o['clients']} clients "
                f"retrying after {'Retry-After' if o['retry_s'] is None else o['retry_s']}"
                f"{'' if o['retry_s'] is None else ' s'}: "
                f"{o['refused_503']} of {o['probes']} probe requests answered 503 in "
                f"{o['503_p50_ms']:.0f} ms median, {o['503_p99_ms']:.0f} ms p99, "
                f"{o['503_max_ms']:.0f} ms at most (load {o['load']}); other statuses "
                f"{o['other'] or 'none'}; the next request alone: {o['next_status']}"
                for o in (r["overload"], r["overload_fast_retry"])),
              f"- server exit code after SIGTERM: {r['server_exit']}"]
    pr = r["paired"]
    lines += ["", f"Paired, {pr['clients']} clients against the score loop just before "
              f"them ({pr['seconds']:g} s each; CPU ms an image: the score loop's process; "
              f"the server's + the clients'):", "",
              "| pair | score images/s | serve images/s | serve / score | p99 ms | errors "
              "| CPU ms an image: score | serve + clients |", "|---|---|---|---|---|---|---|---|"]
    for k, run in enumerate(pr["runs"]):
        s, v = run["score"], run["serve"]
        lines.append(f"| {k + 1} | {s['images_per_s']:.2f} | {v['images_per_s']:.2f} | "
                     f"{run['ratio']:.2f} | {v['p99_ms']:.0f} | {v['errors'] or 0} | "
                     f"{s['cpu_ms_per_image']:.0f} | {v['server_cpu_ms_per_image']:.0f} + "
                     f"{v['client_cpu_ms_per_image']:.0f} |")
    lines.append(f"| median | | | **{pr['median_ratio']:.2f}** | | | | |")
    for m in r.get("max_wait", []):
        a, b = m["runs"]
        lines.append(f"- --max-wait-ms {m['max_wait_ms']:g}: 1 client {a['images_per_s']:.2f} "
                     f"images/s, p50 {a['p50_ms']:.0f} ms; 16 clients "
                     f"{b['images_per_s']:.2f} images/s, p50 {b['p50_ms']:.0f} ms, p99 "
                     f"{b['p99_ms']:.0f} ms (load {b['load']})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", choices=sorted(MODELS), default=["lite0", "wrn50"])
    p.add_argument("--files", choices=("demo", "bottle"), default="demo")
    p.add_argument("--seconds", type=float, default=30.0, help="per client-count run")
    p.add_argument("--rss-requests", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=10, help="of the one-image latencies")
    p.add_argument("--max-wait", type=float, nargs="*", default=[], metavar="MS")
    p.add_argument("--pairs", type=int, default=3,
                   help="paired runs, score loop then 16 clients, each --seconds")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"Run of {time.strftime('%Y-%m-%dT%H:%M:%S')}: "
          + _common.describe().replace("\n", "; "), flush=True)
    results = []
    for kind in args.model:
        r = run_model(kind, args.files, args.seconds, args.rss_requests, args.repeats,
                      args.max_wait, args.pairs)
        results.append(r)
        print("\n" + report(r) + "\n", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"machine": _common.machine_info(),
                                             "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
