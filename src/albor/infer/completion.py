"""The text layer every backend shares: prompts in, completion text out.

`make_prompt` starts a prompt as a document starts in training (after the end-of-text token),
heals its last token, or builds a FIM prompt with the model's own sentinel ids; `TextStream` turns
new ids into text incrementally, never splitting a multi-byte character and holding back what
could be the start of a stop string;
`stream_completions`, `completions` and `complete` put it together over any `Backend`
(`infer/engine.py`), so `albor complete`, `albor serve` and the evals cut text the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Literal

from tokenizers import Tokenizer

from albor.data.bpe import SpecialTokens
from albor.data.fim import Mode
from albor.errors import ConfigError
from albor.infer.engine import GREEDY, Backend, Sampling, TorchBackend, token_texts
from albor.model.gpt import GPT

HUMANEVAL_STOPS: tuple[str, ...] = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
"""The stop strings of the HumanEval harness (Chen et al. 2021): a completed function body ends
where the next top-level statement would begin."""

FinishReason = Literal["stop", "length"]

# Prompt tokens decoded ahead of the new ones, so that a character whose bytes straddle the
# boundary comes out whole (a UTF-8 character is at most 4 bytes, so at most 4 tokens).
_CONTEXT_TOKENS = 4


def healing_candidates(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """The text of `token_id` and every token whose text starts with it.

    Byte-level BPE glues a word's leading space to the word (" foo" is one token), so a prompt
    ending in "def " ends in a lone-space token the model rarely saw. Token healing drops that
    last token and lets the first generated token be any token that begins with its text.
    Special tokens are never candidates: the prompt's text continues as text.
    """
    return _candidates(token_texts(tokenizer), token_id)


def _candidates(texts: Sequence[str], token_id: int) -> tuple[str, list[int]]:
    text = texts[token_id]
    return text, [i for i, t in enumerate(texts) if t and t.startswith(text)]


@dataclass(frozen=True)
class Prompt:
    """What the model reads for one completion, and how its output is turned back into text."""

    ids: list[int]
    first_token_ids: list[int] | None = None
    """Token healing: the ids the first new token may take (None: any)."""
    healed: str = ""
    """Token healing: the text of the dropped last token, which the first new token repeats."""


def make_prompt(
    backend: Backend,
    prefix: str,
    suffix: str | None = None,
    *,
    fim_mode: Mode = "psm",
    heal: bool = True,
) -> Prompt:
    """The prompt completing `prefix` (or, with `suffix`, filling in between the two).

    The prompt starts with the end-of-text token (`Backend.eos_id`), as every document did in
    training. With `heal`, the last token of a plain prompt is re-generated under the constraint
    that it begins with the same text, so a prefix cut in the middle of a token (such as "def ")
    reads as the model saw text in training. FIM prompts use the training layout (`data/fim.py`),
    PSM or SPM, with the backend's sentinel ids.
    """
    eos = backend.eos_id
    start = [] if eos is None else [eos]
    if suffix is not None:
        return Prompt([*start, *backend.fim_prompt(prefix, suffix, fim_mode)])
    ids = backend.tokenize(prefix)
    if heal and len(start) + len(ids) > 1:
        text, candidates = _candidates(backend.token_texts(), ids[-1])
        if text and "\ufffd" not in text and candidates:
            return Prompt([*start, *ids[:-1]], candidates, text)
    if not start and not ids:
        raise ConfigError(
            f"{backend.name}: an empty prefix needs an end-of-text token to start from, and this "
            "model's tokenizer names none: give a prefix"
        )
    return Prompt([*start, *ids])


class TextStream:
    """New token ids in, new text out: multi-byte characters whole, stop strings cut.

    Decoding each token alone would split a character whose UTF-8 bytes span two tokens (byte-
    level BPE) into replacement characters, so the new tokens are decoded together with the ones
    before them and only the text past theirs is emitted, once it no longer ends in an incomplete
    character (the incremental detokenization of vLLM and TGI). Text that could be the start of a
    stop string is held back until it is clearly not one; at a stop string `stopped` turns true and
    the text before it has been emitted.
    """

    def __init__(
        self,
        detokenize: Callable[[Sequence[int]], str],
        context: Sequence[int] = (),
        *,
        skip: str = "",
        stop: Sequence[str] = (),
    ) -> None:
        self._decode = detokenize
        self._ids = list(context)[-_CONTEXT_TOKENS:]
        self._prefix = 0
        self._read = len(self._ids)
        self._skip = skip
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a generated token; return the text that is now final (possibly "")."""
        if self.stopped:
            return ""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its remaining bytes
        self._prefix, self._read = self._read, len(self._ids)
        return self._add(after[len(before) :])

    def flush(self) -> str:
        """At the end: whatever is still held (undecodable bytes, a partial stop string)."""
        if self.stopped:
            return ""
        rest = ""
        if self._read < len(self._ids):
            before = self._decode(self._ids[self._prefix : self._read])
            rest = self._decode(self._ids[self._prefix :])[len(before) :]
            self._read = len(self._ids)
        out = self._add(rest, final=True)
        return out

    def _add(self, delta: str, final: bool = False) -> str:
        if self._skip:
            n = min(len(self._skip), len(delta))
            delta, self._skip = delta[n:], self._skip[n:]
        text = self._held + delta
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return self._emit(text[:cut])
        hold = 0 if final else _partial_stop(text, self._stop)
        self._held = text[len(text) - hold :] if hold else ""
        return self._emit(text[: len(text) - hold])

    def _emit(self, text: str) -> str:
        self.text += text
        return text


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


