"""The service's plumbing (issue #22): its settings and limits, the one-line API error,
the Prometheus metrics, the request batcher, request bodies (bounded reads, multipart)
and the listening socket and token; :mod:`patchcore_fast.serve` builds the app on them."""

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .errors import PatchCoreError, first_line

#: Environment variable holding the bearer token (``serve --token-file`` instead).
TOKEN_ENV = "PATCHCORE_FAST_TOKEN"
#: Shortest token accepted: 16 characters (``secrets.token_urlsafe(32)`` gives 43).
MIN_TOKEN_LENGTH = 16
#: Longest wait of the batcher after the first request of a batch, in milliseconds. 0:
#: take what is waiting. On the CPU the requests that arrive while a batch is scored fill
#: the next one, and any wait only adds latency (bench/RESULTS.md, "Serving").
DEFAULT_MAX_WAIT_MS = 0.0
#: Requests admitted at once (decoding, waiting or scored) before 503.
DEFAULT_QUEUE_SIZE = 64
#: Seconds a request may take before 504.
DEFAULT_TIMEOUT_S = 30.0
#: Nice value of the serve command's worker threads (the model's, torch's and the
#: decoders'), above its event loop's 0: on a busy machine the loop still accepts,
#: refuses (503) and answers at once instead of waiting for a core behind the batch work
#: (bench/RESULTS.md, "Serving": the 503s' p99 under overload).
DEFAULT_WORKER_NICE = 10
#: Largest request body: 20 MiB (a 20-megapixel PNG photo is about 15-30 MB).
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
#: Body types taken as an encoded image; the decoder reads the format from the bytes.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/bmp",
               "image/x-bmp", "image/x-ms-bmp", "image/tiff", "image/tif",
               "application/octet-stream")
_MULTIPART_MAX_PARTS = 8
# An error answered before the body was read drains at most this much of it first (so the
# client, still sending, reads the answer instead of a reset connection); beyond it the
# connection is closed.
_DRAIN_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ServeOptions:
    """The service's settings (``patchcore-fast serve`` options).

    Attributes:
        max_wait_ms: longest wait for more requests after the first of a batch.
        queue_size: requests admitted at once; the next answers 503.
        timeout_s: seconds before a request answers 504.
        max_body_bytes: largest request body (413 above).
        token: bearer token the protected routes need, or None.
        decode_threads: threads that decode and finish requests (default: up to 4).
        model_name: what ``/v1/model`` calls the model (the file's name).
        model_sha256: SHA-256 of the model file, or None.
        worker_nice: raise the nice value of every thread of the process but the event
            loop's to this once the model is warm, and of the decoding threads as they
            start (0: leave priorities alone, the default for a service inside another
            program; the serve command, which owns its process, uses
            :data:`DEFAULT_WORKER_NICE`).
        local_hosts_only: answer only requests whose ``Host`` header names this machine
            (``127.0.0.1``, ``localhost``, ``[::1]``): set when listening on loopback, so
            that a web page elsewhere cannot reach the service through DNS rebinding.
    """

    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    queue_size: int = DEFAULT_QUEUE_SIZE
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    token: Optional[str] = None
    decode_threads: int = 0
    model_name: str = "model"
    model_sha256: Optional[str] = None
    local_hosts_only: bool = False
    worker_nice: int = 0

    def validate(self) -> None:
        """Raise :class:`PatchCoreError` naming the first bad setting."""
        if not 0 <= self.worker_nice <= 19:
            raise PatchCoreError(f"--worker-nice should be between 0 and 19, got "
                                 f"{self.worker_nice}")
        if not 0.0 <= self.max_wait_ms <= 10_000:
            raise PatchCoreError(f"--max-wait-ms should be between 0 and 10,000, got "
                                 f"{self.max_wait_ms}")
        if self.queue_size < 1:
            raise PatchCoreError(f"--queue-size should be at least 1, got {self.queue_size}")
        if not 0.0 < self.timeout_s <= 3600:
            raise PatchCoreError(f"--timeout should be in (0, 3600] seconds, got "
                                 f"{self.timeout_s}")
        if self.max_body_bytes < 1:
            raise PatchCoreError(f"--max-body-mb should be positive, got "
                                 f"{self.max_body_bytes} bytes")
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise PatchCoreError(f"the token has {len(self.token)} characters, fewer than "
                                 f"{MIN_TOKEN_LENGTH}; make one with: python -c \"import "
                                 f"secrets; print(secrets.token_urlsafe(32))\"")


class ApiError(Exception):
    """A request answered with an error: status, one-line message, metrics outcome."""

    def __init__(self, status: int, message: str, outcome: str = "bad_request",
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.outcome, self.headers = status, outcome, headers or {}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": one_line(str(self))}, status_code=self.status,
                            headers=self.headers)


