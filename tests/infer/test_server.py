"""`albor serve` as a real process, spoken to with a real HTTP client (http.client) and with raw
bytes over a socket.

One server (API key, small queue and caps) serves most tests; a second one checks the warning
for a non-loopback address and that SIGINT lets a running stream finish. The last tests run the
server in this process, in a thread: on IPv6, and stopped while requests wait in its queue."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
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

from albor.errors import ConfigError
from albor.infer.api import Limits
from albor.infer.completion import completions, make_prompt
from albor.infer.loader import load
from albor.infer.server import Server, create_server

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
    headers = {k.lower(): v for k, v in resp.getheaders()}  # names are case-insensitive
    return resp.status, headers, json.loads(text) if text else None


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
        assert headers["content-type"] == "application/json"
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
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        s.sendall(head.encode())
        assert s.recv(100).startswith(b"HTTP/1.1 411")  # no Content-Length
    # Still healthy after all of that.
    assert call(server, "GET", "/health")[2]["status"] == "ok"


def exchange(
    server: Proc | InThread, raw: bytes, *, then: bytes = b""
) -> tuple[int, dict[str, str], Any]:
    """Send `raw` as it is, then `then` once the answer has come (if the server still reads);
    the status, the headers (lowercase names) and the JSON body of the answer."""
    with socket.create_connection((server.host, server.port), timeout=60) as s:
        s.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            got = s.recv(65536)
            assert got, f"the server closed without an answer: {data!r}"
            data += got
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        assert re.fullmatch(r"HTTP/1\.1 \d{3} [\w ]+", status_line), status_line
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        while len(body) < int(headers["content-length"]):
            got = s.recv(65536)
            assert got, "the server closed in the middle of the body"
            body += got
        if then:
            with contextlib.suppress(OSError):
                s.sendall(then)
    return int(status_line.split()[1]), headers, json.loads(body)


def request_bytes(
    body: bytes,
    *,
    method: str = "POST",
    path: str = "/v1/completions",
    extra: str = "",
    length: bool = True,
) -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\n{extra}"
    )
    if length and "Content-Length" not in extra and "Transfer-Encoding" not in extra:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


# name: (bytes sent, status, error code or param, text in the message)
MALFORMED: dict[str, tuple[bytes, int, str | None, str]] = {
    "lone surrogate in prompt": (
        request_bytes(b'{"prompt": "def f():\\ud800", "max_tokens": 2}'),
        400,
        "prompt",
        "prompt is not valid Unicode",
    ),
    "lone surrogate in prompt list": (
        request_bytes(b'{"prompt": ["ok", "\\udfff"]}'),
        400,
        "prompt",
        "prompt[1] is not valid Unicode",
    ),
    "lone surrogate in suffix": (
        request_bytes(b'{"prompt": "x", "suffix": "\\ud83d"}'),
        400,
        "suffix",
        "suffix is not valid Unicode",
    ),
    "lone surrogate in stop": (
        request_bytes(b'{"prompt": "x", "stop": ["a", "b\\ud800"]}'),
        400,
        "stop",
        "stop[1] is not valid Unicode",
    ),
    "invalid UTF-8": (
        request_bytes(b'{"prompt": "caf\xe9"}'),
        400,
        "invalid_utf8",
        "byte 0xe9",
    ),
    "not JSON": (request_bytes(b"prompt=hello"), 400, "invalid_json", "not valid JSON"),
    "NaN": (
        request_bytes(b'{"prompt": "x", "temperature": NaN}'),
        400,
        "invalid_json",
        "NaN",
    ),
    "nested too deep": (request_bytes(b"[" * 3000), 400, "invalid_json", "not usable JSON"),
    "wrong type": (request_bytes(b'{"prompt": "x", "n": "2"}'), 400, "n", "integer"),
    "seed out of range": (
        request_bytes(b'{"prompt": "x", "seed": 18446744073709551616}'),
        400,
        "seed",
        "seed",
    ),
    "unknown field": (
        request_bytes(b'{"prompt": "x", "best_guess": true}'),
        400,
        "unknown_field",
        "unknown field 'best_guess'",
    ),
    "negative Content-Length": (
        request_bytes(b'{"prompt": "x"}', extra="Content-Length: -15\r\n"),
        400,
        "invalid_http",
        "Content-Length",
    ),
    "garbage Content-Length": (
        request_bytes(b'{"prompt": "x"}', extra="Content-Length: 1five\r\n"),
        400,
        "invalid_http",
        "Content-Length",
    ),
    "no Content-Length": (
        request_bytes(b'{"prompt": "x"}', length=False),
        411,
        None,
        "Content-Length",
    ),
    "huge Content-Length": (
        request_bytes(b'{"prompt": "', extra="Content-Length: 1000000000\r\n"),
        413,
        "body_too_large",
        "1000000000 bytes",
    ),
    "chunked over the cap": (
        request_bytes(
            chunked(b'{"prompt": "', b"x" * 3000, b"y" * 3000),
            extra="Transfer-Encoding: chunked\r\n",
        ),
        413,
        "body_too_large",
        "over 4096 bytes",
    ),
    "unknown method": (request_bytes(b"", method="BREW"), 405, None, "BREW /v1/completions"),
    "unknown path": (request_bytes(b"{}", path="/v1/chat"), 404, "not_found", "/v1/chat"),
    "not HTTP": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400, "invalid_http", ""),
    "HTTP/1.1 without Host": (
        f"GET /health HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode(),
        400,
        "invalid_http",
        "Host",
    ),
    "a line of text": (b"hello, server\r\n\r\n", 400, "invalid_http", "not a valid HTTP"),
    "head too large": (
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 20000,  # and no end in sight
        431,
        "invalid_http",
        "",
    ),
}


def test_malformed_requests_get_json_4xx_and_one_log_line(server: Proc) -> None:
    for name, (raw, status, key, text) in MALFORMED.items():
        before = len(server.lines)
        # The rest of an over-long body, sent after the 413, is read and dropped.
        then = b"x" * 100_000 if name == "huge Content-Length" else b""
        got, headers, body = exchange(server, raw, then=then)
        assert got == status, (name, body)
        assert headers["content-type"] == "application/json", name
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert key in (None, error["code"], error["param"]), (name, error)
        assert text in error["message"], (name, error)
        if status == 405:
            assert headers["allow"] == "POST"
        # Exactly one log line for the refusal: client, method, path, status, reason.
        deadline = time.monotonic() + 10
        while len(server.lines) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        new = server.lines[before:]
        assert len(new) == 1, (name, new)
        m = re.fullmatch(r"WARNING albor\.serve: \S+:\d+ (\S+) (\S+) (\d{3}) (.+)\n", new[0])
        assert m and int(m.group(3)) == status, (name, new)
        sent = re.match(rb"([A-Z]+) (/\S*) HTTP/1\.1\r\n", raw)
        if sent:  # the request line parses: the log names its method and path
            assert m.group(1, 2) == (sent.group(1).decode(), sent.group(2).decode()), new
    assert "Traceback" not in server.stderr
    # A chunked body under the cap is fine, and the server is still healthy after all of that.
    raw = request_bytes(
        chunked(b'{"prompt": "x", ', b'"max_tokens": 2}'), extra="Transfer-Encoding: chunked\r\n"
    )
    status, _, body = exchange(server, raw)
    assert status == 200 and body["usage"]["completion_tokens"] <= 2
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
        and all(r[1]["retry-after"] == "1" and r[2]["error"]["code"] == "server_busy" for r in busy)
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


class InThread:
    """`create_server` + `serve` in a thread of this process; `stop` as `run` does on a signal."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.serve)
        self.thread.start()
        parts = urlsplit(server.url)
        self.host, self.port = str(parts.hostname), int(parts.port or 0)

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=60)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def test_serves_on_ipv6(engine: Any) -> None:
    try:
        server = create_server(engine, host="::1", port=0)
    except ConfigError:
        pytest.skip("this machine has no IPv6 loopback")  # not albor's to provide
    running = InThread(server)
    try:
        assert server.url.startswith("http://[::1]:")
        conn = running.conn()
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    finally:
        running.stop()


