"""The teacher of a distillation: what the plan must know of it, and the model apply runs.

A teacher is a checkpoint directory albor can load (its own, or a transformers Llama / Qwen2
model: `config.json`, safetensors weights, `tokenizer.json`). Logit distillation compares the
teacher's and the student's distributions token by token, so both must speak the same tokenizer:
the same vocabulary (every token string at the same id), the same merges and the same special
tokens. `tokenizer_differences` says what differs, in words a user can act on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from albor.data.bpe import TOKENIZER_JSON
from albor.errors import ArtifactError
from albor.model.config import ModelConfig
from albor.model.estimate import flops_per_token, param_count

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


def read_teacher(directory: Path) -> TeacherFacts:
    """The teacher's config, size and tokenizer identity; ArtifactError naming what is missing."""
    from albor.model.load import require_checkpoint

    config = require_checkpoint(directory, "teacher")
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


def load_teacher(directory: Path, device: Any, precision: str) -> Any:
    """The teacher `GPT`, in bf16 when the student trains in bf16 (it only runs forward) and fp32
    otherwise; the `Distill` objective puts it in eval mode with gradients off."""
    import torch

    from albor.model.hf import load_pretrained

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, _ = load_pretrained(directory, device=device, dtype=dtype)
    return model
