"""The teacher of a distillation: what the plan must know of it, and the model apply runs.

A teacher is a checkpoint directory albor can load (its own, or a transformers Llama / Qwen2
model: `config.json`, safetensors weights, `tokenizer.json`). Logit distillation compares the
teacher's and the student's distributions token by token, so both must speak the same tokenizer:
the same vocabulary (every token string at the same id), the same merges and the same special
tokens. `tokenizer_differences` says what differs, in words a user can act on, and
`check_tokenizer` is the plan check every stage that pairs a teacher with token data makes.

An offline teacher is a `teacher_logits` artifact: the teacher's top-k next-token (ids,
log-probabilities) at every position of every aligned window of the train split (window w of
shard s is tokens `[w * T, w * T + T + 1)`, `data/windows.aligned_window`), so the student,
drawing the same windows, reads row t as the teacher's distribution of token t + 1. Layout:

    logits.json                  data digest, tokenizer sha256, teacher (path, digest),
                                 temperature, top_k, seq_len, vocab_size, ids dtype, the row-mass
                                 tolerance, and per train shard its window count
    train/shard-00000/ids.npy    (windows, T, k) token ids, uint16 when the vocab fits, else uint32
    train/shard-00000/logprobs.npy  (windows, T, k) fp16 log-probabilities, most likely first

A shard too short for one window has no directory. The sha256 and size of every file are in the
artifact's manifest; `verify_logits` checks them before a student trains on them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from albor.artifact import atomic_write_json, require_artifact, sha256_file
from albor.data.bpe import TOKENIZER_JSON
from albor.errors import ArtifactError, DataError
from albor.model.config import ModelConfig
from albor.model.estimate import flops_per_token, param_count

if TYPE_CHECKING:
    from albor.plan import Plan

# Bytes of one weight as the teacher is held in each precision the student trains in: the
# teacher only runs forward, so under bf16 it is kept in bf16.
TEACHER_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class TeacherFacts:
    """A teacher as the plan sees it, read from its files without loading the weights."""

    directory: Path
    config: ModelConfig
    parameters: int
    tokenizer_sha256: str

    def memory_bytes(self, precision: str) -> int:
        return self.parameters * TEACHER_BYTES[precision]

    def forward_flops_per_token(self, seq_len: int) -> float:
        """A forward pass is a third of a training step's 6N + attention FLOPs."""
        return flops_per_token(self.config, seq_len) / 3


def read_teacher(directory: Path, role: str = "teacher") -> TeacherFacts:
    """The config, size and tokenizer identity of the checkpoint a stage reads as its `role`
    (teacher, student); ArtifactError naming what is missing."""
    from albor.model.load import require_checkpoint

    if directory.is_file():
        raise ArtifactError(
            f"{role} {directory} is a file: point {role} at the checkpoint directory that holds "
            "config.json, model.safetensors and tokenizer.json"
        )
    config = require_checkpoint(directory, role)
    tokenizer = directory / TOKENIZER_JSON
    return TeacherFacts(
        directory=directory,
        config=config,
        parameters=param_count(config),
        tokenizer_sha256=hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
    )