def one_line(text: str) -> str:
    """``text`` as one line (an error message never spans lines)."""
    return " ".join(text.split())[:500] or "error"


# ----- metrics ------------------------------------------------------------------------------

class Metrics:
    """The service's Prometheus metrics, in a registry of its own (no global state)."""

    def __init__(self, queue_depth: Callable[[], int], admitted: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("patchcore_predict_requests", "Prediction requests by "
                                "outcome", ["outcome"], registry=self.registry)
        self.latency = Histogram("patchcore_predict_latency_seconds", "Time from a "
                                 "prediction request's arrival to its answer (all outcomes)",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.batch_size = Histogram("patchcore_batch_size", "Images per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                                    registry=self.registry)
        self.batch_seconds = Histogram("patchcore_batch_seconds", "Time the model takes per "
                                       "batch", buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5,
                                                         5, 10), registry=self.registry)
        Gauge("patchcore_queue_depth", "Requests waiting for the model",
              registry=self.registry).set_function(queue_depth)
        Gauge("patchcore_requests_admitted", "Requests being decoded, waiting or scored",
              registry=self.registry).set_function(admitted)
        self.ready = Gauge("patchcore_ready", "1 once the model is loaded and warmed up",
                           registry=self.registry)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


# ----- batching -----------------------------------------------------------------------------

@dataclass
class _Job:
    """One admitted prediction waiting for the model."""

    input: torch.Tensor                 # [3, H_in, W_in], model.preprocess.image
    future: asyncio.Future              # -> (score, map [H_in, W_in], timing dict)
    queued: float                       # time.perf_counter() when it joined the queue


#: Batches between two :func:`release_memory` calls.
TRIM_EVERY = 16


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl, Windows)
        return None


def lower_priority(nice: int, threads: list[int] | None = None) -> None:
    """Raise the nice value of ``threads`` (Linux thread ids; None: the calling thread) to
    at least ``nice`` (on Linux a thread's nice value is its own). Raising it needs no
    privilege; a thread that has ended meanwhile, or a system without per-thread
    priorities, is passed over."""
    for tid in threads if threads is not None else [0]:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, tid,
                           max(nice, os.getpriority(os.PRIO_PROCESS, tid)))


