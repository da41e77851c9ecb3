"""``patchcore-fast serve`` (issue #22): a real uvicorn server on a loopback port, real
httpx clients, every bad request of the issue, batching, overload, timeouts, a failing
batch, the token, and SIGTERM with requests in flight."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import signal
import struct
import threading
import time
import types
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from patchcore_fast.calibration import LABELS
from patchcore_fast.cli import main
from patchcore_fast.model import PatchCore
from patchcore_fast.serve import ServeOptions, create_app, is_loopback, read_token
from serving import ServeProcess, ThreadServer, wait_ready

TOKEN = "t0ken-for-the-tests-0123456789"


@pytest.fixture(scope="module")
def demo(fit_demo):
    """The model file, the loaded model, test images and the first one's score."""
    root, model_file = fit_demo("serve", n_train=10, n_test_good=3, n_test_defect=3)
    files = sorted((root / "widget" / "test").rglob("*.png"))
    model = PatchCore.load(model_file, device="cpu")
    return types.SimpleNamespace(model_file=model_file, model=model, files=files,
                                 score0=float(model.predict(files[:1]).scores[0]))


@pytest.fixture(scope="module")
def server(demo):
    """(url, service) of the module's in-process server."""
    app = create_app(demo.model, ServeOptions(max_body_bytes=2 * 1024 * 1024))
    with ThreadServer(app) as url:
        yield url, app.state.service


@contextlib.contextmanager
def options(service, **changes):
    """Change the running service's limits for a block."""
    before = service.options
    service.options = dataclasses.replace(before, **changes)
    try:
        yield
    finally:
        service.options = before


@contextlib.contextmanager
def gated(service):
    """Hold every batch at the model until the yielded event is set."""
    gate, before = threading.Event(), service.score
    gate.sizes = []  # the size of each batch that reached the model

    def held(inputs):
        gate.sizes.append(len(inputs))
        gate.wait(60)
        return before(inputs)

    service.score = held
    try:
        yield gate
    finally:
        gate.set()
        service.score = before