def test_stop_refuses_the_queued_request_and_finishes_the_running_one(engine: Any) -> None:
    running = InThread(create_server(engine, port=0, limits=Limits(max_queue=2)))
    try:
        conn = running.conn()
        req = {"prompt": ["import ", "def "] * 4, "n": 4, "max_tokens": 100, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps({**req, "seed": 1}))
        stream = events(conn.getresponse())
        first = next(stream)
        queued: list[tuple[int, Any]] = []

        def wait_in_queue() -> None:
            c = running.conn()
            c.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 2}))
            resp = c.getresponse()
            queued.append((resp.status, json.loads(resp.read())))

        waiter = threading.Thread(target=wait_in_queue)
        waiter.start()
        while True:  # until the second request waits behind the first
            c = running.conn()
            c.request("GET", "/health")
            health = json.loads(c.getresponse().read())
            if health["queued"] == 1:
                break
            assert health["busy"], "the first request ended before the second was queued"
        running.server.stop()
        waiter.join(timeout=60)
        ((status, body),) = queued
        assert status == 503 and body["error"]["code"] == "server_busy"
        assert "shutting down" in body["error"]["message"]
        rest = [first, *stream]
        assert rest[-1] == "[DONE]"
        finished = [c["choices"][0] for c in rest[:-1] if c["choices"][0]["finish_reason"]]
        assert sorted(c["index"] for c in finished) == list(range(32))
    finally:
        running.stop()


def test_a_stalled_body_gets_408_and_a_silent_client_is_dropped(
    engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    running = InThread(create_server(engine, port=0, limits=Limits(timeout_s=1)))
    try:
        with socket.create_connection((running.host, running.port), timeout=30) as s:
            t0 = time.monotonic()
            assert s.recv(100) == b""  # the server hung up on a client that said nothing
            assert 0.5 < time.monotonic() - t0 < 20
        raw = request_bytes(b'{"prompt": "never fin', extra="Content-Length: 60\r\n")
        status, headers, body = exchange(running, raw)
        assert status == 408 and body["error"]["code"] == "timeout"
        assert headers["connection"] == "close"
    finally:
        running.stop()
    refused = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(refused) == 1 and " POST /v1/completions 408 the body stalled" in refused[0]
    assert not any(r.exc_info for r in caplog.records)
