"""One `load(path)` for every model albor can run, returning an engine `Backend`.

- an albor checkpoint dir or a transformers model dir -> `TorchBackend` (the albor decoder in
  torch, on the CPU or a GPU, in float32, bfloat16 or float16); a quantize stage's `int8/` or
  `int4/` dir too, its projections weight-only quantized (`dtype` then sets the activations and
  the full-precision tensors);
- a `.gguf` file -> `GGUFBackend`, run by llama.cpp through llama-cpp-python
  (`albor.infer.llamacpp`);
- a directory holding exactly one of those (an export artifact with one model) -> that model.

Finding and reading the models is `albor.model.load`'s (the one loader serving, evaluation and
export share); this module wraps what it loads in the backends `complete`, `serve` and `bench`
drive.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from albor.data.fim import Mode
from albor.errors import ConfigError
from albor.infer.engine import (
    GREEDY,
    Backend,
    Sampling,
    TorchBackend,
    fim_prompt_ids,
    next_token,
    restrict,
)
from albor.model.load import ModelRef, load_model, load_model_tokenizer, open_gguf, resolve
from albor.model.special_tokens import gguf_special_tokens, model_special_tokens


def load(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    n_ctx: int | None = None,
    n_threads: int | None = None,
) -> Backend:
    """The model at `path` (see the module docstring) ready to generate.

    `dtype` and `device` ("auto", "cpu" or "cuda") apply to torch models; `n_ctx` (default: the
    model's) to GGUF files; `n_threads` sets the CPU threads of either (torch's is process-wide).
    """
    return load_ref(
        resolve(Path(path)), device=device, dtype=dtype, n_ctx=n_ctx, n_threads=n_threads
    )


def load_ref(
    ref: ModelRef,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    n_ctx: int | None = None,
    n_threads: int | None = None,
) -> Backend:
    """Load one found model (see `load`)."""
    if ref.kind == "gguf":
        return GGUFBackend.open(ref.path, n_ctx=n_ctx, n_threads=n_threads)
    return load_torch(ref.path, device=device, dtype=dtype, n_threads=n_threads)


def load_torch(
    directory: Path, *, device: str = "cpu", dtype: str = "float32", n_threads: int | None = None
) -> TorchBackend:
    """An albor or transformers checkpoint dir with its tokenizer files (`tokenizer.json`, and
    the tokenizer_config.json that names its special tokens' roles)."""
    import torch

    if n_threads is not None:
        torch.set_num_threads(n_threads)
    tokenizer = load_model_tokenizer(directory)
    specials = model_special_tokens(tokenizer, directory)
    model, _ = load_model(directory, device=device, dtype=dtype, device_key="--device")
    return TorchBackend(model, tokenizer, name=directory.name, specials=specials)


class GGUFBackend:
    """A GGUF file run by llama.cpp, behind the same interface as the torch engine.

    llama.cpp generates one sequence at a time here, so a batch of prompts runs row after row,
    row r sampled with seed + r. The eos and FIM ids are the ones the file's metadata names
    (`specials`), whatever their spelling.
    Token healing's restricted first token is drawn from `next_logits` with albor's sampler; the
    rest comes from llama.cpp's own sampling.
    """

    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self._name = name
        self._texts: list[str] | None = None
        self.specials = gguf_special_tokens(
            model.metadata, lambda i: model.detokenize([i]), where=name
        )

    @classmethod
    def open(
        cls, path: Path, *, n_ctx: int | None = None, n_threads: int | None = None
    ) -> GGUFBackend:
        return cls(open_gguf(path, n_ctx=n_ctx, n_threads=n_threads), path.name)

    @property
    def name(self) -> str:
        return self._name

    @property
    def n_ctx(self) -> int:
        return int(self.model.n_ctx)

    @property
    def eos_id(self) -> int | None:
        return self.specials.ids.get("eos")

    @property
    def stop_ids(self) -> Sequence[int]:
        return sorted(set(self.specials.ids.values()))

    def tokenize(self, text: str) -> list[int]:
        return list(self.model.tokenize(text, special=True))

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.model.detokenize(list(ids)))

    def fim_prompt(self, prefix: str, suffix: str, mode: Mode) -> list[int]:
        return fim_prompt_ids(
            lambda text: self.model.tokenize(text, special=False),
            self.specials,
            prefix,
            suffix,
            mode,
            self.name,
        )

    def token_texts(self) -> Sequence[str]:
        if self._texts is None:
            specials = set(self.specials.ids.values())
            self._texts = [
                "" if i in specials else self.detokenize([i]) for i in range(self.model.n_vocab)
            ]
        return self._texts

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int],
        sampling: Sampling = GREEDY,
        stop_token_ids: Sequence[int] = (),
        first_token_ids: Sequence[Sequence[int] | None] | None = None,
        done: set[int] | None = None,
    ) -> Iterator[tuple[int, int | None]]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("generation needs at least one token in every prompt")
        limits = (
            [max_new_tokens] * len(prompts)
            if isinstance(max_new_tokens, int)
            else list(max_new_tokens)
        )
        firsts: list[Sequence[int] | None] = (
            list(first_token_ids) if first_token_ids is not None else [None] * len(prompts)
        )
        if len(limits) != len(prompts) or len(firsts) != len(prompts):
            raise ConfigError("one max_new_tokens and first_token_ids entry per prompt, please")
        return self._rows(prompts, limits, sampling, tuple(stop_token_ids), firsts, done)

    def _rows(
        self,
        prompts: Sequence[Sequence[int]],
        limits: list[int],
        sampling: Sampling,
        stops: tuple[int, ...],
        firsts: list[Sequence[int] | None],
        done: set[int] | None,
    ) -> Iterator[tuple[int, int | None]]:
        for row, prompt in enumerate(prompts):
            ids = list(prompt)[-self.n_ctx :]
            # Each row its own seed, so that n samples of one prompt differ (and repeat).
            seeded = replace(sampling, seed=None if sampling.seed is None else sampling.seed + row)
            tokens = self._row(ids, limits[row], seeded, stops, firsts[row])
            try:
                for token in tokens:
                    yield row, token
                    if done is not None and row in done:
                        break
            finally:
                tokens.close()  # ends llama.cpp's generation of this row now
            yield row, None

    def _row(
        self,
        ids: list[int],
        limit: int,
        sampling: Sampling,
        stops: tuple[int, ...],
        first: Sequence[int] | None,
    ) -> Generator[int, None, None]:
        # As the torch engine: at most n_ctx - len(prompt) + 1 tokens (the last one is
        # predicted from a full context and never fed back).
        limit = min(limit, self.n_ctx - len(ids) + 1)
        if limit <= 0:
            return
        if first is not None:
            import torch

            generator = None
            if sampling.seed is not None:
                generator = torch.Generator().manual_seed(sampling.seed)
            logits = torch.from_numpy(self.model.next_logits(ids)).float()
            token = next_token(
                restrict(logits, first),
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                generator=generator,
            )
            if token in stops:
                return
            yield token
            ids, limit = [*ids, token], limit - 1
            if limit <= 0 or len(ids) >= self.n_ctx:
                return
        yield from self.model.generate(
            ids,
            max_new_tokens=limit,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop_token_ids=stops,
        )