def process_threads() -> list[int]:
    """The Linux thread ids of this process (empty where /proc is missing)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []


def release_memory() -> None:
    """Return the heap's free memory to the system (glibc's ``malloc_trim``).

    The service allocates and frees images, tensors and maps of many sizes on several
    threads, each thread with its own glibc arena; freed memory stays in the arenas, and
    the resident size creeps up over thousands of requests (bench/RESULTS.md, "Serving").
    A trim every few batches keeps it flat for a few milliseconds. A no-op without glibc.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class Batcher:
    """Gathers queued inputs into batches and scores them on the model's thread.

    The queue itself is unbounded: admission (:class:`Service`) bounds it. A batch takes
    what is waiting, up to ``batch_size``; with ``max_wait`` > 0 it waits up to that long
    after taking its first job for more to arrive. Jobs whose request gave up (timeout,
    client gone) are left out. A batch that raises fails its own jobs only. Every
    ``trim_every`` batches (0: never) the model's thread calls :func:`release_memory`.
    """

    def __init__(self, score: Callable[[list[torch.Tensor]], tuple[np.ndarray, list]],
                 batch_size: int, max_wait: float, metrics: Metrics,
                 trim_every: int = TRIM_EVERY):
        self.score, self.batch_size, self.max_wait = score, batch_size, max_wait
        self.metrics = metrics
        self.jobs: collections.deque[_Job] = collections.deque()
        self.arrived = asyncio.Event()
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.batches = 0
        self.trim_every = trim_every

    def submit(self, x: torch.Tensor) -> asyncio.Future:
        job = _Job(x, asyncio.get_running_loop().create_future(), time.perf_counter())
        self.jobs.append(job)
        self.arrived.set()
        return job.future

    async def _gather(self) -> list[_Job]:
        while not self.jobs:
            self.arrived.clear()
            await self.arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(self.jobs) < self.batch_size and self.max_wait > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = []
        while self.jobs and len(batch) < self.batch_size:
            job = self.jobs.popleft()
            if not job.future.done():  # its request timed out or went away
                batch.append(job)
        return batch

    async def run(self) -> None:
        """The batcher's loop (a task of the service's event loop; cancelled at stop)."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            start = time.perf_counter()
            try:
                scores, maps = await loop.run_in_executor(
                    self.thread, self.score, [job.input for job in batch])
            except Exception as exc:  # noqa: BLE001 - fail this batch's requests only
                error = ApiError(500, f"scoring failed: {first_line(exc)}", "failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            end = time.perf_counter()
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_seconds.observe(end - start)
            for i, job in enumerate(batch):
                if not job.future.done():
                    timing = {"queue_ms": 1e3 * (start - job.queued),
                              "model_ms": 1e3 * (end - start), "batch_size": len(batch)}
                    job.future.set_result((float(scores[i]), maps[i], timing))
            self.batches += 1
            if self.trim_every and self.batches % self.trim_every == 0:
                self.thread.submit(release_memory)  # before the next batch, on its thread

    def close(self) -> None:
        self.thread.shutdown(wait=True, cancel_futures=True)


# ----- request bodies -----------------------------------------------------------------------

class Body:
    """A request body read from the ASGI channel, bounded, with a drain for early errors."""

    def __init__(self, receive):
        self.receive = receive
        self.finished = False

    async def read(self, limit: int, declared: Optional[str]) -> bytes:
        """The whole body; :class:`ApiError` 413 as soon as it exceeds ``limit`` bytes."""
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise ApiError(400, f"Content-Length {declared[:40]!r} is not a number") from None
            if n > limit:
                raise _too_large(n, limit)
        parts, size = [], 0
        while not self.finished:
            chunk = await self._chunk()
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            parts.append(chunk)
        return b"".join(parts)

    async def _chunk(self) -> bytes:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.finished = True
            raise ApiError(400, "the client went away before sending the whole body",
                           "client_gone")
        self.finished = not message.get("more_body", False)
        return message.get("body", b"")

    async def drain(self) -> None:
        """Read and drop the rest of the body (at most ``_DRAIN_BYTES``), so that an early
        error answer reaches a client still sending."""
        size = 0
        with contextlib.suppress(ApiError):
            while not self.finished and size <= _DRAIN_BYTES:
                size += len(await self._chunk())


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body has {size:,} bytes or more, above the limit of "
                         f"{limit:,} (serve --max-body-mb)", "too_large")


def _multipart_image(body: bytes, content_type: str) -> tuple[bytes, dict[str, str]]:
    """The image and the small text fields of a ``multipart/form-data`` body, in memory.

    The image is the part named ``image`` or ``file``, else the first part with a file
    name. Nothing is written to disk (Starlette's form parser spools large parts to
    temporary files).
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart body without a boundary in its Content-Type")
    parts: list[dict] = []
    header: list[bytes] = [b"", b""]

    def begin():
        if len(parts) >= _MULTIPART_MAX_PARTS:
            raise ApiError(400, f"multipart body with more than {_MULTIPART_MAX_PARTS} parts")
        parts.append({"headers": {}, "data": [], "done": False})

    def header_field(data, start, end):
        header[0] += data[start:end]

    def header_value(data, start, end):
        header[1] += data[start:end]

    def header_end():
        parts[-1]["headers"][header[0].decode("latin-1").lower()] = header[1].decode("latin-1")
        header[0], header[1] = b"", b""

    def part_data(data, start, end):
        parts[-1]["data"].append(data[start:end])

    def part_end():
        parts[-1]["done"] = True

    callbacks = {"on_part_begin": begin, "on_header_field": header_field,
                 "on_header_value": header_value, "on_header_end": header_end,
                 "on_part_data": part_data, "on_part_end": part_end}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except Exception as exc:  # python-multipart's parse errors
        raise ApiError(400, f"malformed multipart body ({first_line(exc)})") from None
    image, fields = None, {}
    for part in parts:
        if not part["done"]:
            raise ApiError(400, "truncated multipart body (a part has no closing boundary)")
        _, disp = parse_options_header(part["headers"].get("content-disposition", ""))
        name = disp.get(b"name", b"").decode("latin-1")
        data = b"".join(part["data"])
        if name in ("image", "file") or (image is None and b"filename" in disp):
            if image is None or name in ("image", "file"):
                image = data
        elif len(data) <= 64:
            fields[name] = data.decode("utf-8", "replace").strip()
    if image is None:
        raise ApiError(400, "multipart body without an image (send it as the field 'image')")
    return image, fields


# ----- running it ---------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback one (reachable from this
    machine only)."""
    import ipaddress

    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback
                               for info in infos)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: a free one), or
    :class:`PatchCoreError` saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise PatchCoreError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise PatchCoreError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def read_token(token_file: Optional[str]) -> Optional[str]:
    """The bearer token: the file's first line, else ``$PATCHCORE_FAST_TOKEN``, else None."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as fh:
                text = fh.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
            raise PatchCoreError(f"--token-file {token_file}: {why}") from None
        if not text:
            raise PatchCoreError(f"--token-file {token_file} is empty")
        return text
    return os.environ.get(TOKEN_ENV) or None