@dataclass(frozen=True)
class Delta:
    """A piece of one row's completion; the last one of a row carries its `finish_reason`."""

    row: int
    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0


def stream_completions(
    backend: Backend,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    stop: Sequence[str] = (),
) -> Generator[Delta, None, None]:
    """Complete every prompt (batched where the backend can); yields text as it is generated.

    Each row ends at the end-of-text token (or a FIM sentinel, see `Backend.stop_ids`) or a
    stop string (finish_reason "stop", the stop string
    left out) or after `max_new_tokens` or at the full context ("length"). A healed prompt
    generates one token more, the one that re-generates its cut last token.
    """
    streams = [TextStream(backend.detokenize, p.ids, skip=p.healed, stop=stop) for p in prompts]
    counts = [0] * len(prompts)
    limits = [max_new_tokens + (1 if p.healed else 0) for p in prompts]
    done: set[int] = set()
    events = backend.stream(
        [p.ids for p in prompts],
        max_new_tokens=limits,
        sampling=sampling,
        stop_token_ids=backend.stop_ids,
        first_token_ids=[p.first_token_ids for p in prompts],
        done=done,
    )
    for row, token in events:
        s = streams[row]
        if token is None:
            text = s.flush()
            # A row that filled its context ran out of length (llama.cpp stops one token short
            # of the torch engine there, which feeds nothing after its last token).
            used = min(len(prompts[row].ids), backend.n_ctx) + counts[row]
            length = counts[row] >= limits[row] or used >= backend.n_ctx
            reason: FinishReason = "stop" if s.stopped or not length else "length"
            yield Delta(row, text, reason, _completion_tokens(prompts[row], counts[row]))
            continue
        counts[row] += 1
        text = s.push(token)
        if s.stopped:
            done.add(row)
        if text:
            yield Delta(row, text, None, _completion_tokens(prompts[row], counts[row]))


def _completion_tokens(prompt: Prompt, count: int) -> int:
    # The healed token stands for prompt text: it is not counted as completion.
    return max(0, count - 1) if prompt.healed else count


@dataclass(frozen=True)
class Completion:
    """One finished completion."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


def prompt_tokens(prompt: Prompt) -> int:
    """Tokens of the prompt as the user wrote it (a healed token counts as prompt)."""
    return len(prompt.ids) + (1 if prompt.healed else 0)


def completions(
    backend: Backend,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    stop: Sequence[str] = (),
) -> list[Completion]:
    """`stream_completions` gathered: one `Completion` per prompt, in order."""
    texts = [""] * len(prompts)
    ends: list[Delta | None] = [None] * len(prompts)
    for d in stream_completions(
        backend, prompts, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop
    ):
        texts[d.row] += d.text
        if d.finish_reason is not None:
            ends[d.row] = d
    out = []
    for p, text, end in zip(prompts, texts, ends, strict=True):
        assert end is not None and end.finish_reason is not None
        out.append(Completion(text, end.finish_reason, prompt_tokens(p), end.completion_tokens))
    return out


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
    *,
    suffix: str | None = None,
    fim_mode: Mode = "psm",
    specials: SpecialTokens | None = None,
) -> str:
    """The text continuing `prefix` (with `suffix`: the middle between them), ending at the
    end-of-text token (when the tokenizer has one) or before the first stop string.

    `specials`: the tokenizer's roles (`model_special_tokens`; by default recognised in the
    tokenizer). See `make_prompt` for how the prompt is built (document start, token healing,
    FIM).
    """
    backend = TorchBackend(model, tokenizer, specials=specials)
    prompt = make_prompt(backend, prefix, suffix, fim_mode=fim_mode, heal=heal)
    sampling = Sampling(temperature, top_k, top_p, seed)
    (result,) = completions(
        backend, [prompt], max_new_tokens=max_new_tokens, sampling=sampling, stop=stop_strings
    )
    return result.text
