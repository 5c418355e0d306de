"""An OpenAI-compatible completion server on the standard library (`albor serve MODEL`).

    POST /v1/completions   prompt (string or list), suffix (fill-in-the-middle), max_tokens,
                           temperature, top_p, top_k, stop, n, stream (server-sent events), seed,
                           echo, stream_options.include_usage
    GET  /v1/models        the one model served
    GET  /health           liveness and queue depth (no API key needed)

Editor plugins and the `openai` client speak this API; `suffix` makes a request an infilling one,
in albor's FIM layout. One worker thread owns the model and runs one request at a time (the
prompts and `n` samples of a request are generated as one batch); other requests wait in a
bounded queue and get a 503 when it is full, so load never grows memory or threads without
bound. Every request is checked before it reaches the model: body size (413), JSON shape, types
and unknown fields (400), prompt tokens + max_tokens against the context (400), max_tokens and n
caps (400), the Bearer API key (401). Errors are OpenAI-style JSON:
`{"error": {"message", "type", "param", "code"}}`. SIGINT / SIGTERM stop accepting requests,
finish the running one, answer the queued ones 503 and return.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from albor.data.fim import Mode
from albor.errors import AlborError, ConfigError
from albor.infer.engine import (
    Backend,
    Delta,
    Sampling,
    make_prompt,
    prompt_tokens,
    stream_completions,
)

log = logging.getLogger("albor.serve")

MAX_STOPS = 4  # as OpenAI's API
_DRAIN_BYTES = 1 << 16


def is_loopback(host: str) -> bool:
    """True when `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much may wait."""

    max_body_bytes: int = 1 << 20
    max_tokens: int | None = None
    """Cap on max_tokens (default: the model's context)."""
    default_max_tokens: int = 16
    """max_tokens when a request leaves it out (OpenAI's default)."""
    max_n: int = 8
    max_prompts: int = 16
    max_batch: int = 32
    """Prompts x n generated together in one request, at most."""
    max_queue: int = 16
    """Requests waiting for the model beyond the one running; more get a 503."""
    timeout_s: float = 30.0
    """A client that sends nothing for this long is disconnected."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "default_max_tokens", "max_n", "max_prompts", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server limit {name} must be at least 1")
        if self.max_queue < 1:
            raise ConfigError("server limit max_queue must be at least 1")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(False, description="Send a last chunk with the token usage.")


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions (OpenAI's fields; `top_k` as llama.cpp's server)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="Any name; the server has one model.")
    prompt: str | list[str] = Field(description="Text to complete, or several.")
    suffix: str | None = Field(None, description="Text after the gap: fill in the middle.")
    max_tokens: int | None = Field(None, ge=0, description="Most tokens to generate per choice.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=1, description="Sample among the k likeliest tokens.")
    n: int = Field(1, ge=1, description="Choices per prompt.")
    stream: bool = Field(False, description="Send text as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="include_usage.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    seed: int | None = Field(None, description="Seed for reproducible sampling.")
    echo: bool = Field(False, description="Put the prompt before each completion.")
    user: str | None = Field(None, description="Ignored.")
    # Accepted at their neutral values only, because clients send them by default.
    logprobs: int | None = Field(None, description="Not supported: null only.")
    best_of: int | None = Field(None, description="Not supported: null or n.")
    presence_penalty: float = Field(0.0, description="Not supported: 0 only.")
    frequency_penalty: float = Field(0.0, description="Not supported: 0 only.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: empty only.")


_TYPES = {
    "prompt": "a string or a list of strings",
    "stop": "a string, a list of strings or null",
    "stream_options": 'an object like {"include_usage": true}',
    "logit_bias": "an object of token id -> bias",
}


class RequestError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        self.headers = headers or {}


def parse_request(body: bytes) -> CompletionRequest:
    """The validated request, or a RequestError (400) naming the field and what it should be."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise RequestError(400, "the body must be a JSON object", code="invalid_json")
    try:
        req = CompletionRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            known = ", ".join(CompletionRequest.model_fields)
            msg = f"unknown field {param!r} (fields: {known})"
            raise RequestError(400, msg, param=param, code="unknown_field") from e
        if err["type"] == "missing":
            raise RequestError(400, f"{param} is required", param=param) from e
        if param in _TYPES and len(err["loc"]) > 1 and err["loc"][1] in ("str", "list[str]"):
            msg = f"{param} must be {_TYPES[param]}"
        else:
            where = ".".join(str(x) for x in err["loc"])
            msg = f"{where}: {err['msg']}"
        raise RequestError(400, msg, param=param, code="invalid_value") from e
    unsupported = {
        "logprobs": req.logprobs is not None,
        "best_of": req.best_of not in (None, req.n),
        "presence_penalty": req.presence_penalty != 0,
        "frequency_penalty": req.frequency_penalty != 0,
        "logit_bias": bool(req.logit_bias),
    }
    for name, bad in unsupported.items():
        if bad:
            raise RequestError(400, f"{name} is not supported by this server", param=name)
    return req


@dataclass
class Job:
    """A validated request on its way through the queue; the worker answers through `events`."""

    request: CompletionRequest
    prompts: list[str]
    stops: list[str]
    max_tokens: int
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    answered: bool = False
    """Set by the handler once it has read the worker's last event ("end" or "error")."""

    def next_event(self) -> tuple[str, Any]:
        kind, payload = self.events.get()
        if kind in ("end", "error"):
            self.answered = True
        return kind, payload


class CompletionService:
    """The model behind the HTTP layer: request checks that need no model, the bounded queue,
    and the worker thread that owns the model."""

    def __init__(self, backend: Backend, limits: Limits, *, fim_mode: Mode, heal: bool) -> None:
        self.backend = backend
        self.limits = limits
        self.fim_mode = fim_mode
        self.heal = heal
        self.created = int(time.time())
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=limits.max_queue)
        self.busy = False
        self.stopping = threading.Event()
        self._worker = threading.Thread(target=self._work, name="albor-generate", daemon=True)
        self._worker.start()

    @property
    def max_tokens_cap(self) -> int:
        return min(self.limits.max_tokens or self.backend.n_ctx, self.backend.n_ctx)

    def submit(self, req: CompletionRequest) -> Job:
        """Check what can be checked without the model and queue the request (503 when full)."""
        lim = self.limits
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise RequestError(400, "prompt is an empty list: give at least one", param="prompt")
        if len(prompts) > lim.max_prompts:
            raise RequestError(
                400, f"{len(prompts)} prompts; this server takes {lim.max_prompts}", param="prompt"
            )
        if req.n > lim.max_n:
            raise RequestError(
                400, f"n is {req.n}; this server allows up to {lim.max_n}", param="n"
            )
        if len(prompts) * req.n > lim.max_batch:
            raise RequestError(
                400,
                f"{len(prompts)} prompts x n {req.n} = {len(prompts) * req.n} completions; "
                f"this server makes at most {lim.max_batch} per request",
                param="n",
            )
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise RequestError(400, f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
        max_tokens = lim.default_max_tokens if req.max_tokens is None else req.max_tokens
        if max_tokens > self.max_tokens_cap:
            raise RequestError(
                400,
                f"max_tokens is {max_tokens}; this server allows up to {self.max_tokens_cap}",
                param="max_tokens",
            )
        if self.stopping.is_set():
            raise _unavailable("the server is shutting down")
        job = Job(req, prompts, stops, max_tokens)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise _unavailable(
                f"the server is busy ({self.queue.maxsize} requests waiting): retry shortly"
            ) from None
        return job

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.stopping.is_set():
                job.events.put(("error", _unavailable("the server is shutting down")))
                continue
            self.busy = True
            try:
                self._run(job)
            except RequestError as e:
                job.events.put(("error", e))
            except AlborError as e:
                job.events.put(("error", RequestError(400, str(e))))
            except Exception as e:  # a bug must not take the worker down with it
                log.exception("generation failed")
                job.events.put(
                    ("error", RequestError(500, f"internal error: {e}", kind="server_error"))
                )
            finally:
                self.busy = False

    def _run(self, job: Job) -> None:
        req, backend = job.request, self.backend
        heal = self.heal and job.max_tokens > 0
        prompts = []
        for i, text in enumerate(job.prompts):
            p = make_prompt(backend, text, req.suffix, fim_mode=self.fim_mode, heal=heal)
            used = prompt_tokens(p)
            if used + job.max_tokens > backend.n_ctx:
                which = "prompt" if len(job.prompts) == 1 else f"prompt {i}"
                raise RequestError(
                    400,
                    f"{which} has {used} tokens and max_tokens is {job.max_tokens}: together "
                    f"{used + job.max_tokens}, more than the model's context of "
                    f"{backend.n_ctx} tokens; shorten the prompt or lower max_tokens",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            prompts += [p] * req.n
        sampling = Sampling(
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p if req.top_p < 1 else None,
            seed=req.seed,
        )
        usage = {
            "prompt_tokens": sum(prompt_tokens(p) for p in prompts[:: req.n]),
            "completion_tokens": 0,
        }
        job.events.put(("start", None))
        deltas = stream_completions(
            backend, prompts, max_new_tokens=job.max_tokens, sampling=sampling, stop=job.stops
        )
        try:
            for d in deltas:
                if job.cancelled.is_set():
                    break  # the client left: stop generating, still close the job below
                if d.finish_reason is not None:
                    usage["completion_tokens"] += d.completion_tokens
                job.events.put(("delta", d))
        finally:
            deltas.close()
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        job.events.put(("end", usage))

    def stop(self) -> None:
        """Refuse new requests, answer the queued ones 503, let the running one finish."""
        self.stopping.set()
        while True:
            try:
                self.queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._worker.join()


def _unavailable(message: str) -> RequestError:
    return RequestError(
        503, message, kind="server_error", code="server_busy", headers={"Retry-After": "1"}
    )


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; JSON in and out; the service does the work."""

    protocol_version = "HTTP/1.1"
    server_version = "albor"
    service: CompletionService
    api_key: str | None
    inflight: Inflight

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    # -- plumbing ---------------------------------------------------------------------------

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: RequestError) -> None:
        self._send_json(e.status, e.body, e.headers)

    def _authorized(self) -> bool:
        if self.api_key is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        routes: dict[str, dict[str, Callable[[], None]]] = {
            "/health": {"GET": self._health},
            "/v1/models": {"GET": self._models},
            "/v1/completions": {"POST": self._completions},
        }
        with self.inflight:
            try:
                if path not in routes:
                    raise RequestError(
                        404, f"no route {path}: use /v1/completions", code="not_found"
                    )
                if method not in routes[path]:
                    allowed = ", ".join(routes[path])
                    raise RequestError(
                        405,
                        f"{method} {path} is not allowed (use {allowed})",
                        headers={"Allow": allowed},
                    )
                if path != "/health" and not self._authorized():
                    raise RequestError(
                        401,
                        "missing or wrong API key: send the header Authorization: Bearer KEY",
                        code="invalid_api_key",
                    )
                routes[path][method]()
            except RequestError as e:
                self._send_error(e)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client left

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    # -- endpoints --------------------------------------------------------------------------

    def _health(self) -> None:
        s = self.service
        if s.stopping.is_set():
            self._send_json(503, {"status": "shutting down"})
            return
        self._send_json(
            200,
            {"status": "ok", "model": s.backend.name, "busy": s.busy, "queued": s.queue.qsize()},
        )

    def _models(self) -> None:
        s = self.service
        model = {
            "id": s.backend.name,
            "object": "model",
            "created": s.created,
            "owned_by": "albor",
            "context_length": s.backend.n_ctx,
        }
        self._send_json(200, {"object": "list", "data": [model]})

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(411, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"Content-Length {length!r} is not a number") from None
        limit = self.service.limits.max_body_bytes
        if size > limit:
            # Read a little of the body so that the client, still sending, sees the answer
            # rather than a reset; the rest is never read and the connection closes.
            self.rfile.read(min(size, _DRAIN_BYTES))
            self.close_connection = True
            raise RequestError(
                413,
                f"the body is {size} bytes; this server takes up to {limit}",
                code="body_too_large",
            )
        return self.rfile.read(size)

    def _completions(self) -> None:
        req = parse_request(self._read_body())
        job = self.service.submit(req)
        kind, payload = job.next_event()
        if kind == "error":
            raise payload
        meta = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.service.backend.name,
        }
        try:
            if req.stream:
                self._stream(job, meta)
            else:
                self._collect(job, meta)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            job.cancelled.set()
            self.close_connection = True
            while not job.answered:  # let the worker finish with this job before leaving
                job.next_event()

    def _events(self, job: Job) -> Iterator[tuple[str, Any]]:
        while not job.answered:
            yield job.next_event()

    def _echo(self, job: Job, row: int) -> str:
        return job.prompts[row // job.request.n] if job.request.echo else ""

    def _collect(self, job: Job, meta: dict[str, Any]) -> None:
        rows = len(job.prompts) * job.request.n
        texts = [self._echo(job, r) for r in range(rows)]
        reasons: list[str | None] = [None] * rows
        for kind, payload in self._events(job):
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
                self._send_json(200, {**meta, "choices": choices, "usage": payload})

    def _stream(self, job: Job, meta: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True  # the stream ends when the connection does

        def send(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        if job.request.echo:
            for row in range(len(job.prompts) * job.request.n):
                send(self._chunk(meta, row, self._echo(job, row), None))
        for kind, payload in self._events(job):
            if kind == "delta":
                send(self._chunk(meta, payload.row, payload.text, payload.finish_reason))
            elif kind == "error":  # after the headers: report in the stream
                send(payload.body)
            elif kind == "end":
                opts = job.request.stream_options
                if opts is not None and opts.include_usage:
                    send({**meta, "choices": [], "usage": payload})
        send("[DONE]")

    @staticmethod
    def _chunk(meta: dict[str, Any], row: int, text: str, reason: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": row, "logprobs": None, "finish_reason": reason}
        return {**meta, "choices": [choice]}


class Inflight:
    """Counts requests being answered, so shutdown can wait for them to finish."""

    def __init__(self) -> None:
        self._n = 0
        self._cond = threading.Condition()

    def __enter__(self) -> None:
        with self._cond:
            self._n += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._n -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._n == 0, timeout)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not hold up the exit
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that resets or times out is routine; anything else is logged, not printed."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("connection from %s ended: %s", client_address, exc)
        else:
            log.exception("error while answering %s", client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


@dataclass
class Server:
    """A bound server: `url` to tell the user, `serve_forever` until `shutdown`."""

    httpd: _Server
    service: CompletionService
    inflight: Inflight

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def shutdown(self, grace_s: float = 60.0) -> None:
        """Stop accepting, finish the running request, refuse the queued ones, close."""
        self.service.stop()
        self.inflight.wait_idle(grace_s)
        self.httpd.server_close()


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
    """Bind `host:port` (0: any free port) and start the generation worker."""
    limits = limits or Limits()
    backend.token_texts()  # token healing's table, built now rather than in the first request
    service = CompletionService(backend, limits, fim_mode=fim_mode, heal=heal)
    inflight = Inflight()
    handler = type(
        "BoundHandler",
        (Handler,),
        {
            "service": service,
            "api_key": api_key or None,
            "inflight": inflight,
            "timeout": limits.timeout_s,
        },
    )
    cls = _Server6 if ":" in host else _Server
    try:
        httpd = cls((host, port), handler)
    except OSError as e:
        service.stop()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return Server(httpd, service, inflight)


def run(server: Server, on_stop: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (see `Server.shutdown`)."""
    stopped = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        if stopped.is_set():
            return
        stopped.set()
        if on_stop is not None:
            on_stop(signal.Signals(signum).name)
        # shutdown() waits for serve_forever to return: it must run off this (its) thread.
        threading.Thread(target=server.httpd.shutdown, daemon=True).start()

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handle)
    try:
        server.serve_forever()
    finally:
        server.shutdown()
        for sig, h in old.items():
            signal.signal(sig, h)
