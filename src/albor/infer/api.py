"""The completion API behind `albor serve`, without HTTP: request checks and the model's queue.

`parse_request` turns a request body into a validated `CompletionRequest` or a `RequestError`
(status + OpenAI-style error object) that names the field and what it should be. A
`CompletionService` owns the model: one worker thread runs one request at a time (the prompts
and `n` samples of a request as one batch), others wait in a bounded queue, and a full queue is
a 503. The worker answers each `Job` through the `post` callback it came with, so the HTTP layer
(`albor.infer.server`) decides how the answer travels.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from albor.data.fim import Mode
from albor.errors import AlborError, ConfigError
from albor.infer.completion import make_prompt, prompt_tokens, stream_completions
from albor.infer.engine import Backend, Sampling

log = logging.getLogger("albor.serve")

MAX_STOPS = 4  # as OpenAI's API


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
    """A client that sends nothing for this long is disconnected (408 while sending a body)."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "default_max_tokens", "max_n", "max_prompts", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server limit {name} must be at least 1")
        if self.max_queue < 1:
            raise ConfigError("server limit max_queue must be at least 1")
        if self.timeout_s <= 0:
            raise ConfigError("server limit timeout_s must be positive")


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
    # The range a torch generator takes: a larger seed must be a 400, not a failed generation.
    seed: int | None = Field(
        None, ge=-(1 << 63), lt=1 << 64, description="Seed for reproducible sampling."
    )
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
        self.message = message
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        self.headers = headers or {}


def unavailable(message: str) -> RequestError:
    return RequestError(
        503, message, kind="server_error", code="server_busy", headers={"Retry-After": "1"}
    )


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _lone_surrogate(value: Any, where: str) -> tuple[str, str] | None:
    """(where, the character) for the first string under `value` that is not valid Unicode.

    JSON may spell half of a UTF-16 pair ("\\ud800") that no UTF-8 text can hold; the tokenizer
    fails on it deep inside generation, so it is refused here, naming the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return where, value[e.start]
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if found := _lone_surrogate(item, f"{where}[{i}]"):
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{key!r}" if where else repr(key)
            if found := _lone_surrogate(key, inner) or _lone_surrogate(item, inner):
                return found
    return None


def parse_request(body: bytes) -> CompletionRequest:
    """The validated request, or a RequestError (400) naming the field and what it should be."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        msg = f"the body is not valid UTF-8 (byte {body[e.start]:#04x} at offset {e.start})"
        raise RequestError(400, msg, code="invalid_utf8") from e
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"the body is not valid JSON: {e}", code="invalid_json") from e
    except (ValueError, RecursionError) as e:  # NaN, a 5000-digit number, [[[[...]]]]
        raise RequestError(400, f"the body is not usable JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise RequestError(400, "the body must be a JSON object", code="invalid_json")
    for key, value in data.items():
        if found := _lone_surrogate(key, "a field name") or _lone_surrogate(value, key):
            where, char = found
            param = key if isinstance(key, str) and key in CompletionRequest.model_fields else None
            raise RequestError(
                400,
                f"{where} is not valid Unicode: it holds a lone surrogate "
                f"({char.encode('unicode_escape').decode()}); send text as UTF-8",
                param=param,
                code="invalid_unicode",
            )
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


Post = Callable[[str, Any], None]
"""How the worker answers a job: ("start", None), ("delta", Delta)..., then ("end", usage)
or ("error", RequestError). Called on the worker thread; it must not block."""


@dataclass
class Job:
    """A validated request on its way through the queue."""

    request: CompletionRequest
    prompts: list[str]
    stops: list[str]
    max_tokens: int
    post: Post
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when nobody waits for the answer any more: the worker drops or stops the job."""


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

    def submit(self, req: CompletionRequest, post: Post) -> Job:
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
            raise unavailable("the server is shutting down")
        job = Job(req, prompts, stops, max_tokens, post)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise unavailable(
                f"the server is busy ({self.queue.maxsize} requests waiting): retry shortly"
            ) from None
        return job

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue  # its client left while it waited
            if self.stopping.is_set():
                job.post("error", unavailable("the server is shutting down"))
                continue
            self.busy = True
            try:
                self._run(job)
            except RequestError as e:
                job.post("error", e)
            except AlborError as e:
                job.post("error", RequestError(400, str(e)))
            except Exception as e:  # a bug must not take the worker down with it
                log.error("generation failed: %r", e)
                log.debug("generation failed", exc_info=True)
                job.post("error", RequestError(500, f"internal error: {e}", kind="server_error"))
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
        job.post("start", None)
        deltas = stream_completions(
            backend, prompts, max_new_tokens=job.max_tokens, sampling=sampling, stop=job.stops
        )
        try:
            for d in deltas:
                if job.cancelled.is_set():
                    break  # the client left: stop generating
                if d.finish_reason is not None:
                    usage["completion_tokens"] += d.completion_tokens
                job.post("delta", d)
        finally:
            deltas.close()
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        job.post("end", usage)

    def begin_stop(self) -> None:
        """Refuse new requests and answer the queued ones 503 now; the running one goes on.
        Safe from any thread, but not from a signal handler: it takes the queue's lock."""
        self.stopping.set()
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.post("error", unavailable("the server is shutting down"))

    def stop(self) -> None:
        """`begin_stop`, then wait for the running request to finish and the worker to end."""
        self.begin_stop()
        while True:
            try:
                self.queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._worker.join()
