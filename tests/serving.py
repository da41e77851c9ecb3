"""A real uvicorn server on an ephemeral loopback port, in a thread of the test process
(tests/test_serve.py, tests/test_page.py), and a real ``patchcore-fast serve`` process."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from child import CHILD_CWD, CLI, child_env


def wait_ready(url: str, timeout: float = 300.0, headers: dict | None = None) -> None:
    """Poll ``/v1/health`` until it answers 200 (the model is warmed up)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/v1/health", headers=headers, timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} was not ready within {timeout} s")


class ThreadServer:
    """``with ThreadServer(app) as url:`` serves ``app`` (uvicorn, lifespan on) on
    127.0.0.1 at a free port until the block ends; ``ready=False`` does not wait for the
    warm-up."""

    def __init__(self, app, ready: bool = True):
        self.app, self.ready = app, ready

    def __enter__(self) -> str:
        import uvicorn

        from patchcore_fast.serve import bind

        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "the server thread ended"
            time.sleep(0.01)
        if self.ready:
            wait_ready(self.url)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


class ServeProcess:
    """``patchcore-fast serve MODEL --port 0 ARGS...`` as a child process; ``url`` once it
    printed its address. Stopped (SIGTERM, then SIGKILL) when the block ends."""

    def __init__(self, model: Path, *args: str, env: dict | None = None):
        self.argv = [*CLI, "serve", str(model), "--port", "0", *args]
        self.env = {**child_env(), **(env or {})}

    def __enter__(self) -> "ServeProcess":
        self.proc = subprocess.Popen(self.argv, stderr=subprocess.PIPE, text=True,
                                     env=self.env, cwd=CHILD_CWD)
        line = self.proc.stderr.readline()
        found = re.search(r"http://(\S+?):(\d+)", line)
        if not found:
            rest = self.proc.stderr.read()
            self.proc.wait(30)
            raise AssertionError(f"serve did not start: {line}{rest}")
        self.port = int(found.group(2))
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> tuple[int, str]:
        """Send ``sig``; (exit code, the rest of stderr)."""
        self.proc.send_signal(sig)
        rest = self.proc.stderr.read()
        return self.proc.wait(timeout), rest

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()
