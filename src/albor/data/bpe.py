"""The albor tokenizer: lossless byte-level BPE trained with HF `tokenizers`, saved as HF files.

Byte-level means every UTF-8 byte is a base token (the full 256-byte alphabet is always in the
vocab), so no text is ever unknown and `decode(encode(x)) == x` for any string: whitespace, tabs,
CRLF, NUL, emoji. There is no normalizer and no prefix space, because code completion must
reproduce source byte for byte.

Special tokens (the one FIM contract used everywhere in albor) take ids 0..4 in `SPECIAL_TOKENS`
order; `<|endoftext|>` (id 0) ends every document. The saved tokenizer matches their spellings in
text, because prompts are built by writing them as text; decode with `skip_special_tokens=False`
to get such a text back. Training data is encoded with `plain_text(tokenizer)`, which treats the
spellings as ordinary text, so a source file that merely mentions `<|endoftext|>` does not inject
a document boundary into the token stream.

A tokenizer can also be adopted from a transformers directory (a teacher's, so that a student
shares its vocabulary). Its end-of-text and FIM tokens keep the ids and spellings they have there
(StarCoder writes `<fim_prefix>`, Qwen2.5-Coder puts `<|fim_prefix|>` at id 151659), so which
token plays which role is recorded in tokenizer_config.json under `ROLES_KEY`, and
`special_tokens(directory)` is how the rest of albor finds the ids of any tokenizer artifact.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from albor.errors import ArtifactError

EOS = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_PAD = "<|fim_pad|>"
SPECIAL_TOKENS = (EOS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD)
EOS_ID, FIM_PREFIX_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID, FIM_PAD_ID = range(len(SPECIAL_TOKENS))

BYTE_ALPHABET = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET + len(SPECIAL_TOKENS)
"""The smallest vocabulary that holds every byte and every special token (no merges at all)."""

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
"""The files that make a tokenizer loadable by `tokenizers` and by transformers' AutoTokenizer."""

ROLES = ("eos", "fim_prefix", "fim_middle", "fim_suffix", "fim_pad")
"""The parts special tokens play in albor, in `SPECIAL_TOKENS` order."""
REQUIRED_ROLES = ROLES[:4]
"""Roles a tokenizer must fill: documents end with eos, and models learn fill-in-the-middle."""
ROLE_SPELLINGS: dict[str, tuple[str, ...]] = {
    "eos": (EOS,),
    "fim_prefix": (FIM_PREFIX, "<fim_prefix>"),
    "fim_middle": (FIM_MIDDLE, "<fim_middle>"),
    "fim_suffix": (FIM_SUFFIX, "<fim_suffix>"),
    "fim_pad": (FIM_PAD, "<fim_pad>"),
}
"""Spellings recognised for each role in an adopted tokenizer, albor's (= Qwen2.5-Coder's) first,
then StarCoder / SantaCoder's; eos comes from the directory's `eos_token` when it names one."""
ROLES_KEY = "albor_special_tokens"
"""tokenizer_config.json key mapping each role to its spelling in an adopted tokenizer; absent in
albor's own, whose roles are `SPECIAL_TOKENS` at ids 0..4."""

# Batches handed to the trainer: big enough that its Rust side counts words in parallel.
_TRAIN_BATCH = 256


def _special(token: str) -> AddedToken:
    # normalized=False: match the exact spelling; special=True: skippable on decode, never split.
    return AddedToken(token, special=True, normalized=False)


