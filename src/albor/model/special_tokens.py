"""Which token plays which role (eos, the FIM sentinels) for a model albor runs or exports.

A model directory carries its tokenizer files, so its roles are the tokenizer artifact's
(`bpe.special_tokens`: recorded for an adopted tokenizer, albor's layout otherwise). A model made
elsewhere (a transformers download) records nothing, so its roles are recognised the way the
tokenizer stage recognises them when adopting: eos from its `eos_token`, FIM tokens by the
spellings albor knows; a role it lacks is left out and whoever needs it says so. A GGUF file
carries the ids in its metadata (`GGUF_KEYS`), which albor's writer fills from the same roles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from tokenizers import Tokenizer

from albor.data.bpe import (
    ROLES,
    ROLES_KEY,
    SpecialTokens,
    find_special_tokens,
    hf_special_tokens,
    special_tokens,
)
from albor.errors import ArtifactError

GGUF_KEYS: dict[str, str] = {
    "eos": "tokenizer.ggml.eos_token_id",
    "fim_prefix": "tokenizer.ggml.fim_pre_token_id",
    "fim_middle": "tokenizer.ggml.fim_mid_token_id",
    "fim_suffix": "tokenizer.ggml.fim_suf_token_id",
    "fim_pad": "tokenizer.ggml.fim_pad_token_id",
}
"""GGUF metadata key of each role's token id (gguf's `Keys.Tokenizer`, as llama.cpp reads them)."""


def model_special_tokens(tokenizer: Tokenizer, directory: Path | None = None) -> SpecialTokens:
    """The roles of `tokenizer`, the one in model directory `directory` when given.

    ArtifactError when the directory records roles its tokenizer.json does not have (the files of
    two tokenizers mixed). Without a record, the roles found are returned, possibly not all.
    """
    hf = hf_special_tokens(directory) if directory is not None else None
    if directory is not None and hf is not None and ROLES_KEY in hf["config"]:
        return special_tokens(directory, tokenizer)
    found, _ = find_special_tokens(tokenizer, hf["eos_token"] if hf is not None else None)
    return found


def gguf_special_tokens(
    metadata: Mapping[str, object], spell: Callable[[int], str], where: str = "GGUF file"
) -> SpecialTokens:
    """The roles a GGUF file's metadata names (values as text, as llama.cpp reports them, or
    ints); `spell(id)` gives a token's spelling. A role without its key is left out."""
    ids: dict[str, int] = {}
    for role in ROLES:
        value = metadata.get(GGUF_KEYS[role])
        if value is None:
            continue
        try:
            ids[role] = int(str(value))
        except ValueError:
            raise ArtifactError(
                f"{where}: metadata {GGUF_KEYS[role]} is {value!r}, not a token id (write the "
                "file again with albor's export stage)"
            ) from None
    return SpecialTokens({r: spell(i) for r, i in ids.items()}, ids)
