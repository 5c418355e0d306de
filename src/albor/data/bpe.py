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
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

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
    """A copy of `tokenizer` that encodes special-token spellings as ordinary text (for data)."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = True
    return copy


def hf_config() -> dict[str, object]:
    """tokenizer_config.json: transformers loads tokenizer.json as is, with EOS doubling as pad."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        # Code must come back byte for byte: no space clean-up, no prefix space.
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_input_names": ["input_ids", "attention_mask"],
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
    """The tokenizer saved in `directory`; ArtifactError if missing, corrupt or not albor's."""
    path = directory / TOKENIZER_JSON
    if not path.is_file():
        raise ArtifactError(
            f"{directory}: no {TOKENIZER_JSON} (point it at the output of the tokenizer stage)"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
        raise ArtifactError(f"{path}: not a readable tokenizer: {e}") from e
    _check_specials(tok, str(path))
    return tok


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits-per-byte.

    In the byte-level alphabet every character of a token's string is exactly one byte.
    """
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    specials = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, i in tokenizer.get_vocab().items():
        if i in specials:
            continue
        if not set(token) <= alphabet:
            raise ArtifactError(f"token {i} ({token!r}) is not byte-level: not an albor tokenizer")
        lengths[i] = len(token)
    return lengths
