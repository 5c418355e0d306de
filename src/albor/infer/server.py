"""An OpenAI-compatible completion server on uvicorn and starlette (`albor serve MODEL`).

    POST /v1/completions   prompt (string or list), suffix (fill-in-the-middle), max_tokens,
                           temperature, top_p, top_k, stop, n, stream (server-sent events), seed,
                           echo, stream_options.include_usage
    GET  /v1/models        the one model served
    GET  /health           liveness and queue depth (no API key needed)

Editor plugins and the `openai` client speak this API; `suffix` makes a request an infilling one,
in albor's FIM layout. The model, its worker thread and the bounded queue are
`albor.infer.api.CompletionService`; this module is the HTTP side. Every request is checked
before it reaches the model: body size (413, counted while the body streams in, so a large one
is never held), a missing length (411), a stalled body (408), UTF-8, JSON, lone surrogates,
types and unknown fields (400), prompt tokens + max_tokens against the context (400), max_tokens
and n caps (400), the Bearer API key (401), the route (404) and method (405). Every refusal,
down to bytes that are not HTTP at all, is OpenAI-style JSON
`{"error": {"message", "type", "param", "code"}}` and one log line (client, method, path, status,
reason), never a traceback. SIGINT / SIGTERM stop accepting requests, answer the queued ones
503, finish the running one and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from albor.data.fim import Mode
from albor.errors import ConfigError
from albor.infer.api import CompletionService, Job, Limits, RequestError, parse_request
from albor.infer.completion import Delta
from albor.infer.engine import Backend

log = logging.getLogger("albor.serve")

_REASON = "albor.reason"  # scope key: why a request was refused, for its log line
_CLOSE = {"Connection": "close"}
_GRACE_S = 60  # how long a shutdown waits for the running request
_HEAD_KEPT = 512
_REQUEST_LINE = re.compile(rb"([A-Za-z]{1,20}) (/[!-~]{0,400}) HTTP/")


def is_loopback(host: str) -> bool:
    """True when `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _one_line(text: str) -> str:
    """`text` safe for one log line: a path or a field name can carry a newline."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _address(peer: Any) -> str:
    return f"{peer[0]}:{peer[1]}" if peer else "-"


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    # json.dumps escapes to ASCII, so an error that quotes a client's odd text still encodes.
    return Response(json.dumps(body), status, headers, media_type="application/json")


def _refuse(request: Request, e: RequestError) -> Response:
    request.scope[_REASON] = e.message
    return _json(e.status, e.body, e.headers)


async def _read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused as soon as it is known to be over the cap (413) or stalls (408)."""
    length = request.headers.get("content-length")
    if length is None and "transfer-encoding" not in request.headers:
        # Without either, HTTP/1.1 says the body is empty and whatever follows is a new request.
        raise RequestError(
            411, "a Content-Length header is required (or chunked transfer)", headers=_CLOSE
        )
    limit = limits.max_body_bytes
    # h11 has checked that Content-Length is digits; a 5000-digit one is over any cap.
    if length is not None and (len(length) > 18 or int(length) > limit):
        raise RequestError(
            413,
            f"the body is {length} bytes; this server takes up to {limit}",
            code="body_too_large",
        )
    body = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(limits.timeout_s):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return bytes(body)
        except TimeoutError:
            raise RequestError(
                408, f"the body stalled for {limits.timeout_s:g} s", code="timeout", headers=_CLOSE
            ) from None
        except ClientDisconnect:
            raise RequestError(
                400, "the client left while sending the body", code="client_disconnected"
            ) from None
        body += chunk
        if len(body) > limit:
            raise RequestError(
                413, f"the body is over {limit} bytes, this server's limit", code="body_too_large"
            )


def _chunk(meta: dict[str, Any], row: int, text: str, reason: str | None) -> dict[str, Any]:
    choice = {"text": text, "index": row, "logprobs": None, "finish_reason": reason}
    return {**meta, "choices": [choice]}


def _sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


Events = asyncio.Queue[tuple[str, Any]]


async def _collect(job: Job, events: Events, meta: dict[str, Any]) -> dict[str, Any]:
    req = job.request
    rows = len(job.prompts) * req.n
    texts = [job.prompts[r // req.n] if req.echo else "" for r in range(rows)]
    reasons: list[str | None] = [None] * rows
    while True:
        kind, payload = await events.get()
        if kind == "error":
            raise payload
        if kind == "delta":
            d: Delta = payload
            texts[d.row] += d.text
            reasons[d.row] = d.finish_reason or reasons[d.row]
        if kind == "end":
            choices = [
                {"text": t, "index": i, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]
            return {**meta, "choices": choices, "usage": payload}


async def _stream(job: Job, events: Events, meta: dict[str, Any]) -> AsyncIterator[bytes]:
    req = job.request
    try:
        if req.echo:
            for row in range(len(job.prompts) * req.n):
                yield _sse(_chunk(meta, row, job.prompts[row // req.n], None))
        while True:
            kind, payload = await events.get()
            if kind == "delta":
                yield _sse(_chunk(meta, payload.row, payload.text, payload.finish_reason))
            elif kind == "error":  # after the headers: report in the stream
                yield _sse(payload.body)
                break
            elif kind == "end":
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield _sse({**meta, "choices": [], "usage": payload})
                break
        yield _sse("[DONE]")
    finally:
        job.cancelled.set()  # a client that leaves mid-stream stops the generation


def create_app(service: CompletionService, api_key: str | None = None) -> ASGIApp:
    """The ASGI app: routes, checks and JSON errors, wrapped in the one-line request log."""

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not (
            scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip().encode(), api_key.encode())
        ):
            raise RequestError(
                401,
                "missing or wrong API key: send the header Authorization: Bearer KEY",
                code="invalid_api_key",
            )

    async def health(request: Request) -> Response:
        if service.stopping.is_set():
            return _json(503, {"status": "shutting down"})
        busy, queued = service.busy, service.queue.qsize()
        return _json(
            200, {"status": "ok", "model": service.backend.name, "busy": busy, "queued": queued}
        )

    async def models(request: Request) -> Response:
        authorize(request)
        model = {
            "id": service.backend.name,
            "object": "model",
            "created": service.created,
            "owned_by": "albor",
            "context_length": service.backend.n_ctx,
        }
        return _json(200, {"object": "list", "data": [model]})

    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse_request(await _read_body(request, service.limits))
        loop = asyncio.get_running_loop()
        events: Events = asyncio.Queue()

        def post(kind: str, payload: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = service.submit(req, post)
        try:
            kind, payload = await events.get()
            if kind == "error":
                raise payload
            meta = {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": service.backend.name,
            }
            if req.stream:
                headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                return StreamingResponse(_stream(job, events, meta), headers=headers)
            return _json(200, await _collect(job, events, meta))
        except BaseException:
            job.cancelled.set()
            raise

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return _refuse(request, exc)

    async def no_route(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        method, path = request.method, _one_line(request.scope["path"])
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            e = RequestError(
                405, f"{method} {path} is not allowed (use {allowed})", headers={"Allow": allowed}
            )
        elif exc.status_code == 404:
            e = RequestError(404, f"no route {path}: use /v1/completions", code="not_found")
        else:
            e = RequestError(exc.status_code, exc.detail, headers=dict(exc.headers or {}))
        return _refuse(request, e)

    async def bug(request: Request, exc: Exception) -> Response:
        # starlette re-raises after this answer; the request log writes the one line.
        e = RequestError(500, f"internal error: {exc!r}", kind="server_error")
        return _refuse(request, e)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={RequestError: refused, HTTPException: no_route, Exception: bug},
    )
    return _RequestLog(app)


class _RequestLog:
    """One log line per request (a warning when refused), and the last word on a bug: a JSON
    500 and one line rather than uvicorn's traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, sending)
        except Exception as e:
            scope.setdefault(_REASON, f"internal error: {e!r}")
            log.debug("request failed", exc_info=True)
            if not status:
                body = RequestError(500, scope[_REASON], kind="server_error").body
                await _json(500, body)(scope, receive, sending)
        client = _address(scope.get("client"))
        path = scope["raw_path"].decode("ascii", "replace") if scope.get("raw_path") else "-"
        line = f"{client} {_one_line(scope['method'])} {_one_line(path)} {status}"
        if not 0 < status < 400 or _REASON in scope:  # a stream can fail after its 200
            phrase = HTTPStatus(status).phrase if status else "no answer"
            log.warning("%s %s", line, _one_line(scope.get(_REASON, phrase)))
        else:
            log.info("%s %.0f ms", line, (time.perf_counter() - t0) * 1000)


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol, with two changes: bytes that are not HTTP get a JSON 4xx and one
    log line, and a client that connects (or starts a request head) and then sends nothing is
    dropped after the keep-alive timeout instead of being held forever.

    h11 rather than httptools: it hands unknown methods to the app (a JSON 405, where llhttp
    refuses them as unparseable), and it is uvicorn's own dependency."""

    _head = b""
    """The start of the request head being received, to name its method and path in the log
    line when h11 refuses the rest."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting:
            self._head = (self._head + data)[:_HEAD_KEPT]
        super().data_received(data)
        if self.cycle is None or self.cycle.response_complete:
            self._arm_idle_timer()  # half a request head waits for the rest, not forever
        else:
            self._head = b""

    def _arm_idle_timer(self) -> None:
        if self.timeout_keep_alive_task is None and not self.transport.is_closing():
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def send_400_response(self, msg: str) -> None:
        exc = sys.exc_info()[1]  # uvicorn calls this while it handles h11's parse error
        status, reason = 400, msg
        if isinstance(exc, h11.RemoteProtocolError):
            reason = f"not a valid HTTP request: {exc}"
            if 400 <= exc.error_status_hint < 500:  # 431: the head is too large
                status = exc.error_status_hint
        line = _REQUEST_LINE.match(self._head)
        method, path = (line.group(1), line.group(2)) if line else (b"-", b"-")
        self._head = b""
        log.warning(
            "%s %s %s %d %s",
            _address(self.client),
            _one_line(method.decode("ascii", "replace")),
            _one_line(path.decode("ascii", "replace")),
            status,
            _one_line(reason),
        )
        body = json.dumps(RequestError(status, reason, code="invalid_http").body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        phrase = HTTPStatus(status).phrase.encode()
        try:
            for event in (
                h11.Response(status_code=status, headers=headers, reason=phrase),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                if data := self.conn.send(event):
                    self.transport.write(data)
        except h11.LocalProtocolError:
            pass  # a response was already under way (a bad chunk after an early 413): just close
        self.transport.close()


class _QuietUvicorn(logging.Filter):
    """uvicorn's (and asyncio's) log: drop what the request log already says, and fold any
    exception into its one line (no traceback in the server's log)."""

    NOISE = (
        "Invalid HTTP request received.",  # _Protocol logs the status and h11's reason
        "Unsupported upgrade request.",
        "No supported WebSocket library detected",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(self.NOISE):
            return False
        if record.exc_info:
            exc = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()}: {exc!r}", None
            record.exc_info = record.exc_text = None
        return True


def _quiet_uvicorn() -> None:
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # no banner: the CLI has one
    # asyncio's logger reports what fails in a protocol callback, with a traceback.
    for name in ("uvicorn.error", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietUvicorn) for f in logger.filters):
            logger.addFilter(_QuietUvicorn())


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # `run` owns SIGINT/SIGTERM: uvicorn's handler re-raises the signal after shutting down,
        # which would end a clean stop in a KeyboardInterrupt.
        yield


class Server:
    """A bound server: `url` to tell the user, `serve` until `stop` (or use `run`)."""

    def __init__(self, sock: socket.socket, service: CompletionService, app: ASGIApp) -> None:
        self.sock = sock
        self.service = service
        config = uvicorn.Config(
            app,
            http=_Protocol,
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,  # _RequestLog writes albor's line
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=math.ceil(service.limits.timeout_s),
            timeout_graceful_shutdown=_GRACE_S,
        )
        self._uvicorn = _Uvicorn(config)

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve(self) -> None:
        """Answer requests until `stop`; then finish the running one and end the worker."""

        async def main() -> None:
            try:
                await self._uvicorn.serve(sockets=[self.sock])
            finally:
                await asyncio.to_thread(self.service.stop)

        asyncio.run(main())

    def stop(self) -> None:
        """Stop accepting and answer the queued requests 503; `serve` returns once the running
        one is done. From any thread, not from a signal handler (`run` takes care of that)."""
        self.service.begin_stop()
        self._uvicorn.should_exit = True


def create_server(
    backend: Backend,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: Limits | None = None,
    fim_mode: Mode = "psm",
    heal: bool = True,
) -> Server:
    """Bind `host:port` (0: any free port; IPv6 when `host` has a colon) and start the
    generation worker."""
    limits = limits or Limits()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # connections made before `serve` wait rather than fail
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    backend.token_texts()  # token healing's table, built now rather than in the first request
    service = CompletionService(backend, limits, fim_mode=fim_mode, heal=heal)
    _quiet_uvicorn()
    return Server(sock, service, create_app(service, api_key or None))


def run(server: Server, on_stop: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (see `Server.stop`)."""
    stopped = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        if stopped.is_set():
            return
        stopped.set()
        if on_stop is not None:
            on_stop(signal.Signals(signum).name)
        # Off this thread: the signal may have interrupted it holding the queue's lock.
        threading.Thread(target=server.stop, daemon=True).start()

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handle)
    try:
        server.serve()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
