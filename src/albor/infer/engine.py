"""Token generation with a KV cache, and the backends that serve a model's tokens.

Two layers, bottom up (the text layer on top of them is `infer/completion.py`):

- **Tokens (torch).** `stream_batch` runs several prompts at once through `GPT.forward`:
  left-padded into one batch, each row with its own RoPE positions, the padding slots masked, one
  KV cache; rows that finish leave the batch. Greedy output of a row equals that prompt generated
  alone. `generate` is its one-row form; `next_token` picks a token (greedy, temperature, top-k,
  top-p).
- **Backends.** `Backend` is what `complete`, `serve` and `bench` need from a model: tokenize,
  detokenize, the context, FIM prompts, a stream of new ids, a name. `TorchBackend` serves albor
  checkpoints and HF model dirs; GGUF files are served through llama.cpp (`infer/loader.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tokenizers import Tokenizer

from albor.data.bpe import SpecialTokens, plain_text
from albor.data.fim import Mode, Pieces, arrange
from albor.errors import ArtifactError, ConfigError
from albor.model.gpt import GPT
from albor.model.special_tokens import model_special_tokens


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature {temperature} is negative: use 0 for greedy or > 0")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k {top_k} must be at least 1 (or unset)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p {top_p} must be in (0, 1] (or unset)")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else sampled (top-k, top-p)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_sampling(self.temperature, self.top_k, self.top_p)


GREEDY = Sampling()


def next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token from one position's logits (vocab,): argmax when temperature is 0."""
    if temperature == 0:
        return int(torch.argmax(logits).item())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def restrict(logits: torch.Tensor, allowed: Sequence[int]) -> torch.Tensor:
    """`logits` with every id outside `allowed` set to -inf (token healing's first token)."""
    mask = torch.full_like(logits, float("-inf"))
    mask[list(allowed)] = 0.0
    return logits + mask


# ----- tokens: batched generation on the albor decoder ------------------------------------------


