"""`albor serve` as a real process, spoken to with a real HTTP client (http.client).

One server (API key, small queue and caps) serves most tests; a second one checks the warning
for a non-loopback address and that SIGINT lets a running stream finish."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from albor.infer.engine import completions, make_prompt
from albor.infer.loader import load

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Proc:
    """A server subprocess whose stderr is read in the background."""

    def __init__(self, args: list[str]) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "albor", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = [m for line in self.lines if (m := re.search(r"http://\S+:\d+", line))]
            if found:
                parts = urlsplit(found[0].group(0))
                self.host, self.port = str(parts.hostname), int(parts.port or 0)
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        self.p.kill()
        raise AssertionError(f"server did not start: {''.join(self.lines)}")

    def _read(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def conn(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.p.send_signal(sig)
        rc = self.p.wait(timeout=60)
        self._reader.join(timeout=5)
        return rc


def call(
    server: Proc,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    conn = server.conn()
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={**AUTH, **(headers or {})})
    resp = conn.getresponse()
    text = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(text) if text else None


def events(resp: http.client.HTTPResponse) -> Iterator[Any]:
    """The `data:` payloads of a server-sent event stream, "[DONE]" included."""
    for line in resp:
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data: "):
            payload = line[6:].decode()
            yield payload if payload == "[DONE]" else json.loads(payload)


@pytest.fixture(scope="module")
def server(trained_model: Path) -> Iterator[Proc]:
    args = [str(trained_model), "--port", "0", "--api-key", KEY, "--threads", "1"]
    args += ["--max-queue", "2", "--max-n", "4", "--max-tokens-limit", "100"]
    args += ["--max-body-bytes", "4096"]
    proc = Proc(args)
    yield proc
    rc = proc.stop(signal.SIGTERM)
    assert rc == 0, proc.stderr
    assert "stopped" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def engine(trained_model: Path) -> Any:
    return load(trained_model)


def expected(engine: Any, prompt: str, max_tokens: int, **kw: Any) -> str:
    suffix = kw.pop("suffix", None)
    p = make_prompt(engine, prompt, suffix)
    return completions(engine, [p], max_new_tokens=max_tokens, **kw)[0].text


def test_health_models_and_api_key(server: Proc) -> None:
    conn = server.conn()
    conn.request("GET", "/health")  # no key needed
    resp = conn.getresponse()
    health = json.loads(resp.read())
    assert resp.status == 200 and health["status"] == "ok" and health["model"] == "pretrain"
    status, _, body = call(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert body["data"][0]["id"] == "pretrain" and body["data"][0]["context_length"] == 128
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, _, body = call(server, "GET", "/v1/models", headers=headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    conn = server.conn()
    conn.request("POST", "/v1/completions", body=b'{"prompt": "x"}')  # no header at all
    assert conn.getresponse().status == 401


def test_completion_equals_the_engine(server: Proc, engine: Any) -> None:
    prompt = "def add(a, b):\n    return"
    req = {"model": "whatever", "prompt": prompt, "max_tokens": 20, "temperature": 0}
    status, _, body = call(server, "POST", "/v1/completions", req)
    assert status == 200, body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "pretrain" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["text"] == expected(engine, prompt, 20)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 20
    # echo puts the prompt first; a stop string cuts the text before it.
    text = choice["text"]
    req = {**req, "echo": True}
    assert call(server, "POST", "/v1/completions", req)[2]["choices"][0]["text"] == prompt + text
    if len(text.strip()) >= 4:
        stop = text.strip()[1:3]
        req = {"prompt": prompt, "max_tokens": 20, "temperature": 0, "stop": [stop, "zzz"]}
        (c,) = call(server, "POST", "/v1/completions", req)[2]["choices"]
        assert c["text"] == text[: text.index(stop)] and c["finish_reason"] == "stop"


def test_prompt_lists_and_n(server: Proc, engine: Any) -> None:
    prompts = ["import os\n", "class A:\n"]
    req = {"prompt": prompts, "n": 2, "max_tokens": 8, "temperature": 0}
    status, _, body = call(server, "POST", "/v1/completions", req)
    assert status == 200
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    want = [expected(engine, p, 8) for p in prompts]
    assert [c["text"] for c in choices] == [want[0], want[0], want[1], want[1]]
    # Sampling: seeded requests repeat; the n samples of one request differ.
    req = {"prompt": "x = ", "n": 4, "max_tokens": 12, "temperature": 1.0, "seed": 5}
    a = [c["text"] for c in call(server, "POST", "/v1/completions", req)[2]["choices"]]
    b = [c["text"] for c in call(server, "POST", "/v1/completions", req)[2]["choices"]]
    assert a == b and len(set(a)) > 1


def test_streaming_and_fim(server: Proc, engine: Any) -> None:
    prefix, suffix = "def area(r):\n    return ", " * r\n"
    req = {"prompt": prefix, "suffix": suffix, "max_tokens": 24, "temperature": 0}
    plain = call(server, "POST", "/v1/completions", req)[2]["choices"][0]
    assert plain["text"] == expected(engine, prefix, 24, suffix=suffix)
    conn = server.conn()
    body = {**req, "stream": True, "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers=AUTH)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    got = list(events(resp))
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    pieces = [c["choices"][0] for c in chunks[:-1]]
    assert "".join(p["text"] for p in pieces) == plain["text"]
    assert [p["finish_reason"] for p in pieces][-1] == plain["finish_reason"]
    assert all(p["finish_reason"] is None for p in pieces[:-1])


def test_every_error_class(server: Proc) -> None:
    def error(status: int, body: Any = None, **kw: Any) -> dict[str, Any]:
        got, headers, data = call(
            server, kw.pop("method", "POST"), kw.pop("path", "/v1/completions"), body, **kw
        )
        assert got == status, data
        assert set(data["error"]) == {"message", "type", "param", "code"}
        assert headers["Content-Type"] == "application/json"
        return dict(data["error"])

    assert error(400, raw=b"{not json")["code"] == "invalid_json"
    assert error(400, raw=b"[1, 2]")["code"] == "invalid_json"
    e = error(400, {"prompt": "x", "max_tokens": "5"})
    assert e["param"] == "max_tokens" and "integer" in e["message"]
    assert error(400, {"prompt": 5})["message"] == "prompt must be a string or a list of strings"
    assert error(400, {"prompt": "x", "stream": "yes"})["param"] == "stream"
    e = error(400, {"prompt": "x", "frobnicate": 1})
    assert e["param"] == "frobnicate" and e["code"] == "unknown_field"
    assert error(400, {})["message"] == "prompt is required"
    assert error(400, {"prompt": "x", "temperature": 3})["param"] == "temperature"
    assert error(400, {"prompt": "x", "logprobs": 2})["param"] == "logprobs"
    assert error(400, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]})["param"] == "stop"
    assert error(400, {"prompt": []})["param"] == "prompt"
    e = error(400, {"prompt": "x", "max_tokens": 101})
    assert e["param"] == "max_tokens" and "100" in e["message"]
    assert error(400, {"prompt": "x", "n": 5})["param"] == "n"
    e = error(400, {"prompt": "def f(x): " * 12, "max_tokens": 90})
    assert e["code"] == "context_length_exceeded"
    assert re.search(r"prompt has \d+ tokens and max_tokens is 90", e["message"])
    assert "context of 128" in e["message"]
    assert error(413, {"prompt": "x" * 5000})["code"] == "body_too_large"
    assert error(405, method="GET")["message"].startswith("GET /v1/completions is not allowed")
    assert error(404, method="GET", path="/v2/nothing")["code"] == "not_found"
    with socket.create_connection((server.host, server.port), timeout=60) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 411")  # no Content-Length
    # Still healthy after all of that.
    assert call(server, "GET", "/health")[2]["status"] == "ok"


def test_concurrent_clients_queue_and_overflow(server: Proc, engine: Any) -> None:
    prompt = "for i in range("
    want = expected(engine, prompt, 90)
    results: list[tuple[int, dict[str, str], Any]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def client() -> None:
        barrier.wait()
        r = call(
            server,
            "POST",
            "/v1/completions",
            {"prompt": prompt, "max_tokens": 90, "temperature": 0},
        )
        with lock:
            results.append(r)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 503]
    assert len(ok) + len(busy) == 8 and ok
    assert all(r[2]["choices"][0]["text"] == want for r in ok)
    # One runs, two wait (--max-queue 2): the rest are told to come back.
    assert (
        len(ok) >= 3
        and busy
        and all(r[1]["Retry-After"] == "1" and r[2]["error"]["code"] == "server_busy" for r in busy)
    )

    # Clients that retry on 503 all get their answer.
    answers: list[str] = []

    def patient(i: int) -> None:
        req = {"prompt": prompt, "max_tokens": 10 + i, "temperature": 0}
        for _ in range(200):
            status, _, body = call(server, "POST", "/v1/completions", req)
            if status == 200:
                with lock:
                    answers.append(body["choices"][0]["text"])
                return
            time.sleep(0.05)

    threads = [threading.Thread(target=patient, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == sorted(expected(engine, prompt, 10 + i) for i in range(6))


def test_a_client_leaving_mid_stream_does_not_hurt(server: Proc) -> None:
    body = json.dumps({"prompt": "x", "max_tokens": 100, "temperature": 0, "stream": True})
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((server.host, server.port), timeout=60) as s:
        s.sendall(head.encode() + body.encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200")  # the stream started; then we leave
    status, _, data = call(server, "POST", "/v1/completions", {"prompt": "y", "max_tokens": 3})
    assert status == 200 and data["choices"][0]["finish_reason"] in ("stop", "length")


def test_public_bind_warns_and_sigint_finishes_the_running_stream(trained_model: Path) -> None:
    proc = Proc([str(trained_model), "--host", "0.0.0.0", "--port", "0", "--threads", "1"])
    try:
        assert "warning: listening on 0.0.0.0 without --api-key" in proc.stderr
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=60)
        req = {"prompt": "import ", "max_tokens": 100, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps(req))
        resp = conn.getresponse()
        stream = events(resp)
        first = next(stream)
        proc.p.send_signal(signal.SIGINT)
        rest = list(stream)
        assert first["choices"][0]["index"] == 0 and rest[-1] == "[DONE]"
        assert rest[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.p.wait(timeout=60) == 0
        assert "SIGINT" in proc.stderr and "stopped" in proc.stderr
    finally:
        if proc.p.poll() is None:
            proc.p.kill()
