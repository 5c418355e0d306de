"""Token generation with a KV cache: greedy, temperature, top-k and top-p sampling, stops.

`generate` streams token ids: the prompt is run through the model once (prefill) and then one
token per step reuses the cached keys/values. `complete` wraps it for text in, text out. Only
the model is needed here, never training code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from tokenizers import Tokenizer

from albor.errors import ConfigError
from albor.model.gpt import GPT

EOS_TOKEN = "<|endoftext|>"


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature {temperature} is negative: use 0 for greedy or > 0")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k {top_k} must be at least 1 (or unset)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p {top_p} must be in (0, 1] (or unset)")


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
    """Stream up to `max_new_tokens` new token ids continuing `input_ids`.

    `first_token_ids` restricts the first generated token to those ids (token healing).

    A prompt longer than the context keeps its last `max_seq_len` tokens; generation ends when
    the context is full, at a stop token (not yielded), or once the decoded output contains a stop
    string (the token completing it is yielded; callers trim the text). Stop strings need
    `decode`. With `seed`, sampling is reproducible.
    """
    _check_sampling(temperature, top_k, top_p)
    if stop_strings and decode is None:
        raise ConfigError("stop_strings need a decode function to turn token ids into text")
    if not input_ids:
        raise ConfigError("generate needs at least one prompt token")
    prompt = list(input_ids)[-model.cfg.max_seq_len :]
    # Checks above run at call time; the stream below starts on the first next().
    return _stream(
        model,
        prompt,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        set(stop_token_ids),
        tuple(stop_strings),
        decode,
        None if first_token_ids is None else list(first_token_ids),
    )


def _stream(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stops: set[int],
    stop_strings: tuple[str, ...],
    decode: Callable[[list[int]], str] | None,
    first_ids: list[int] | None,
) -> Iterator[int]:
    if max_new_tokens <= 0:
        return
    device = model.model.embed_tokens.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    # Enough trailing tokens to hold any stop string (a token decodes to at least one byte).
    tail = 4 * max((len(s) for s in stop_strings), default=0) + 4
    # inference_mode is entered per step, not around the loop: a suspended generator would
    # otherwise leave it switched on in the caller's code between tokens.
    with torch.inference_mode():
        cache = model.new_cache(1, min(model.cfg.max_seq_len, len(prompt) + max_new_tokens))
    generated: list[int] = []
    step = prompt
    while True:
        with torch.inference_mode():
            logits = model(torch.tensor([step], dtype=torch.long, device=device), cache=cache)
            last = logits[0, -1]
            if first_ids is not None and not generated:
                mask = torch.full_like(last, float("-inf"))
                mask[first_ids] = 0.0
                last = last + mask
            token = next_token(
                last,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
        if token in stops:
            return
        generated.append(token)
        yield token
        if decode is not None and stop_strings:
            text = decode(generated[-tail:])
            if any(s in text for s in stop_strings):
                return
        if len(generated) >= max_new_tokens or cache.pos >= cache.max_len:
            return
        step = [token]


def healing_candidates(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """The text of `token_id` and every token whose text starts with it.

    Byte-level BPE glues a word's leading space to the word (" foo" is one token), so a prompt
    ending in "def " ends in a lone-space token the model rarely saw. Token healing drops that
    last token and lets the first generated token be any token that begins with its text.
    """
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    vocab = tokenizer.get_vocab_size()
    texts = tokenizer.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
    return text, [i for i, t in enumerate(texts) if t.startswith(text) and tokenizer.id_to_token(i)]


def complete(
    model: GPT,
    tokenizer: Tokenizer,
    prefix: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_strings: Sequence[str] = (),
    heal: bool = True,
) -> str:
    """The text continuing `prefix`, ending at `<|endoftext|>` (when the tokenizer has it) or
    before the first stop string.

    The prompt starts with `<|endoftext|>`, as every document did in training, and with `heal`
    its last token is re-generated under the constraint that it begins with the same text, so a
    prefix cut in the middle of a token (such as "def ") reads as the model saw text in training.
    """
    prompt = tokenizer.encode(prefix, add_special_tokens=False).ids
    eos = tokenizer.token_to_id(EOS_TOKEN)
    healed, first_ids = "", None
    if heal and prompt:
        text, candidates = healing_candidates(tokenizer, prompt[-1])
        if "\ufffd" not in text and candidates:
            healed, first_ids = text, candidates
            prompt = prompt[:-1]
    if eos is not None:
        prompt = [eos, *prompt]  # documents follow EOS in training: the start of a document
    if not prompt:
        raise ConfigError("an empty prefix needs a tokenizer with <|endoftext|> to start from")
    ids = list(
        generate(
            model,
            prompt,
            max_new_tokens=max_new_tokens + (1 if healed else 0),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token_ids=() if eos is None else (eos,),
            stop_strings=stop_strings,
            decode=lambda t: tokenizer.decode(t, skip_special_tokens=False),
            first_token_ids=first_ids,
        )
    )
    # Decode with the prompt so that characters split across the boundary (byte-level BPE) come
    # out whole, then cut the prompt's own text (and the healed part) off.
    head = tokenizer.decode(prompt, skip_special_tokens=False) + healed
    full = tokenizer.decode(prompt + ids, skip_special_tokens=False)
    text = (
        full[len(head) :]
        if full.startswith(head)
        else tokenizer.decode(ids, skip_special_tokens=False)[len(healed) :]
    )
    for s in stop_strings:
        if s in text:
            text = text[: text.index(s)]
    return text
