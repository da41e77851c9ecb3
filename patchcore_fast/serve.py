"""``patchcore-fast serve``: a fitted model behind HTTP, kept warm, with request batching
(issue #22).

FastAPI on uvicorn, the Python ecosystem's convention. One process holds one model:

* ``POST /v1/predict``: one image (PNG, JPEG, BMP or TIFF) as the request body or as the
  file of a multipart form; answers JSON with the score, the normalised score and label
  (when the model is calibrated), the defect regions, the photo's size and the timing;
  ``?overlay=png`` (or a form field ``overlay=png``) adds the overlay as a base64 PNG,
  ``overlay=jpg`` as a base64 JPEG (``overlays.encode_overlay``).
* ``GET /v1/health``: 200 once the model is loaded and warmed up, 503 before (and while
  stopping); ``GET /v1/model``: settings, calibration, version; ``GET /metrics``:
  Prometheus text (requests by outcome, latency, batch sizes, queue depth).
* ``GET /``: an operator's page (``patchcore_fast/web``: plain HTML and JavaScript shipped
  with the package, no build step, no CDN).

How a prediction travels. The event loop only moves bytes: the body is read (bounded), then
decoded and preprocessed on a small pool of threads (``frames.decode_bytes``, the file
reader's decode; Pillow and libpng release the GIL). The preprocessed input joins a queue;
one batcher gathers what is waiting, up to the model's batch size, waiting at most
``max_wait_ms`` after the first arrival, and runs the batch on the model's own thread
(``frames.score_inputs``: one backbone pass and one k-NN for the whole batch). The map is
then put back at the photo's size, the regions found and the overlay encoded on the pool.

Limits: a body larger than ``max_body_bytes`` answers 413; an image above the file reader's
pixel budget 413; at most ``queue_size`` requests are admitted at once (decoding, waiting
or being scored), the next answers 503 with ``Retry-After`` before its body is decoded; a
request not answered within ``timeout_s`` answers 504. Every error is one line of JSON,
``{"error": "..."}``, with a 4xx status for a bad request; a batch that fails answers 500 to
its own requests only, and the batcher carries on.

Access: the caller decides where to listen (``cli.py`` refuses an address other machines can
reach without a bearer token unless told ``--insecure``). With a token, ``/v1/predict``,
``/v1/model`` and ``/metrics`` need ``Authorization: Bearer <token>`` (compared in constant
time); the page and ``/v1/health`` do not (they hold nothing). Requests never name files:
the page's three files are read from the package once, at start.
"""
# No ``from __future__ import annotations`` here: FastAPI reads the route functions'
# annotations (``request: Request``, imported inside create_app) as objects.

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import hmac
import os
import signal
import socket
import sys
import threading
import time
import traceback
from importlib import resources
from typing import Callable, Optional

import numpy as np
import torch

from . import frames, overlays
from ._version import __version__
from .errors import first_line
# The settings, limits and plumbing live in serve_io; the names the command line and
# users import from here (``ServeOptions``, ``TOKEN_ENV``, ``bind``, ...) are re-exported.
from .serve_io import (DEFAULT_MAX_WAIT_MS, IMAGE_TYPES, TOKEN_ENV, ApiError, Batcher, Body,
                       Metrics, ServeOptions, _multipart_image, bind, is_loopback,
                       lower_priority, process_threads, read_token)

_WEB_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/style.css": ("style.css", "text/css; charset=utf-8")}

# ----- the service --------------------------------------------------------------------------