def _tokenizer_parts(path: Path) -> dict[str, Any]:
    """What makes two tokenizers the same for logits: vocab, merges, special-token ids, and the
    pipeline that turns text into pieces (normalizer, pre-tokenizer)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable tokenizer.json: {e}") from e
    model = d.get("model") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    added = {t["content"]: t["id"] for t in d.get("added_tokens") or []}
    return {
        "type": model.get("type"),
        "vocab": model.get("vocab") or {},
        "merges": merges,
        "special": added,
        "normalizer": d.get("normalizer"),
        "pre_tokenizer": d.get("pre_tokenizer"),
    }


def tokenizer_differences(teacher: Path, student: Path) -> list[str]:
    """How the tokenizer in directory `teacher` differs from the one in `student` (empty: the
    same for distillation), each difference in a short phrase with an example."""
    a = _tokenizer_parts(teacher / TOKENIZER_JSON)
    b = _tokenizer_parts(student / TOKENIZER_JSON)
    found: list[str] = []
    if a["type"] != b["type"]:
        found.append(f"model type {a['type']} vs {b['type']}")
    va, vb = a["vocab"], b["vocab"]
    if len(va) != len(vb):
        found.append(f"vocabulary {len(va):,} vs {len(vb):,} tokens")
    moved = sorted(t for t in va.keys() & vb.keys() if va[t] != vb[t])
    only = sorted(va.keys() ^ vb.keys())
    if moved:
        found.append(f"{len(moved):,} tokens at other ids (e.g. {moved[0]!r})")
    if only:
        found.append(f"{len(only):,} tokens in one vocabulary only (e.g. {only[0]!r})")
    if a["merges"] != b["merges"]:
        n = sum(x != y for x, y in zip(a["merges"], b["merges"], strict=False))
        n += abs(len(a["merges"]) - len(b["merges"]))
        found.append(f"merges differ ({n:,} of {max(len(a['merges']), len(b['merges'])):,})")
    if a["special"] != b["special"]:
        diff = sorted(
            t
            for t in a["special"].keys() | b["special"].keys()
            if a["special"].get(t) != b["special"].get(t)
        )
        shown = ", ".join(
            f"{t} {a['special'].get(t, 'absent')} vs {b['special'].get(t, 'absent')}"
            for t in diff[:3]
        )
        found.append(f"special-token ids differ ({shown})")
    for part in ("normalizer", "pre_tokenizer"):
        if a[part] != b[part]:
            found.append(f"the {part.replace('_', '-')} differs")
    return found


def check_tokenizer(
    p: Plan, teacher: Path, data: Path, *, role: str = "teacher", check: str = "tokenizer"
) -> bool:
    """The plan check `check` that the model in directory `teacher` (the run's `role`: teacher,
    student) speaks the tokenizer of the token data in `data`; False (with a failing check
    saying how they differ and what to do) if not."""
    try:
        differences = tokenizer_differences(teacher, data)
    except ArtifactError as e:
        p.add(check, "fail", str(e))
        return False
    return p.require(
        check,
        not differences,
        f"the {role} and the data share one tokenizer",
        f"the {role}'s tokenizer differs from the data's: {'; '.join(differences)}. Logit "
        "distillation compares distributions id by id: tokenize the corpus with the "
        f"{role}'s tokenizer (tokenizer stage `adopt: {role.upper()}_DIR`), or use a {role} "
        "trained on this tokenizer",
    )


def load_teacher(directory: Path, device: Any, precision: str) -> Any:
    """The teacher `GPT`, in bf16 when the student trains in bf16 (it only runs forward) and fp32
    otherwise; the `Distill` objective puts it in eval mode with gradients off."""
    import torch

    from albor.model.hf import load_pretrained

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, _ = load_pretrained(directory, device=device, dtype=dtype)
    return model


# --- offline teachers: the teacher_logits artifact -----------------------------------------------

LOGITS_STAGE = "teacher_logits"
LOGITS_INDEX = "logits.json"
LOGITS_FORMAT = 1
IDS_FILE = "ids.npy"
LOGPROBS_FILE = "logprobs.npy"


def logits_shard_dir(number: int) -> str:
    """The directory of train shard `number`'s logits, relative to the artifact."""
    return f"train/shard-{number:05d}"


def row_mass_tolerance(k: int) -> float:
    """How far above 1 the k stored probabilities of a row may sum before the row is corrupt.

    fp16 rounds a log-probability lp to within |lp| * 2^-11, which scales exp(lp) by at most
    1 + |lp| * 2^-11; over a row the excess is at most 2^-11 * sum(p * |lp|) <= 2^-11 * ln k
    (no k probabilities summing to at most 1 have more entropy), at most 2^-11 for k <= 2.
    Twice that bound leaves room for the fp32 softmax the values came from: 0.0034 at k = 32.
    """
    return 2.0**-10 * max(math.log(k), 1.0)


def check_logit_rows(
    logprobs: np.ndarray, tolerance: float, *, where: str, first_window: int = 0
) -> float:
    """Teacher-logit integrity (FALSIFY-006): every row of `logprobs` (windows, T, k) is finite
    and its probabilities sum to at most 1 + `tolerance`. Returns the largest row mass;
    DataError naming `where`, the window (counted from `first_window`) and the position of the
    first bad row."""
    values = np.asarray(logprobs, dtype=np.float64)
    finite = np.asarray(np.isfinite(values).all(axis=-1))
    with np.errstate(over="ignore", invalid="ignore"):
        mass = np.exp(values).sum(axis=-1)
    bad = ~finite | ~(mass <= 1.0 + tolerance)
    if bad.any():
        w, t = (int(i) for i in np.argwhere(bad)[0])
        row = values[w, t]
        why = (
            f"a non-finite log-probability ({row[~np.isfinite(row)][0]})"
            if not finite[w, t]
            else f"probabilities summing to {mass[w, t]:.6f} > 1 + {tolerance:.2g}"
        )
        raise DataError(
            f"{where}: window {first_window + w}, position {t}: the teacher's top-k row has "
            f"{why}. A teacher whose softmax is not a distribution cannot be distilled: check "
            "the teacher's weights (NaN or overflow; try precision: fp32)"
        )
    return float(mass[finite].max()) if finite.any() else 0.0


