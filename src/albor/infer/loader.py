"""One `load(path)` for every model albor can run, returning an engine `Backend`.

- an albor checkpoint dir or a transformers model dir: `config.json`, `model.safetensors` (or
  shards with `model.safetensors.index.json`) and `tokenizer.json` -> `TorchBackend`, in float32,
  bfloat16 or float16, on the CPU or a GPU;
- a `.gguf` file -> `GGUFBackend`, run by llama.cpp through llama-cpp-python
  (`albor.infer.llamacpp`);
- a directory holding exactly one of those (an export artifact with one model) -> that model.

`find_models` lists every model under a directory (an export artifact may hold an HF dir and
several GGUF files), which is what `albor bench` measures.
"""

from __future__ import annotations

import importlib
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from albor.data.bpe import EOS, SPECIAL_TOKENS, TOKENIZER_JSON
from albor.data.fim import ORDER, SENTINELS, Mode
from albor.errors import ArtifactError, ConfigError
from albor.infer.engine import GREEDY, Backend, Sampling, TorchBackend, next_token, restrict
from albor.model.hf import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE

if TYPE_CHECKING:
    import torch

GGUF_SUFFIX = ".gguf"
DTYPES = ("float32", "bfloat16", "float16")
Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
GGUF_INSTALL = "pip install gguf llama-cpp-python (both are albor dependencies)"


@dataclass(frozen=True)
class ModelRef:
    """A model found on disk: a torch checkpoint dir or a GGUF file."""

    path: Path
    kind: Literal["torch", "gguf"]

    @property
    def name(self) -> str:
        return self.path.name


def is_checkpoint_dir(path: Path) -> bool:
    """A `config.json` with safetensors weights beside it (single file or sharded)."""
    return (path / CONFIG_FILE).is_file() and (
        (path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file()
    )


def find_models(path: Path) -> list[ModelRef]:
    """Every model at `path`: the file itself, the checkpoint dir itself, and the checkpoint dirs
    and GGUF files directly in it or one directory down (an export artifact's layout)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != GGUF_SUFFIX:
            raise ConfigError(
                f"{path}: not a model: give a .gguf file or a model directory (config.json, "
                f"{WEIGHTS_FILE} and {TOKENIZER_JSON})"
            )
        return [ModelRef(path, "gguf")]
    if not path.is_dir():
        raise ConfigError(f"{path}: no such file or directory")
    found: list[ModelRef] = []
    for d in [path, *sorted(p for p in path.iterdir() if p.is_dir() and p.name[0] not in "._")]:
        if is_checkpoint_dir(d):
            found.append(ModelRef(d, "torch"))
        found += [ModelRef(f, "gguf") for f in sorted(d.glob(f"*{GGUF_SUFFIX}")) if f.is_file()]
    return found


def resolve(path: Path) -> ModelRef:
    """The one model `path` names; ConfigError when it names none or several."""
    found = find_models(path)
    if not found:
        raise ConfigError(
            f"{path}: no model here: expected a checkpoint dir (config.json, {WEIGHTS_FILE} or "
            f"{INDEX_FILE}, {TOKENIZER_JSON}) or a .gguf file"
        )
    if len(found) > 1 and not (Path(path).is_dir() and is_checkpoint_dir(Path(path))):
        names = ", ".join(str(r.path) for r in found)
        raise ConfigError(f"{path} holds several models; pass one of them: {names}")
    return found[0]


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def pick_device(device: str) -> str:
    """`auto` is cuda when a GPU is visible, else cpu; asking for cuda without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for but no CUDA GPU is visible: use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda")
    return device


def load(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    n_ctx: int | None = None,
    n_threads: int | None = None,
) -> Backend:
    """The model at `path` (see the module docstring) ready to generate.

    `dtype` and `device` apply to torch models; `n_ctx` (default: the model's) to GGUF files;
    `n_threads` sets the CPU threads of either (torch's is process-wide).
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
    """An albor or transformers checkpoint dir with its `tokenizer.json`."""
    import torch
    from tokenizers import Tokenizer

    from albor.model.hf import load_pretrained

    if n_threads is not None:
        torch.set_num_threads(n_threads)
    tok_path = directory / TOKENIZER_JSON
    if not tok_path.is_file():
        raise ArtifactError(
            f"{directory}: no {TOKENIZER_JSON} beside the weights: copy the tokenizer the model "
            "was trained with into the model directory"
        )
    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
        raise ArtifactError(f"{tok_path}: not a readable tokenizer: {e}") from e
    model, _ = load_pretrained(directory, device=pick_device(device), dtype=torch_dtype(dtype))
    return TorchBackend(model, tokenizer, name=directory.name)


def _llamacpp() -> Any:
    """albor's llama.cpp wrapper; a missing llama-cpp-python is named with its install line."""
    try:
        return importlib.import_module("albor.infer.llamacpp")
    except ImportError as e:
        raise ConfigError(f"running a GGUF file needs llama-cpp-python: {GGUF_INSTALL}") from e


class GGUFBackend:
    """A GGUF file run by llama.cpp, behind the same interface as the torch engine.

    llama.cpp generates one sequence at a time here, so a batch of prompts runs row after row,
    row r sampled with seed + r.
    Token healing's restricted first token is drawn from `next_logits` with albor's sampler; the
    rest comes from llama.cpp's own sampling.
    """

    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self._name = name
        self._texts: list[str] | None = None
        self._sentinels = {slot: model.token_id(tok) for slot, tok in SENTINELS.items()}

    @classmethod
    def open(
        cls, path: Path, *, n_ctx: int | None = None, n_threads: int | None = None
    ) -> GGUFBackend:
        if not path.is_file():
            raise ConfigError(f"{path}: no such GGUF file")
        model = _llamacpp().LlamaCppModel(path, n_ctx=n_ctx, n_threads=n_threads)
        return cls(model, path.name)

    @property
    def name(self) -> str:
        return self._name

    @property
    def n_ctx(self) -> int:
        return int(self.model.n_ctx)

    @property
    def eos_id(self) -> int | None:
        eos: int | None = self.model.token_id(EOS)
        return eos

    @property
    def stop_ids(self) -> Sequence[int]:
        found = (self.model.token_id(t) for t in SPECIAL_TOKENS)
        return [i for i in found if i is not None]

    def tokenize(self, text: str) -> list[int]:
        return list(self.model.tokenize(text, special=True))

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.model.detokenize(list(ids)))

    def fim_prompt(self, prefix: str, suffix: str, mode: Mode) -> list[int]:
        missing = [SENTINELS[s] for s, i in self._sentinels.items() if i is None]
        if missing:
            raise ConfigError(
                f"{self.name} has no {', '.join(missing)} token: it cannot fill in the middle "
                "(leave out --suffix)"
            )
        ids: list[int] = []
        for slot in ORDER[mode][:2]:
            ids.append(int(self._sentinels[slot]))
            ids += self.model.tokenize(prefix if slot == "prefix" else suffix, special=False)
        return [*ids, int(self._sentinels["middle"])]

    def token_texts(self) -> Sequence[str]:
        if self._texts is None:
            specials = {self.model.token_id(t) for t in SPECIAL_TOKENS} - {None}
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
