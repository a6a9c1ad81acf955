"""The HTTP server's own limits (issue 12): read deadlines for headers and bodies, a connection cap, and
a shutdown that ends within the drain timeout + a grace whatever clients do."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.connections import SHUTDOWN_GRACE_S
from tests.support import REPO
from tests.support.api import free_port, settings, tiny_loaded, uvicorn_thread, wait_healthy


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_connection_that_never_finishes_its_headers_is_closed() -> None:
    with uvicorn_thread(settings(read_timeout=0.5), tiny_loaded()) as (url, _):
        sock = connect(url)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n")  # no blank line: headers never end
        start = time.monotonic()
        assert read_until_closed(sock) == b""
        assert time.monotonic() - start < 5
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_body_that_never_ends_gets_408() -> None:
    with uvicorn_thread(settings(read_timeout=0.5), tiny_loaded()) as (url, _):
        sock = connect(url)
        head = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        sock.sendall(head + b'{"model": ')  # 10 of the 100 bytes promised
        start = time.monotonic()
        response = read_until_closed(sock)
        assert time.monotonic() - start < 5
        status, _, rest = response.partition(b"\r\n")
        assert b" 408 " in status, response
        body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "request_timeout"


def test_connections_beyond_max_connections_get_503() -> None:
    with uvicorn_thread(settings(max_connections=2), tiny_loaded()) as (url, _):
        held = [connect(url), connect(url)]
        time.sleep(0.1)
        assert httpx.get(f"{url}/health").status_code == 503
        for sock in held:
            sock.close()
        time.sleep(0.1)
        assert httpx.get(f"{url}/health").status_code == 200


def test_sigterm_with_a_stuck_client_still_exits_within_drain_plus_grace(smollm2_path: Path, tmp_path: Path) -> None:
    """A client whose chunked body never ends once kept the process alive after the drain; the other
    streams must still end with [DONE] (here: cut by the drain, so an error event first)."""
    port, drain = free_port(), 1.0
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLAMASERVE_THREADS": os.environ.get("LLAMASERVE_TEST_THREADS", "2")}
    # Eager and no warm-up: shutdown is under test here, the compiled default is in tests/test_soak.py.
    command = [sys.executable, "-m", "app", "--model", str(smollm2_path), "--port", str(port), "--max-batch-size", "2",
               "--max-seq-len", "1024", "--drain-timeout", str(drain), "--log-level", "warning",
               "--no-compile", "--no-warmup"]  # fmt: skip
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, tmp_path / "server.log", timeout=120)
        stuck = connect(url)
        stuck.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n")  # fmt: skip
        body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once", "max_tokens": 900, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and "server_draining" in rest[-2]
        proc.wait(timeout=drain + SHUTDOWN_GRACE_S + 10)
        assert time.monotonic() - sent < drain + SHUTDOWN_GRACE_S + 5
        stuck.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