def _batched(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with albor's pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    # The GPT-2 split regex (use_regex=True) is what GGUF export names as pre-tokenizer `gpt-2`.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, *, show_progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most `vocab_size` tokens on `texts` (streamed).

    The result can be smaller than `vocab_size` when the texts hold too few pairs seen at least
    `min_frequency` times; callers report `get_vocab_size()`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is below {MIN_VOCAB_SIZE} "
            f"({BYTE_ALPHABET} bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=[_special(t) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_batched(texts, _TRAIN_BATCH), trainer=trainer)
    _check_specials(tok, "trained tokenizer")
    return tok


def _check_specials(tok: Tokenizer, where: str) -> None:
    for expected, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        if got != expected:
            raise ArtifactError(
                f"{where}: special token {token} has id {got}, albor expects {expected} "
                "(train the tokenizer with the albor tokenizer stage)"
            )


def plain_text(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` that encodes added-token spellings as ordinary text (for data).

    `encode_special_tokens` covers only tokens flagged special, and an adopted tokenizer may leave
    its FIM tokens unflagged (Qwen2.5-Coder does), so the copy flags every added token: a sentinel
    id in the data then only ever comes from the FIM transform.
    """
    data = json.loads(tokenizer.to_str())
    for added in data.get("added_tokens") or []:
        added["special"] = True
    copy = Tokenizer.from_str(json.dumps(data))
    copy.encode_special_tokens = True
    return copy


@dataclass(frozen=True)
class SpecialTokens:
    """Which token plays each role (`ROLES`) in one tokenizer: its spelling and its id."""

    tokens: Mapping[str, str]
    ids: Mapping[str, int]

    @property
    def eos_id(self) -> int:
        return self.ids["eos"]

    @property
    def fim_ids(self) -> dict[str, int]:
        """Sentinel ids keyed by FIM slot, as `fim.SENTINEL_IDS` keys them."""
        return {slot: self.ids[f"fim_{slot}"] for slot in ("prefix", "middle", "suffix")}

    def to_json(self) -> dict[str, dict[str, object]]:
        return {r: {"token": self.tokens[r], "id": self.ids[r]} for r in ROLES if r in self.tokens}


ALBOR_SPECIAL_TOKENS = SpecialTokens(
    dict(zip(ROLES, SPECIAL_TOKENS, strict=True)), dict(zip(ROLES, range(len(ROLES)), strict=True))
)


def _token_content(value: object) -> str | None:
    # transformers writes a special token either as its string or as an AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def hf_special_tokens(directory: Path) -> dict[str, Any]:
    """The special tokens transformers would see in `directory` (tokenizer_config.json, then
    special_tokens_map.json): `eos_token`, `pad_token` (strings or None) and the whole config."""
    found: dict[str, Any] = {"eos_token": None, "pad_token": None, "config": {}}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path}: not readable JSON: {e}") from e
        if not isinstance(data, dict):
            raise ArtifactError(f"{path}: expected a JSON object, got {type(data).__name__}")
        if name == TOKENIZER_CONFIG:
            found["config"] = data
        for key in ("eos_token", "pad_token"):
            if found[key] is None:
                found[key] = _token_content(data.get(key))
    return found


def find_special_tokens(
    tokenizer: Tokenizer, eos_token: str | None
) -> tuple[SpecialTokens, list[str]]:
    """Recognise each role's token in `tokenizer` (see `ROLE_SPELLINGS`; eos is `eos_token` when
    given). Returns what was found and, per required role not found, the spellings looked for."""
    tokens: dict[str, str] = {}
    ids: dict[str, int] = {}
    missing: list[str] = []
    for role in ROLES:
        spellings = (eos_token,) if role == "eos" and eos_token else ROLE_SPELLINGS[role]
        for spelling in spellings:
            i = tokenizer.token_to_id(spelling)
            if i is not None:
                tokens[role], ids[role] = spelling, i
                break
        else:
            if role in REQUIRED_ROLES:
                missing.append(f"{role} ({' or '.join(spellings)})")
    return SpecialTokens(tokens, ids), missing


def special_tokens(directory: Path, tokenizer: Tokenizer | None = None) -> SpecialTokens:
    """The role of each special token of the tokenizer artifact in `directory`: as recorded under
    `ROLES_KEY` for an adopted tokenizer, else albor's layout (checked). ArtifactError if the
    tokenizer lacks a token it should have."""
    tok = tokenizer if tokenizer is not None else load_tokenizer(directory)
    recorded = hf_special_tokens(directory)["config"].get(ROLES_KEY)
    if recorded is None:
        _check_specials(tok, str(directory / TOKENIZER_JSON))
        return ALBOR_SPECIAL_TOKENS
    where = directory / TOKENIZER_CONFIG
    if not isinstance(recorded, dict) or any(r not in recorded for r in REQUIRED_ROLES):
        raise ArtifactError(
            f"{where}: `{ROLES_KEY}` must map each of {', '.join(REQUIRED_ROLES)} to a token "
            "(write the directory again with the tokenizer stage)"
        )
    tokens = {r: str(recorded[r]) for r in ROLES if r in recorded}
    ids = {r: tok.token_to_id(t) for r, t in tokens.items()}
    absent = [f"{r} {tokens[r]}" for r, i in ids.items() if i is None]
    if absent:
        raise ArtifactError(
            f"{where} names {', '.join(absent)}, which {directory / TOKENIZER_JSON} does not "
            "have: the two files belong to different tokenizers (write the directory again "
            "with the tokenizer stage)"
        )
    return SpecialTokens(tokens, {r: i for r, i in ids.items() if i is not None})


def _hf_config_base(eos: str, pad: str, additional: list[str]) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": pad,
        "additional_special_tokens": additional,
        # Code must come back byte for byte: no space clean-up, no prefix space.
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def hf_config() -> dict[str, object]:
    """tokenizer_config.json: transformers loads tokenizer.json as is, with EOS doubling as pad."""
    return {
        **_hf_config_base(EOS, EOS, list(SPECIAL_TOKENS[1:])),
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }


def save_adopted_hf_files(
    source: Path, tokenizer: Tokenizer, specials: SpecialTokens, pad: str | None, directory: Path
) -> list[Path]:
    """Write `TOKENIZER_FILES` for a tokenizer adopted from directory `source`: its tokenizer.json
    byte for byte (the same bytes are the same tokenizer, for whoever compares), and albor's
    tokenizer_config.json / special_tokens_map.json naming its roles (`ROLES_KEY`). `pad` is the
    source's pad token when it has one in the vocabulary, else eos doubles as pad."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TOKENIZER_JSON).write_bytes((source / TOKENIZER_JSON).read_bytes())
    eos = specials.tokens["eos"]
    pad = pad if pad is not None and tokenizer.token_to_id(pad) is not None else eos
    fim = [specials.tokens[r] for r in ROLES[1:] if r in specials.tokens]
    config = {
        **_hf_config_base(eos, pad, fim),
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "rstrip": t.rstrip,
                "normalized": t.normalized,
                "single_word": t.single_word,
                "special": t.special or t.content in specials.tokens.values(),
            }
            for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
        },
        ROLES_KEY: dict(specials.tokens),
    }
    special_map = {"eos_token": eos, "pad_token": pad, "additional_special_tokens": fim}
    for name, data in ((TOKENIZER_CONFIG, config), (SPECIAL_TOKENS_MAP, special_map)):
        (directory / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return [directory / name for name in TOKENIZER_FILES]


def save_hf_files(tokenizer: Tokenizer, directory: Path) -> list[Path]:
    """Write `TOKENIZER_FILES` into `directory`; returns their paths."""
    _check_specials(tokenizer, "save_hf_files")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / TOKENIZER_JSON))
    special_map = {
        "eos_token": EOS,
        "pad_token": EOS,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
    }
    for name, data in ((TOKENIZER_CONFIG, hf_config()), (SPECIAL_TOKENS_MAP, special_map)):
        (directory / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return [directory / name for name in TOKENIZER_FILES]


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer saved in `directory`; ArtifactError if missing, corrupt, or lacking the
    special tokens albor needs (albor's layout, or the roles recorded for an adopted tokenizer)."""
    path = directory / TOKENIZER_JSON
    if not path.is_file():
        raise ArtifactError(
            f"{directory}: no {TOKENIZER_JSON} (point it at the output of the tokenizer stage)"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
        raise ArtifactError(f"{path}: not a readable tokenizer: {e}") from e
    special_tokens(directory, tok)
    return tok


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for added tokens), for bits-per-byte.

    In the byte-level alphabet every character of a token's string is exactly one byte. Added
    tokens count 0 even when not flagged special: data is encoded with `plain_text`, so they only
    ever stand for a separator or sentinel, never for text.
    """
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    specials = set(tokenizer.get_added_tokens_decoder())
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, i in tokenizer.get_vocab().items():
        if i in specials:
            continue
        if not set(token) <= alphabet:
            raise ArtifactError(f"token {i} ({token!r}) is not byte-level: not an albor tokenizer")
        lengths[i] = len(token)
    return lengths