def stream_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    sampling: Sampling = GREEDY,
    stop_token_ids: Sequence[int] = (),
    first_token_ids: Sequence[Sequence[int] | None] | None = None,
    done: set[int] | None = None,
) -> Iterator[tuple[int, int | None]]:
    """Generate for several prompts at once; yields `(row, token)` per new token and `(row, None)`
    once when a row has ended.

    A row ends at a stop token (not yielded), after its `max_new_tokens` (one number for all rows
    or one per row), when its context is full (the last token is predicted from a full context),
    or when the caller adds the row to `done` (checked after each of the row's tokens: this is how
    stop strings, found in text, end a row). A prompt longer than the context keeps its last
    `max_seq_len` tokens. `first_token_ids[row]` restricts that row's first token (token
    healing). Rows are sampled from one seeded generator, in row order, so a seeded batch is
    reproducible; greedy rows do not depend on the rest of the batch.
    """
    if not prompts:
        raise ConfigError("generation needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("generation needs at least one token in every prompt")
    limits = (
        [max_new_tokens] * len(prompts)
        if isinstance(max_new_tokens, int)
        else [int(n) for n in max_new_tokens]
    )
    if len(limits) != len(prompts):
        raise ConfigError(f"{len(limits)} max_new_tokens values for {len(prompts)} prompts")
    firsts: list[Sequence[int] | None] = (
        list(first_token_ids) if first_token_ids is not None else [None] * len(prompts)
    )
    if len(firsts) != len(prompts):
        raise ConfigError(f"{len(firsts)} first_token_ids entries for {len(prompts)} prompts")
    ctx = model.cfg.max_seq_len
    rows = [list(p)[-ctx:] for p in prompts]
    # Checks above run at call time; the stream below starts on the first next().
    return _batch_stream(model, rows, limits, sampling, set(stop_token_ids), firsts, done)


def _batch_stream(
    model: GPT,
    rows: list[list[int]],
    limits: list[int],
    sampling: Sampling,
    stops: set[int],
    firsts: list[Sequence[int] | None],
    done: set[int] | None,
) -> Iterator[tuple[int, int | None]]:
    ctx = model.cfg.max_seq_len
    live = [r for r in range(len(rows)) if limits[r] > 0]
    for r in range(len(rows)):
        if limits[r] <= 0:
            yield r, None
    if not live:
        return
    device = model.model.embed_tokens.weight.device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed)
    lens = [len(rows[r]) for r in live]
    width = max(lens)
    most = max(limits[r] for r in live)
    # Slots: the longest prompt plus every token fed back; no row reads past its context.
    slots = max(width, min(width + most - 1, width - min(lens) + ctx))
    ids = torch.zeros((len(live), width), dtype=torch.long)
    for i, r in enumerate(live):
        ids[i, width - lens[i] :] = torch.tensor(rows[r])
    pads = [width - n for n in lens]
    pad = torch.tensor(pads, device=device)
    # Left padding: row i's tokens sit in slots pads[i].., at RoPE positions 0..; the model hides
    # the padding slots. Unpadded rows take the model's plain causal path.
    real = torch.arange(slots, device=device)[None, :] >= pad[:, None]
    positions = (torch.arange(width, device=device)[None, :] - pad[:, None]).clamp(min=0)
    step, next_pos = ids.to(device), torch.tensor(lens, device=device)
    generated = dict.fromkeys(live, 0)
    # inference_mode is entered per step, not around the loop: a suspended generator would
    # otherwise leave it switched on in the caller's code between tokens.
    with torch.inference_mode():
        cache = model.new_cache(len(live), slots)
    while True:
        with torch.inference_mode():
            if any(pads):
                seen = real[:, : cache.pos + step.shape[1]]
                out = model(step, cache=cache, positions=positions, key_mask=seen, last_only=True)
            else:
                out = model(step, cache=cache, last_only=True)
            logits = out[:, 0]
            for i, r in enumerate(live):
                allowed = firsts[r]
                if allowed is not None and generated[r] == 0:
                    logits[i] = restrict(logits[i], allowed)
            if sampling.temperature == 0:
                tokens = logits.argmax(dim=-1).tolist()
            else:
                tokens = [
                    next_token(
                        logits[i],
                        temperature=sampling.temperature,
                        top_k=sampling.top_k,
                        top_p=sampling.top_p,
                        generator=generator,
                    )
                    for i in range(len(live))
                ]
        keep: list[int] = []
        for i, r in enumerate(live):
            token = tokens[i]
            if token in stops or (done is not None and r in done):
                yield r, None
                continue
            generated[r] += 1
            yield r, token
            full = len(rows[r]) + generated[r] > ctx
            if generated[r] >= limits[r] or full or (done is not None and r in done):
                yield r, None
                continue
            keep.append(i)
        if not keep:
            return
        if len(keep) < len(live):  # finished rows leave the batch and its cache
            index = torch.tensor(keep, device=device)
            cache.keep(index)
            real, next_pos = real[index], next_pos[index]
            pads = [pads[i] for i in keep]
            live = [live[i] for i in keep]
        step = torch.tensor([[tokens[i]] for i in keep], dtype=torch.long, device=device)
        positions = next_pos[:, None]
        next_pos = next_pos + 1


def generate(
    model: GPT,
    input_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    first_token_ids: Sequence[int] | None = None,
) -> Iterator[int]:
    """Stream up to `max_new_tokens` new token ids continuing `input_ids` (one row of
    `stream_batch`).

    `first_token_ids` restricts the first generated token to those ids (token healing).

    A prompt longer than the context keeps its last `max_seq_len` tokens; generation ends when
    the context is full, at a stop token (not yielded), or once the decoded output contains a stop
    string (the token completing it is yielded; callers trim the text). Stop strings need
    `decode`. With `seed`, sampling is reproducible.
    """
    sampling = Sampling(temperature, top_k, top_p, seed)
    if stop_strings and decode is None:
        raise ConfigError("stop_strings need a decode function to turn token ids into text")
    if not input_ids:
        raise ConfigError("generate needs at least one prompt token")
    done: set[int] = set()
    rows = stream_batch(
        model,
        [input_ids],
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_token_ids=stop_token_ids,
        first_token_ids=[first_token_ids],
        done=done,
    )
    return _one_row(rows, done, tuple(stop_strings), decode)


def _one_row(
    rows: Iterator[tuple[int, int | None]],
    done: set[int],
    stop_strings: tuple[str, ...],
    decode: Callable[[list[int]], str] | None,
) -> Iterator[int]:
    # Enough trailing tokens to hold any stop string (a token decodes to at least one byte).
    tail = 4 * max((len(s) for s in stop_strings), default=0) + 4
    generated: list[int] = []
    for _, token in rows:
        if token is None:
            return
        generated.append(token)
        yield token
        if decode is not None and stop_strings:
            text = decode(generated[-tail:])
            if any(s in text for s in stop_strings):
                done.add(0)