class Service:
    """The model, its batcher, the thread pool, the limits and the state of one server.

    Args:
        model (PatchCore): a fitted model (its embedder is built during warm-up).
        options: limits, token and names.
    """

    def __init__(self, model, options: ServeOptions):
        options.validate()
        self.model, self.options = model, options
        self.state = "starting"     # -> ready (or failed); stopping at shutdown
        self.error: Optional[str] = None
        self.admitted = 0
        self.batcher: Optional[Batcher] = None
        self.metrics = Metrics(lambda: len(self.batcher.jobs) if self.batcher else 0,
                               lambda: self.admitted)
        threads = options.decode_threads or min(4, os.cpu_count() or 1)
        self.pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="decode",
            initializer=lower_priority if options.worker_nice else None,
            initargs=(options.worker_nice,))
        self._loop_thread: Optional[int] = None
        #: The batch step (``frames.score_inputs``); a seam for the fault-injection tests.
        self.score = lambda inputs: frames.score_inputs(self.model, inputs)
        self._tasks: list[asyncio.Task] = []
        self.web = {route: (resources.files(__package__).joinpath("web", name).read_bytes(),
                            media) for route, (name, media) in _WEB_FILES.items()}

    # --- life cycle

    async def start(self) -> None:
        """Start the batcher and, in the background, build and warm up the model."""
        self._loop_thread = threading.get_native_id()
        self.batcher = Batcher(lambda inputs: self.score(inputs), self.model.config.batch_size,
                               self.options.max_wait_ms / 1e3, self.metrics)
        self._tasks = [asyncio.create_task(self.batcher.run(), name="batcher"),
                       asyncio.create_task(self._warm_up(), name="warm-up")]

    async def _warm_up(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.batcher.thread, self.warm_up)
        except Exception as exc:  # noqa: BLE001 - reported by /v1/health and the log
            self.state, self.error = "failed", first_line(exc)
            print(f"patchcore-fast: error: warm-up failed: {self.error}", file=sys.stderr,
                  flush=True)
            return
        if self.state == "starting":
            self.state = "ready"
            self.metrics.ready.set(1)

    def warm_up(self) -> None:
        """Build the backbone and score a full batch and a single image of the model's
        input size (first calls allocate and pick kernels; a request should not pay it)."""
        pre = self.model.preprocess
        side = pre.image_size
        h, w = pre.placement((side, side)).input_size
        # Seeded noise, not zeros: constant features would skip the k-NN's usual path.
        g = torch.Generator().manual_seed(0)
        x = torch.rand(3, h, w, generator=g).sub_(0.45).div_(0.225)
        for _ in range(3):  # the first calls of a shape are slower (allocations)
            for n in (self.model.config.batch_size, 1):
                self.score([x] * n)
        if self.options.worker_nice:
            # Every thread but the event loop's: the model's, torch's (made by now) and
            # the decoders started so far (later ones lower themselves as they start).
            lower_priority(self.options.worker_nice,
                           [t for t in process_threads() if t != self._loop_thread])

    async def stop(self) -> None:
        """Stop the batcher (uvicorn has answered every request in flight by now)."""
        self.state = "stopping"
        self.metrics.ready.set(0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.batcher.close)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- access

    def authorize(self, request) -> None:
        """:class:`ApiError` 401 unless the request carries the token (when there is one)."""
        token = self.options.token
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                value.strip().encode("utf-8", "replace"), token.encode("utf-8")):
            raise ApiError(401, "missing or wrong token: send the header 'Authorization: "
                                "Bearer <token>'", "unauthorized",
                           {"WWW-Authenticate": 'Bearer realm="patchcore-fast"'})

    # --- predict

    async def predict(self, request) -> dict:
        """Answer one ``POST /v1/predict`` (:class:`ApiError` for every refusal)."""
        arrived = time.perf_counter()
        body = Body(request.receive)
        try:
            self.authorize(request)
            if self.state != "ready":
                why = {"starting": "the model is warming up", "stopping": "the server is "
                       "stopping", "failed": f"the model failed to start ({self.error})"}
                raise ApiError(503, why[self.state], "unavailable", {"Retry-After": "1"})
            if self.admitted >= self.options.queue_size:
                raise ApiError(503, f"the server is busy ({self.admitted} requests in "
                                    f"progress, the queue's limit); retry shortly",
                               "overloaded", {"Retry-After": "1"})
            self.admitted += 1
            try:
                answer = await asyncio.wait_for(self._predict(request, body, arrived),
                                                self.options.timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(504, f"no answer within {self.options.timeout_s:g} s (serve "
                                    f"--timeout); the server is overloaded or the image is "
                                    f"very large", "timeout") from None
            except (ApiError, asyncio.CancelledError):
                raise
            except Exception as exc:  # a bug: the operator gets the traceback, the client a line
                traceback.print_exc()
                raise ApiError(500, f"internal error: {first_line(exc)}", "failed") from None
            finally:
                self.admitted -= 1
        except ApiError as exc:
            if not body.finished:
                await body.drain()
            self.metrics.requests.labels(exc.outcome).inc()
            self.metrics.latency.observe(time.perf_counter() - arrived)
            raise
        self.metrics.requests.labels("ok").inc()
        self.metrics.latency.observe(time.perf_counter() - arrived)
        answer["timing"]["total_ms"] = 1e3 * (time.perf_counter() - arrived)
        return answer

    async def _predict(self, request, body: Body, arrived: float) -> dict:
        ctype = request.headers.get("content-type", "application/octet-stream")
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "multipart/form-data" and media not in IMAGE_TYPES:
            raise ApiError(415, f"Content-Type {media[:60]!r} is not an image: send PNG, "
                                f"JPEG, BMP or TIFF bytes (image/png, ...) or a "
                                f"multipart/form-data form with the field 'image'",
                           "unsupported_type")
        data = await body.read(self.options.max_body_bytes,
                               request.headers.get("content-length"))
        fields = {}
        if media == "multipart/form-data":
            data, fields = _multipart_image(data, ctype)
        overlay = request.query_params.get("overlay", fields.get("overlay", ""))
        if overlay not in ("", "none", *overlays.OVERLAY_FORMATS):
            raise ApiError(400, f"overlay should be png or jpg (or none), got "
                                f"{overlay[:20]!r}")
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        photo, x, note = await loop.run_in_executor(self.pool, self._decode, data)
        t1 = time.perf_counter()
        del data
        score, amap, timing = await self.batcher.submit(x)
        t2 = time.perf_counter()
        answer = await loop.run_in_executor(
            self.pool, self._finish, photo, score, amap,
            overlay if overlay in overlays.OVERLAY_FORMATS else None)
        t3 = time.perf_counter()
        timing.update(read_ms=1e3 * (t0 - arrived), decode_ms=1e3 * (t1 - t0),
                      finish_ms=1e3 * (t3 - t2))
        answer["timing"] = {k: round(v, 3) if isinstance(v, float) else v
                            for k, v in timing.items()}
        if note:
            answer["warnings"] = [note]
        return answer

    def _decode(self, data: bytes):
        """Bytes -> (the photo, the model's input, a note on the bounded path or None)."""
        try:
            photo = frames.decode_bytes(data, "the image")
        except frames.FrameTooLarge as exc:
            raise ApiError(413, str(exc), "too_large") from None
        except frames.FrameError as exc:
            raise ApiError(400, str(exc)) from None
        pre = self.model.preprocess
        try:
            x = pre.image(photo)
        except frames.UnreadableImage as exc:  # too many pixels for a model without a crop
            raise ApiError(413, f"the image: {exc}", "too_large") from None
        return photo, x, pre.oversize(photo.size)

    def _finish(self, photo, score: float, amap: torch.Tensor, overlay: str | None) -> dict:
        """The answer of one scored image: map at the photo's size, verdict, regions and,
        when asked for, the overlay (``overlay``: ``png``, ``jpg`` or None)."""
        full = frames.map_back(self.model, photo.size, amap)
        verdict = frames.decide(self.model, np.array([score], dtype=np.float32), [full])
        answer = {"score": score, "normalised": verdict.normalised[0],
                  "label": verdict.labels[0], "threshold": verdict.threshold,
                  "regions": verdict.regions[0],
                  "width": photo.size[0], "height": photo.size[1],
                  "map_max": float(full.max()) if full.size else None}
        if overlay:
            answer[f"overlay_{overlay}"], answer["colour_scale"] = self._overlay(
                photo, full, overlay)
        return answer

    def _overlay(self, photo, full: np.ndarray, overlay_format: str) -> tuple[str, dict]:
        vmin, vmax, source = frames.colour_scale(self.model, full)
        img = overlays.overlay(np.asarray(photo), full, vmin, vmax)
        return (base64.b64encode(overlays.encode_overlay(img, overlay_format)).decode("ascii"),
                {"min": vmin, "max": vmax, "from": source})

    # --- model summary

    def describe(self) -> dict:
        """``GET /v1/model``: what is served and how."""
        m = self.model
        config = dataclasses.asdict(m.config)
        if config.get("weights"):
            config["weights"] = os.path.basename(config["weights"])
        cal = getattr(m, "calibration", None)
        o = self.options
        return {
            "name": o.model_name, "sha256": o.model_sha256, "version": __version__,
            "config": config,
            "backbone": dataclasses.asdict(m.backbone_info) if m.backbone_info else None,
            "bank_rows": int(m.bank.shape[0]), "embed_dim": int(m.bank.shape[1]),
            "fit_stats": m.fit_stats,
            "calibration": dataclasses.asdict(cal) if dataclasses.is_dataclass(cal) else None,
            "serving": {"device": str(m.device), "batch_size": m.config.batch_size,
                        "max_wait_ms": o.max_wait_ms, "queue_size": o.queue_size,
                        "timeout_s": o.timeout_s, "max_body_bytes": o.max_body_bytes,
                        "token": o.token is not None, "state": self.state},
        }


#: ``Host`` names of this machine (``local_hosts_only``).
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


class _LocalHostsOnly:
    """ASGI middleware: with ``local_hosts_only``, a request whose ``Host`` header names
    another machine is answered 400 (a DNS-rebinding page in the user's browser sends its
    own host name)."""

    def __init__(self, app, service: "Service"):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.service.options.local_hosts_only:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host.split("]")[0] + "]" if host.startswith("[") else host.split(":")[0]
            if name not in LOCAL_HOSTS:
                error = ApiError(400, f"Host {host[:60]!r} is not this machine: the server "
                                      f"listens on loopback (use 127.0.0.1 or localhost)")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model, options: Optional[ServeOptions] = None):
    """The FastAPI application serving ``model`` (the service starts with the app's
    lifespan: run it with uvicorn, ``lifespan="on"``).

    Args:
        model (PatchCore): a fitted model.
        options: limits, token, names (:class:`ServeOptions`).

    Returns:
        ``fastapi.FastAPI`` with the service as ``app.state.service``.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    service = Service(model, options or ServeOptions())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    # No /docs or /redoc: their pages load scripts from a CDN (this service works offline).
    app = FastAPI(title="patchcore-fast", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(_LocalHostsOnly, service=service)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        text = {404: f"no such route {request.method} {request.url.path[:80]}",
                405: f"method {request.method} is not allowed on {request.url.path[:80]}"}
        return ApiError(exc.status_code, text.get(exc.status_code, str(exc.detail))).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return ApiError(400, f"bad request: {first_line(exc)}").response()

    @app.post("/v1/predict")
    async def predict(request: Request):
        return JSONResponse(await service.predict(request))

    @app.get("/v1/health")
    async def health():
        ready = service.state == "ready"
        body = {"status": service.state, "version": __version__}
        if service.error:
            body["error"] = service.error
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/v1/model")
    async def model_summary(request: Request):
        service.authorize(request)
        return JSONResponse(service.describe())

    @app.get("/metrics")
    async def metrics(request: Request):
        service.authorize(request)
        text, media = service.metrics.text()
        return Response(text, media_type=media)

    def page(route: str):
        content, media = service.web[route]

        async def get():
            return Response(content, media_type=media, headers={
                "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:"})
        return get

    for route in _WEB_FILES:
        app.get(route, include_in_schema=False)(page(route))
    return app


class _Server:
    """uvicorn's server, with SIGTERM and Ctrl-C stopping it gracefully (requests in
    flight are answered, new connections refused) and the process then exiting normally:
    uvicorn alone re-raises the signal once stopped, killing the process."""

    def __init__(self, app, log_level: str, access_log: bool, grace_s: float):
        import uvicorn

        config = uvicorn.Config(app, log_level=log_level, access_log=access_log,
                                lifespan="on", timeout_graceful_shutdown=grace_s,
                                timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.signal: Optional[int] = None

    def run(self, sock: socket.socket) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.server.run(sockets=[sock])
            return
        server = self.server

        def stop(signum, frame):
            self.signal = signum
            if server.should_exit and signum == signal.SIGINT:
                server.force_exit = True  # a second Ctrl-C: stop now
            server.should_exit = True

        before = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        # uvicorn captures signals itself (and re-raises them at the end): keep ours.
        server.capture_signals = contextlib.nullcontext
        try:
            server.run(sockets=[sock])
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)


def serve(model, host: str, sock: socket.socket, options: ServeOptions,
          log: Callable[[str], None], access_log: bool = False) -> int:
    """Serve ``model`` on the listening socket ``sock`` until SIGTERM or Ctrl-C.

    Returns:
        0 after a graceful stop, 1 when the model failed to warm up.
    """
    app = create_app(model, options)
    service: Service = app.state.service
    server = _Server(app, "info" if access_log else "warning", access_log,
                     options.timeout_s + 5)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host

    def announce():
        while service.state == "starting" and not server.server.should_exit:
            time.sleep(0.05)
        if service.state == "ready":
            log(f"ready: serving {options.model_name} on http://{shown}:{port}"
                f" (batch {model.config.batch_size}, device {model.device}; Ctrl-C stops)")
        elif service.state == "failed":
            server.server.should_exit = True

    log(f"warming up {options.model_name} on http://{shown}:{port} ...")
    threading.Thread(target=announce, daemon=True).start()
    server.run(sock)
    if service.state == "failed":
        return 1
    if server.signal is not None:
        log(f"stopped ({signal.Signals(server.signal).name})")
    return 0


__all__ = ["ApiError", "Batcher", "DEFAULT_MAX_WAIT_MS", "ServeOptions", "Service", "TOKEN_ENV",
           "bind", "create_app", "is_loopback", "read_token", "serve"]
