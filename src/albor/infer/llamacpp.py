"""GGUF models through llama.cpp (llama-cpp-python): tokens in, logits and tokens out.

`LlamaCppModel` is the small surface the engine, the server, the benchmarks and the export parity
check need from a GGUF file: tokenize / detokenize exactly as the file's vocabulary does, the
logits after a sequence, and a token stream with the same greedy / temperature / top-k / top-p
rules as albor's own engine (`albor.infer.engine.next_token`), so that a GGUF model and a
checkpoint are driven the same way.

llama.cpp keeps one sequence in its KV cache. Every call states its whole sequence and the cache
keeps the longest prefix it shares with the previous call, so calls may interleave (two streams,
a parity check between steps) and stay correct; only the differing tail is recomputed. An
instance is not thread-safe: callers serialise access.

    with LlamaCppModel(Path("model-q8_0.gguf"), n_threads=2) as m:
        ids = m.tokenize("def add(a, b):")
        text = m.detokenize(list(m.generate(ids, max_new_tokens=16)))
"""

from __future__ import annotations

import ctypes
import functools
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from albor.errors import ArtifactError, ConfigError
from albor.model.gguf import quiet_native_stderr, require_llama_cpp

GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: Path) -> None:
    """ArtifactError unless `path` is a readable file starting with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: GGUF file not found") from None
    except IsADirectoryError:
        raise ArtifactError(
            f"{path} is a directory: give the .gguf file itself (e.g. {path}/model-f16.gguf)"
        ) from None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read: {e}") from e
    if magic != GGUF_MAGIC:
        raise ArtifactError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}): export "
            "one with `albor export apply`"
        )


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature {temperature} is negative: use 0 for greedy or > 0")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k {top_k} must be at least 1 (or unset)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p {top_p} must be in (0, 1] (or unset)")


def pick_token(
    logits: np.ndarray,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
) -> int:
    """The next token from one position's logits: argmax at temperature 0, else a sample after
    the top-k and top-p cuts, with the same rules as `albor.infer.engine.next_token`."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    if top_p is not None and top_p < 1:
        order = np.argsort(-z, kind="stable")
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        # Drop a token when the tokens ranked above it already reach top_p; the first stays.
        drop = (np.cumsum(p) - p) >= top_p
        z[order[drop]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    rng = rng or np.random.default_rng()
    return int(rng.choice(p.shape[-1], p=p))


@functools.cache
def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU has Intel AMX (Sapphire Rapids and later), from its Linux `flags` line;
    False where that cannot be read. Read once per file: every GGUF load asks."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return "amx_int8" in line.split(":", 1)[-1].split()
    return False


_PARAMS_LOCK = threading.Lock()


@contextmanager
def _model_params(llama_cpp: Any, **fields: Any) -> Iterator[None]:
    """Inside the block, `llama_cpp.Llama(...)` loads with these `llama_model_params` fields set
    (the ones its constructor has no argument for); fields this llama-cpp-python lacks are
    skipped. Its constructor starts from `llama_model_default_params()`, wrapped here for the
    block, under a lock so that concurrent loads do not see each other's wrapper."""
    module = llama_cpp.llama_cpp
    known = {name for name, *_ in module.llama_model_params._fields_}
    fields = {k: v for k, v in fields.items() if k in known}
    if not fields:
        yield
        return
    with _PARAMS_LOCK:
        default = module.llama_model_default_params

        def params() -> Any:
            p = default()
            for key, value in fields.items():
                setattr(p, key, value)
            return p

        module.llama_model_default_params = params
        try:
            yield
        finally:
            module.llama_model_default_params = default


def load_settings() -> dict[str, Any]:
    """The `llama_model_params` albor sets on this machine: on CPUs with AMX, no extra buffer
    types, so that quantized weights stay in the plain CPU buffers. llama.cpp's AMX buffer
    type crashes the process (SIGSEGV in `ggml_backend_amx_mul_mat`, llama.cpp issue 20824,
    seen with llama-cpp-python 0.3.36 on Q8_0 and Q4_K_M) at the first decode; without it the
    CPU's AVX-512 kernels run the same types. Elsewhere nothing changes (CPU weight repacking,
    where llama.cpp has one for the CPU, stays on)."""
    return {"use_extra_bufts": False} if cpu_has_amx() else {}


class LlamaCppModel:
    """A GGUF file loaded in llama.cpp.

    `n_ctx` defaults to the context the model was trained with (`llama.context_length`) and is
    never more: positions past it were never trained. `logits_all` keeps the logits of every
    position (needed by `logits`), at n_ctx x n_vocab floats of memory.
    """

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        logits_all: bool = False,
    ) -> None:
        llama_cpp = require_llama_cpp()
        self.path = Path(path)
        check_gguf_file(self.path)
        if n_ctx is not None and n_ctx < 1:
            raise ConfigError(f"n_ctx {n_ctx} must be at least 1 (or unset for the model's)")
        if n_threads is not None and n_threads < 1:
            raise ConfigError(f"n_threads {n_threads} must be at least 1 (or unset)")
        self._lib = llama_cpp
        self.logits_all = logits_all
        try:
            # llama.cpp reports on stderr even when asked not to (e.g. a context rounded up).
            with quiet_native_stderr(), _model_params(llama_cpp, **load_settings()):
                self._llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=n_ctx or 0,
                    n_batch=min(512, n_ctx) if n_ctx else 512,
                    n_threads=n_threads,
                    n_threads_batch=n_threads,
                    logits_all=logits_all,
                    verbose=False,
                )
        except ValueError as e:
            raise ArtifactError(
                f"llama.cpp could not load {self.path}: {e} (a GGUF of an architecture or "
                "type this llama-cpp-python does not know? upgrade it with pip install -U "
                "llama-cpp-python)"
            ) from e
        # Free the native model at exit while the interpreter still works, not in __del__.
        self._finalizer = weakref.finalize(self, self._llm.close)
        trained = int(llama_cpp.llama_model_n_ctx_train(self._llm.model))
        self.n_ctx: int = min(int(self._llm.n_ctx()), trained or int(self._llm.n_ctx()))
        if n_ctx is not None:
            self.n_ctx = min(self.n_ctx, n_ctx)
        self.n_vocab: int = int(self._llm.n_vocab())
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the model and its context now (also done at exit)."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def metadata(self) -> dict[str, str]:
        """The file's metadata as llama.cpp read it (key -> value as text)."""
        return dict(self._llm.metadata)

    # -- text ----------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of `text`; no BOS is ever added. With `special`, spellings of control
        tokens (such as `<|fim_prefix|>`) become those tokens, as HF tokenizers does by default;
        without, they are plain text."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def _piece(self, token: int, special: bool) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_token_to_piece(self._vocab, int(token), buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # the piece needs -n bytes: grow and ask again

    def detokenize(self, ids: Sequence[int], *, special: bool = True) -> str:
        """The text of `ids`, with control tokens spelled out unless `special` is false. Bytes
        that do not form UTF-8 become U+FFFD, as HF tokenizers' byte-level decoder does."""
        data = b"".join(self._piece(i, special) for i in ids)
        return data.decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int | None:
        """The id of the single token spelled `token` (e.g. "<|fim_prefix|>"), or None."""
        ids = self.tokenize(token, special=True)
        if len(ids) == 1 and self.detokenize(ids) == token:
            return ids[0]
        return None

    # -- logits --------------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        seq = [int(i) for i in ids]
        if not seq:
            raise ConfigError("llama.cpp needs at least one token")
        if len(seq) > self.n_ctx:
            raise ConfigError(
                f"{len(seq)} tokens exceed the context of {self.n_ctx}: shorten the prompt"
            )
        bad = [i for i in seq if not 0 <= i < self.n_vocab]
        if bad:
            raise ConfigError(
                f"token ids {bad[:5]} are outside the vocabulary (0..{self.n_vocab - 1})"
            )
        return seq

    def _evaluate(self, seq: list[int]) -> None:
        """Bring the KV cache to `seq`: keep the prefix it already holds, run the rest."""
        llm = self._llm
        cached = np.asarray(llm.input_ids[: llm.n_tokens])
        n = min(len(cached), len(seq))
        differ = np.flatnonzero(cached[:n] != np.asarray(seq[:n], dtype=cached.dtype))
        common = int(differ[0]) if differ.size else n
        common = min(common, len(seq) - 1)  # the last token must run to give its logits
        llm.n_tokens = common
        llm.eval(seq[common:])

    def next_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (n_vocab,) float32 of the token after `ids`."""
        seq = self._check_ids(ids)
        self._evaluate(seq)
        ptr = self._lib.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (len(ids), n_vocab) float32 after each prefix of `ids` (needs logits_all)."""
        if not self.logits_all:
            raise ConfigError("logits of every position need LlamaCppModel(..., logits_all=True)")
        seq = self._check_ids(ids)
        self._evaluate(seq)
        return np.array(self._llm.scores[: len(seq)], dtype=np.float32)

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self,
        ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> Iterator[int]:
        """Stream up to `max_new_tokens` new token ids continuing `ids`.

        A prompt longer than the context keeps its last `n_ctx` tokens; generation ends when the
        context is full or at a stop token (not yielded). With `seed`, sampling is reproducible.
        """
        _check_sampling(temperature, top_k, top_p)
        if not ids:
            raise ConfigError("generate needs at least one prompt token")
        prompt = self._check_ids(list(ids)[-self.n_ctx :])
        # Checks above run at call time; the stream below starts on the first next().
        return self._stream(
            prompt, max_new_tokens, temperature, top_k, top_p, seed, set(stop_token_ids)
        )

    def _stream(
        self,
        seq: list[int],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        seed: int | None,
        stops: set[int],
    ) -> Iterator[int]:
        rng = np.random.default_rng(seed)
        for _ in range(max(0, max_new_tokens)):
            token = pick_token(
                self.next_logits(seq), temperature=temperature, top_k=top_k, top_p=top_p, rng=rng
            )
            if token in stops:
                return
            yield token
            seq.append(token)
            if len(seq) >= self.n_ctx:
                return

    def __repr__(self) -> str:
        return f"LlamaCppModel({str(self.path)!r}, n_ctx={self.n_ctx}, n_vocab={self.n_vocab})"