# ----- backends -----------------------------------------------------------------------------


class Backend(Protocol):
    """A model that `complete`, `serve` and `bench` can drive, whatever its weights format."""

    @property
    def name(self) -> str:
        """How the model is called in responses and reports (its directory or file name)."""
        ...

    @property
    def n_ctx(self) -> int:
        """Context length in tokens: prompt plus generated tokens fit in it."""
        ...

    @property
    def eos_id(self) -> int | None:
        """The end-of-text id (the tokenizer's eos role): documents start after it and generation
        ends at it."""
        ...

    @property
    def stop_ids(self) -> Sequence[int]:
        """Tokens that end a completion: the end-of-text id and the FIM sentinels, whose spelling
        never belongs in generated code."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`; special-token spellings become their tokens; no BOS is added."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens written out."""
        ...

    def fim_prompt(self, prefix: str, suffix: str, mode: Mode) -> list[int]:
        """The infilling prompt up to and including the fim_middle sentinel (the middle comes
        next)."""
        ...

    def token_texts(self) -> Sequence[str]:
        """The text of every token id, "" for special tokens (for token healing)."""
        ...

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
        """New ids for each prompt as `(row, token)`, then `(row, None)`: see `stream_batch`."""
        ...


def fim_prompt_ids(
    encode: Callable[[str], list[int]],
    specials: SpecialTokens,
    prefix: str,
    suffix: str,
    mode: Mode,
    where: str = "this model",
) -> list[int]:
    """A FIM prompt in albor's training layout (`fim.arrange`) up to and including the middle
    sentinel, with the sentinel ids of `specials` (the model's own) between the pieces.

    `encode` must treat a sentinel's spelling in a piece as text (`bpe.plain_text`, llama.cpp's
    tokenize without special), so only the sentinels it places are sentinels. With albor's
    tokenizer this is `fim.prompt_ids`.
    """
    missing = [r for r in ("fim_prefix", "fim_middle", "fim_suffix") if r not in specials.ids]
    if missing:
        raise ConfigError(
            f"{where} has no {', '.join(missing)} token: it cannot fill in the middle (leave out "
            "--suffix, or use a model whose tokenizer has FIM tokens)"
        )
    sentinels = specials.fim_ids
    out: list[int] = []
    for slot, piece in arrange(Pieces(prefix, "", suffix), mode):
        out.append(sentinels[slot])
        if slot == "middle":
            break
        out.extend(encode(piece))
    return out


def token_texts(tokenizer: Tokenizer) -> list[str]:
    """The text of every token id of `tokenizer`, "" for its special tokens."""
    specials = set(tokenizer.get_added_tokens_decoder())
    texts = tokenizer.decode_batch(
        [[i] for i in range(tokenizer.get_vocab_size())], skip_special_tokens=False
    )
    return ["" if i in specials else t for i, t in enumerate(texts)]


class TorchBackend:
    """An albor decoder (albor checkpoint or HF model dir) with its HF `tokenizers` tokenizer.

    `specials` are the tokenizer's roles (`model_special_tokens` of the model's directory; by
    default those recognised in the tokenizer alone, which misses an eos that only its
    directory's tokenizer_config.json names)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        name: str = "albor",
        specials: SpecialTokens | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.specials = specials if specials is not None else model_special_tokens(tokenizer)
        self._plain = plain_text(tokenizer)
        self._name = name
        self._texts: list[str] | None = None
        if tokenizer.get_vocab_size() > model.cfg.vocab_size:
            raise ArtifactError(
                f"{name}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                f"{model.cfg.vocab_size}: load the tokenizer the model was trained with"
            )

    @property
    def name(self) -> str:
        return self._name

    @property
    def n_ctx(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def eos_id(self) -> int | None:
        return self.specials.ids.get("eos")

    @property
    def stop_ids(self) -> Sequence[int]:
        return sorted(set(self.specials.ids.values()))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def fim_prompt(self, prefix: str, suffix: str, mode: Mode) -> list[int]:
        return fim_prompt_ids(self._encode_plain, self.specials, prefix, suffix, mode, self._name)

    def _encode_plain(self, text: str) -> list[int]:
        return list(self._plain.encode(text, add_special_tokens=False).ids)

    def token_texts(self) -> Sequence[str]:
        if self._texts is None:
            self._texts = token_texts(self.tokenizer)
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
        return stream_batch(
            self.model,
            prompts,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_token_ids=stop_token_ids,
            first_token_ids=first_token_ids,
            done=done,
        )