@dataclass(frozen=True)
class LogitShard:
    """One train shard's logits: the token shard they describe, its aligned windows, and the
    directory of its files (None: no window, no files)."""

    data_shard: str  # the token shard's path in the data artifact
    windows: int
    directory: str | None


@dataclass(frozen=True)
class LogitsIndex:
    """`logits.json` of a teacher_logits artifact: what the logits belong to and how they were
    made."""

    data_digest: str
    tokenizer_sha256: str
    teacher_path: str
    teacher_digest: str
    temperature: float
    top_k: int
    seq_len: int
    vocab_size: int
    ids_dtype: str
    row_mass_tolerance: float
    shards: list[LogitShard]

    @property
    def windows(self) -> int:
        return sum(s.windows for s in self.shards)

    def write(self, directory: Path) -> None:
        atomic_write_json(directory / LOGITS_INDEX, {"format": LOGITS_FORMAT, **asdict(self)})

    @classmethod
    def load(cls, directory: Path) -> LogitsIndex:
        """The index of the finished teacher_logits artifact in `directory` (only its manifest
        and index are read); ArtifactError naming what is wrong."""
        if not directory.is_dir():
            what = "is a file" if directory.exists() else "does not exist"
            raise ArtifactError(
                f"teacher_logits {directory} {what}: point it at the output directory of a "
                "teacher_logits stage (run `albor teacher_logits apply` first)"
            )
        require_artifact(directory, LOGITS_STAGE)
        path = directory / LOGITS_INDEX
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.pop("format") != LOGITS_FORMAT:
                raise ValueError(f"format is not {LOGITS_FORMAT}")
            shards = [
                LogitShard(str(s["data_shard"]), int(s["windows"]), s["directory"])
                for s in data["shards"]
            ]
            return cls(**{**data, "shards": shards})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(
                f"{path}: unreadable teacher-logits index ({type(e).__name__}: {e}): re-run "
                "the teacher_logits stage"
            ) from e


def verify_logits(directory: Path, *, hashes: bool = True) -> int:
    """Check every file of the teacher_logits artifact in `directory` against its manifest:
    present and of its size, and (`hashes`) of its sha256, which reads every byte; the plan
    checks sizes (cheap: a truncated file), apply hashes before a student trains on them.
    ArtifactError naming the first file that is missing, of another size or another sha256.
    Returns the bytes checked."""
    from albor import progress

    outputs = require_artifact(directory, LOGITS_STAGE)["outputs"]
    total = sum(int(o["bytes"]) for o in outputs)
    fix = "re-run the teacher_logits stage (its output was changed or damaged)"
    for out in outputs:
        path = directory / out["path"]
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing: {fix}")
        size = path.stat().st_size
        if size != out["bytes"]:
            raise ArtifactError(
                f"{path}: {size:,} bytes where the manifest records {out['bytes']:,} "
                f"(truncated or changed): {fix}"
            )
    if not hashes:
        return total
    with progress.bar("verify teacher logits", total, unit="bytes") as bar:
        for out in outputs:
            path = directory / out["path"]
            if sha256_file(path) != out["sha256"]:
                raise ArtifactError(f"{path}: sha256 differs from the manifest's: {fix}")
            bar.advance(int(out["bytes"]))
    return total


def open_logits(directory: Path, index: LogitsIndex) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Each train shard's (ids, log-probabilities), memory-mapped read-only, in shard order
    (None for a shard without windows); ArtifactError for a file of another shape or dtype."""
    found: list[tuple[np.ndarray, np.ndarray] | None] = []
    for shard in index.shards:
        if shard.directory is None:
            found.append(None)
            continue
        shape = (shard.windows, index.seq_len, index.top_k)
        pair = []
        for name, dtype in ((IDS_FILE, index.ids_dtype), (LOGPROBS_FILE, "float16")):
            path = directory / shard.directory / name
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ArtifactError(f"{path}: unreadable: {e} (re-run teacher_logits)") from e
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                raise ArtifactError(
                    f"{path}: {arr.dtype}{list(arr.shape)} where {LOGITS_INDEX} says "
                    f"{dtype}{list(shape)} (re-run teacher_logits)"
                )
            pair.append(arr)
        found.append((pair[0], pair[1]))
    return found