def wait_for(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


def png(img: Image.Image | np.ndarray, fmt: str = "PNG") -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def post(url: str, data: bytes, ctype: str = "image/png", headers: dict | None = None,
         **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", content=data, timeout=120,
                      headers={"Content-Type": ctype, **(headers or {})}, **kw)


def assert_error(r: httpx.Response, status: int, words: str) -> None:
    """A refusal: the status, and one line of JSON ``{"error": ...}`` containing words."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and "\n" not in body["error"], body
    assert words in body["error"], body


def assert_good(url: str, demo) -> None:
    """The next good request succeeds, with the score of the same file."""
    r = post(url, demo.files[0].read_bytes())
    assert r.status_code == 200, r.text
    assert r.json()["score"] == pytest.approx(demo.score0, rel=1e-5)


# ----- answers ------------------------------------------------------------------------------

def test_health_model_metrics_and_page(server, demo):
    url, service = server
    r = httpx.get(f"{url}/v1/health")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    m = httpx.get(f"{url}/v1/model").json()
    assert m["config"]["backbone"] == "efficientnet_lite0"
    assert m["bank_rows"] == demo.model.bank.shape[0]
    # fit calibrates: the served model says its thresholds
    assert m["calibration"]["image_threshold"] == demo.model.calibration.image_threshold
    assert m["serving"]["batch_size"] == demo.model.config.batch_size
    text = httpx.get(f"{url}/metrics").text
    for name in ("patchcore_predict_requests_total", "patchcore_predict_latency_seconds_bucket",
                 "patchcore_batch_size_bucket", "patchcore_queue_depth", "patchcore_ready 1.0"):
        assert name in text
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "app.js" in page.text
    for text in (page.text, httpx.get(f"{url}/app.js").text):  # no CDN: works offline
        assert "http://" not in text and "https://" not in text
    assert httpx.get(f"{url}/app.js").status_code == 200
    assert httpx.get(f"{url}/style.css").status_code == 200


@pytest.mark.parametrize("fmt,ctype", [("PNG", "image/png"), ("JPEG", "image/jpeg"),
                                       ("BMP", "image/bmp"), ("TIFF", "image/tiff"),
                                       ("PNG", "application/octet-stream")])
def test_predict_formats_score_as_the_file(server, demo, tmp_path, fmt, ctype):
    """Each format as the body: the score of the same file scored by the library."""
    url, _ = server
    model, source = demo.model, demo.files[3]
    path = tmp_path / f"x.{fmt.lower()}"
    Image.open(source).save(path, format=fmt)
    r = post(url, path.read_bytes(), ctype)
    assert r.status_code == 200, r.text
    a = r.json()
    want = model.predict([path])
    assert a["score"] == pytest.approx(float(want.scores[0]), rel=1e-5)
    assert (a["width"], a["height"]) == Image.open(path).size
    # The verdict of the calibrated model, as the library gives it for the file.
    assert a["label"] == LABELS[bool(want.labels[0])]
    assert a["normalised"] == pytest.approx(float(want.normalised[0]), abs=1e-5)
    assert a["threshold"] == pytest.approx(model.calibration.image_threshold)
    assert len(a["regions"]) == len(want.regions[0])
    t = a["timing"]
    assert t["batch_size"] >= 1 and t["total_ms"] >= t["model_ms"] > 0


def test_multipart_and_overlay(server, demo):
    url, _ = server
    data = demo.files[4].read_bytes()
    r = httpx.post(f"{url}/v1/predict", files={"image": ("a.png", data, "image/png")},
                   data={"overlay": "png"}, timeout=120)
    assert r.status_code == 200, r.text
    a = r.json()
    overlay = Image.open(io.BytesIO(base64.b64decode(a["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (a["width"], a["height"])
    assert a["colour_scale"]["from"] == "model"  # the calibrated model's fixed scale
    plain = post(url, data).json()
    assert plain["score"] == a["score"] and "overlay_png" not in plain
    q = post(url + "", data, params={"overlay": "png"})
    assert "overlay_png" in q.json()
    j = post(url, data, params={"overlay": "jpg"}).json()
    assert "overlay_png" not in j and j["score"] == a["score"]
    jpeg = Image.open(io.BytesIO(base64.b64decode(j["overlay_jpg"])))
    assert jpeg.format == "JPEG" and jpeg.size == overlay.size
    diff = np.abs(np.asarray(jpeg, dtype=np.int16) - np.asarray(overlay, dtype=np.int16))
    assert diff.mean() < 4  # the same picture, up to JPEG's loss at quality 90


def test_concurrent_requests_are_batched(server, demo):
    """Requests waiting while the model works go into one batch; every client gets its
    own image's answer."""
    url, service = server
    files, model = demo.files, demo.model
    size = model.config.batch_size
    bodies = [files[i % len(files)].read_bytes() for i in range(size + 1)]
    expected = model.predict(files).scores

    async def clients():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(
                f"{url}/v1/predict", content=b, headers={"Content-Type": "image/png"})
                for b in bodies))

    with gated(service) as gate:
        result: list = []
        t = threading.Thread(target=lambda: result.extend(asyncio.run(clients())))
        t.start()
        # The first batch held at the model (the requests that arrived within its wait:
        # one or a few), the others queued behind it.
        wait_for(lambda: gate.sizes and gate.sizes[0] + len(service.batcher.jobs)
                 == len(bodies))
        first = gate.sizes[0]
        gate.set()
        t.join(120)
    assert [r.status_code for r in result] == [200] * len(bodies)
    answers = [r.json() for r in result]
    for i, a in enumerate(answers):
        assert a["score"] == pytest.approx(float(expected[i % len(files)]), rel=1e-4)
    # The queued requests went to the model together, as one batch.
    queued = len(bodies) - first
    assert sorted(a["timing"]["batch_size"] for a in answers) == \
        sorted([first] * first + [queued] * queued)
    assert gate.sizes == [first, queued]
    text = httpx.get(f"{url}/metrics").text
    assert f'patchcore_batch_size_bucket{{le="{float(size)}"}}' in text


# ----- bad requests -------------------------------------------------------------------------

def _one_by_100000() -> bytes:
    return png(np.full((1, 100_000, 3), 128, np.uint8))


BAD = {
    "empty body": (lambda f: b"", "image/png", 400, "empty"),
    "not an image": (lambda f: b"hello, this is text" * 10, "image/png", 400, "not an image"),
    "truncated PNG": (lambda f: f.read_bytes()[:2000], "image/png", 400, "truncated"),
    "GIF": (lambda f: png(Image.open(f), "GIF"), "image/png", 400, "unsupported image format GIF"),
    "wrong content type": (lambda f: f.read_bytes(), "text/plain", 415, "not an image"),
    "JSON content type": (lambda f: b'{"path": "/etc/passwd"}', "application/json", 415,
                          "not an image"),
    "multipart without a boundary": (lambda f: f.read_bytes(), "multipart/form-data", 400,
                                     "boundary"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request(server, demo, case):
    url, _ = server
    make, ctype, status, words = BAD[case]
    assert_error(post(url, make(demo.files[0]), ctype), status, words)
    assert_good(url, demo)


def test_body_too_large(server, demo):
    """A 50 MB body (the limit is 2 MiB here): 413 with the limit named, read to its end
    (no reset connection), with and without a Content-Length."""
    url, _ = server
    big = bytes(50 * 1024 * 1024)
    assert_error(post(url, big), 413, "above the limit of 2,097,152")

    def chunks():
        for _ in range(50):
            yield bytes(1024 * 1024)

    r = httpx.post(f"{url}/v1/predict", content=chunks(), headers={"Content-Type": "image/png"},
                   timeout=120)
    assert_error(r, 413, "above the limit")
    assert_good(url, demo)


def test_sliver_is_scored_within_the_pixel_budget(server, demo):
    """1 x 100,000 pixels: scored as the CLI scores it (the map at the photo's size)."""
    url, _ = server
    r = post(url, _one_by_100000())
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (100_000, 1)
    assert_good(url, demo)


def _png_header(width: int, height: int) -> bytes:
    """A 74-byte PNG that declares ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                             0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused(server, demo):
    """A small file declaring 20,000 x 20,000 pixels: 413 before any pixel is decoded (the
    file reader's limit)."""
    url, _ = server
    assert_error(post(url, _png_header(20_000, 20_000)), 413, "pixels")
    assert_good(url, demo)


def test_internal_error_is_one_json_line(server, demo):
    url, service = server
    service._finish = lambda *args: 1 / 0
    try:
        assert_error(post(url, demo.files[0].read_bytes()), 500,
                     "internal error: division by zero")
    finally:
        del service._finish
    assert_good(url, demo)


def test_local_hosts_only(server):
    """Listening on loopback, a request naming another host (DNS rebinding) is refused."""
    url, service = server
    with options(service, local_hosts_only=True):
        assert_error(httpx.get(f"{url}/v1/model", headers={"Host": "evil.example"}), 400,
                     "not this machine")
        port = url.rsplit(":", 1)[1]
        assert httpx.get(f"{url}/v1/model", headers={"Host": f"localhost:{port}"}
                         ).status_code == 200
        assert httpx.get(f"{url}/v1/model").status_code == 200


def test_routes_methods_and_parameters(server, demo):
    url, _ = server
    assert_error(httpx.get(f"{url}/v1/nothing"), 404, "no such route")
    assert_error(httpx.get(f"{url}/../../etc/passwd"), 404, "no such route")
    assert_error(httpx.delete(f"{url}/v1/predict"), 405, "not allowed")
    assert_error(httpx.get(f"{url}/v1/predict"), 405, "not allowed")
    assert_error(post(url, demo.files[0].read_bytes(), params={"overlay": "jpeg"}), 400, "overlay")
    r = httpx.post(f"{url}/v1/predict", files={"note": (None, "no file here")},
                   timeout=60)
    assert_error(r, 400, "field 'image'")
    assert_good(url, demo)


# ----- limits -------------------------------------------------------------------------------

def test_overload_answers_503_then_recovers(server, demo):
    url, service = server
    data = demo.files[0].read_bytes()
    with options(service, queue_size=2), gated(service) as gate:
        held: list = []
        threads = [threading.Thread(target=lambda: held.append(post(url, data)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: service.admitted == 2)
        for _ in range(3):
            r = post(url, data)
            assert_error(r, 503, "busy")
            assert r.headers["Retry-After"] == "1"
        gate.set()
        for t in threads:
            t.join(120)
    assert [r.status_code for r in held] == [200, 200]
    assert 'patchcore_predict_requests_total{outcome="overloaded"} 3.0' in httpx.get(
        f"{url}/metrics").text
    assert_good(url, demo)


def test_timeout_answers_504_then_recovers(server, demo):
    url, service = server
    with options(service, timeout_s=0.5), gated(service):
        assert_error(post(url, demo.files[0].read_bytes()), 504, "no answer within 0.5 s")
    assert_good(url, demo)


def test_failed_batch_fails_only_its_requests(server, demo):
    """A batch whose model call raises answers 500 to its own requests; the batcher goes
    on, and the next batch is scored."""
    url, service = server
    before = service.score

    def fails_on_grey(inputs):
        if any(float(x.flatten(1).std(1).max()) == 0.0 for x in inputs):  # uniform grey
            raise RuntimeError("injected failure\nsecond line")
        return before(inputs)

    service.score = fails_on_grey
    try:
        grey = png(np.full((64, 64, 3), 124, np.uint8))
        assert_error(post(url, grey), 500, "scoring failed: injected failure")
        assert_good(url, demo)
    finally:
        service.score = before


def test_warming_up_answers_503(demo):
    """Before the warm-up ends, health and predictions answer 503 (Retry-After)."""
    app = create_app(demo.model, ServeOptions())
    service = app.state.service
    gate, warm = threading.Event(), service.warm_up
    service.warm_up = lambda: (gate.wait(60), warm())
    try:
        with ThreadServer(app, ready=False) as url:
            r = httpx.get(f"{url}/v1/health")
            assert r.status_code == 503 and r.json()["status"] == "starting"
            r = post(url, demo.files[0].read_bytes())
            assert_error(r, 503, "warming up")
            assert r.headers["Retry-After"] == "1"
            gate.set()
            wait_ready(url)
            assert post(url, demo.files[0].read_bytes()).status_code == 200
    finally:
        gate.set()


# ----- access -------------------------------------------------------------------------------

def test_loopback_and_token_helpers(tmp_path, monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    monkeypatch.delenv("PATCHCORE_FAST_TOKEN", raising=False)
    assert read_token(None) is None
    monkeypatch.setenv("PATCHCORE_FAST_TOKEN", TOKEN)
    assert read_token(None) == TOKEN
    f = tmp_path / "token.txt"
    f.write_text(" other-token-0123456789 \nsecond line\n")
    assert read_token(str(f)) == "other-token-0123456789"


@pytest.mark.parametrize("args,words", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 can be reached from other machines"),
    (["--host", "0.0.0.0", "--token-file", "/nonexistent/token"], "--token-file"),
    (["--token-file", "EMPTY"], "is empty"),
    (["--token-file", "SHORT"], "fewer than 16"),
    (["--port", "70000"], "port number"),
    (["--max-wait-ms", "-1"], "milliseconds"),
])
def test_serve_refuses_bad_options(demo, tmp_path, capsys, monkeypatch, args, words):
    """One error line and exit 2, before the model is loaded or a port opened."""
    monkeypatch.delenv("PATCHCORE_FAST_TOKEN", raising=False)
    (tmp_path / "EMPTY").write_text("\n")
    (tmp_path / "SHORT").write_text("abc\n")
    args = [str(tmp_path / a) if a in ("EMPTY", "SHORT") else a for a in args]
    assert main(["serve", str(demo.model_file), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("patchcore-fast: error:") and "\n" not in err and words in err


def test_token_on_a_public_bind_and_sigterm_in_flight(demo, tmp_path):
    """The real command on 0.0.0.0 with a token: requests without it or with a wrong one
    answer 401; with it, 200. SIGTERM with requests in flight: each admitted request is
    answered 200, later ones find the door closed (never an error answer), and the process
    exits 0."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    data = demo.files[0].read_bytes()
    # A large photo: decoding it keeps requests in flight long enough to be caught.
    rng = np.random.default_rng(0)
    big = png(rng.integers(0, 256, (1200, 1200, 3), dtype=np.uint8))
    good = {"Authorization": f"Bearer {TOKEN}"}
    with ServeProcess(demo.model_file, "--host", "0.0.0.0", "--token-file", str(token_file),
                      "--batch-size", "1") as proc:
        url = proc.url
        wait_ready(url)  # health needs no token
        assert_error(post(url, data), 401, "token")
        assert_error(post(url, data, headers={"Authorization": "Bearer wrong"}), 401, "token")
        assert_error(post(url, data, headers={"Authorization": TOKEN}), 401, "token")
        assert_error(httpx.get(f"{url}/v1/model"), 401, "token")
        assert_error(httpx.get(f"{url}/metrics"), 401, "token")
        assert httpx.get(f"{url}/v1/model", headers=good).status_code == 200
        assert post(url, data, headers=good).status_code == 200

        n, caught = 24, 4
        answers: list = []

        async def clients():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(
                    f"{url}/v1/predict", content=big,
                    headers={**good, "Content-Type": "image/png"}) for _ in range(n)),
                    return_exceptions=True)

        t = threading.Thread(target=lambda: answers.extend(asyncio.run(clients())))
        t.start()

        def admitted() -> float:
            text = httpx.get(f"{url}/metrics", headers=good).text
            line = next(x for x in text.splitlines()
                        if x.startswith("patchcore_requests_admitted "))
            return float(line.split()[1])

        wait_for(lambda: admitted() >= caught)
        code, rest = proc.stop(signal.SIGTERM)
        t.join(120)
        assert code == 0, rest
        assert "stopped (SIGTERM)" in rest
        answered = [a for a in answers if isinstance(a, httpx.Response)]
        assert all(a.status_code == 200 for a in answered), [a.text for a in answered]
        assert len(answered) >= caught
        assert all(isinstance(a, httpx.TransportError) for a in answers
                   if not isinstance(a, httpx.Response)), answers
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/v1/health")


def test_metrics_count_outcomes(server, demo):
    url, _ = server

    def counts() -> dict[str, float]:
        text = httpx.get(f"{url}/metrics").text
        return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("patchcore_predict_requests_total{")}

    before = counts()
    assert post(url, demo.files[0].read_bytes()).status_code == 200
    assert post(url, b"x", "text/plain").status_code == 415
    after = counts()
    assert after["ok"] - before.get("ok", 0) == 1
    assert after["unsupported_type"] - before.get("unsupported_type", 0) == 1


def test_uncalibrated_model_answers_without_a_verdict(demo):
    """A model file written before calibration existed: scores, no label, no regions."""
    import dataclasses as dc

    from patchcore_fast import frames

    model = demo.model
    saved = model.calibration
    try:
        model.calibration = None
        v = frames.decide(model, np.array([1.0, 2.0], dtype=np.float32),
                          [np.zeros((4, 4), np.float32)] * 2)
        assert dc.astuple(v) == ([None, None], [None, None], [[], []], None)
        assert frames.colour_scale(model, np.arange(10.0))[2] == "image"
    finally:
        model.calibration = saved


def _nice_values(pid: int) -> dict[int, int]:
    """Thread id -> nice value of each thread of process ``pid`` (Linux /proc; the fields
    after the parenthesised name, whose 17th is the nice value)."""
    return {int(task.name): int((task / "stat").read_text().rpartition(")")[2].split()[16])
            for task in Path(f"/proc/{pid}/task").iterdir()}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("nice", [None, "0", "5"])
def test_serve_worker_threads_yield_to_the_event_loop(demo, nice):
    """The serve command lowers the priority of its worker threads (model, torch, decoding)
    once warm, the event loop's thread (the main thread) keeping the process's own, so that
    it answers and refuses at once on a busy machine; --worker-nice sets the value, 0
    leaves all alone."""
    args = [] if nice is None else ["--worker-nice", nice]
    want = 10 if nice is None else int(nice)
    with ServeProcess(demo.model_file, *args) as proc:
        wait_ready(proc.url)
        assert post(proc.url, demo.files[0].read_bytes()).status_code == 200
        threads = _nice_values(proc.proc.pid)
    assert threads.pop(proc.proc.pid) == 0
    # At least the model's thread, a decoding thread (started by the request, after the
    # warm-up) and torch's second intra-op thread or uvicorn's helpers.
    assert len(threads) >= 3, threads
    assert all(v == want for v in threads.values()), threads


def test_serve_refuses_a_bad_worker_nice(demo, capsys):
    assert main(["serve", str(demo.model_file), "--worker-nice", "20"]) == 2
    err = capsys.readouterr().err
    assert "--worker-nice" in err and "0 to 19" in err and len(err.strip().splitlines()) == 1
