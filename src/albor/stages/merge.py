"""merge: one model from several of the same architecture and tokenizer (linear, SLERP, task
arithmetic, TIES, DARE).

Inputs are checkpoint directories (albor outputs or transformers Llama / Qwen2 directories) in
`models`, and for the methods that add task vectors a `base` they were finetuned from. The plan
reads config.json, the safetensors headers and tokenizer.json only: every model (and the base)
must have the same `ModelConfig` (each differing field is named with its values) and the same
tokenizer.json bytes (the files are named with their hashes), and hold every tensor the config
calls for. The mathematics is `albor.model.transforms.merge`, whose docstring says which
convention TIES and DARE follow.

Apply streams the checkpoints one tensor at a time (float32 for the arithmetic, the first model's
dtype for the result), so memory is the merged model plus a few float32 copies of the largest
tensor, not every model at once. The artifact is a checkpoint dir as pretrain writes one:
config.json, model.safetensors and the first model's tokenizer files (and generation_config.json
when it has one); it loads with transformers' AutoModelForCausalLM and with `albor complete`.
A tied lm_head stays tied: the embedding is merged once and the head shares it. The manifest's
metrics record the method and every parameter it used, and for SLERP each tensor's endpoint
cosine and norm ratio ||merged|| / max(||a||, ||b||) (`slerp_norms`: the evidence that the
report's FALSIFY-ALBOR-007 is decided on).
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BeforeValidator, Field, model_validator

from albor.errors import ArtifactError
from albor.model.estimate import format_count
from albor.model.transforms.merge import MergeSpec, Method, Schedule
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input

if TYPE_CHECKING:
    import torch

    from albor.model.config import ModelConfig

NAME = "merge"
INPUTS = ("models", "base")

_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Beside the weights and config.json, what the merged directory takes from the first model.
_COPIED = ("generation_config.json",)


def _as_list(value: Any) -> Any:
    """A single path (as a pipeline `needs:` of one stage gives it) is a list of one."""
    return [value] if isinstance(value, str | Path) else value


Anchors = float | list[float]


class Config(OutputConfig):
    models: Annotated[list[Path], BeforeValidator(_as_list)] = Field(
        default_factory=list,
        description="Checkpoint directories to merge (albor outputs or transformers Llama / "
        "Qwen2 directories with tokenizer.json), in order: SLERP goes from the first (t = 0) to "
        "the second (t = 1); the result takes the first's dtype and tokenizer files.",
    )
    base: Path | None = Field(
        None,
        description="The model the others were finetuned from (task_arithmetic, ties, "
        "dare_linear, dare_ties: each model contributes its task vector model - base).",
    )
    method: Method = Field(
        description="linear (weighted mean), slerp (two models, spherical per tensor), "
        "task_arithmetic (base + sum of weighted task vectors), ties (trim, elect sign, disjoint "
        "mean), dare_linear / dare_ties (random drop and rescale, then a sum or TIES' consensus).",
    )
    weights: list[float] | None = Field(
        None,
        description="One weight per model, in the order of `models`. linear: normalised by "
        "their sum (default equal). Other base methods: each task vector's scale (default 1.0).",
    )
    t: Anchors = Field(
        0.5,
        description="slerp: interpolation from the first model (0) to the second (1); a list is "
        "a gradient of anchors spread over the blocks (embeddings, final norm and lm_head take "
        "the first anchor).",
    )
    t_rules: dict[str, Anchors] = Field(
        default_factory=dict,
        description="slerp: per tensor-name `t` overrides: a tensor whose name contains the key "
        "(e.g. self_attn, mlp) takes its value; the first matching key wins.",
    )
    density: float = Field(
        0.2,
        description="ties: fraction of each task vector's entries kept, by magnitude (the "
        "TIES paper's 20%).",
    )
    drop_p: float = Field(
        0.5,
        description="dare_linear / dare_ties: probability of dropping each task-vector entry; "
        "survivors are scaled by 1 / (1 - drop_p).",
    )
    seed: int = Field(0, description="Seed of DARE's draws (each tensor's from seed and name).")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        problems = self.spec().problems(len(self.models), self.base is not None)
        used = {
            "weights": self.method != "slerp",
            "t": self.method == "slerp",
            "t_rules": self.method == "slerp",
            "density": self.method == "ties",
            "drop_p": self.method.startswith("dare"),
        }
        for name, needed in used.items():
            if name in self.model_fields_set and not needed:
                problems.append(f"{name}: method {self.method} does not use it: remove it")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def spec(self) -> MergeSpec:
        def anchors(value: Anchors) -> float | tuple[float, ...]:
            return tuple(value) if isinstance(value, list) else value

        return MergeSpec(
            method=self.method,
            weights=tuple(self.weights) if self.weights is not None else None,
            t=Schedule(anchors(self.t), tuple((k, anchors(v)) for k, v in self.t_rules.items())),
            density=self.density,
            drop_p=self.drop_p,
            seed=self.seed,
        )

    def parameters(self) -> dict[str, Any]:
        """The parameters the method uses, resolved (the manifest records them)."""
        spec = self.spec()
        found: dict[str, Any] = {"weights": list(spec.weights_for(len(self.models)))}
        if self.method == "slerp":
            found = {"t": self.t, "t_rules": self.t_rules}
        elif self.method == "ties":
            found["density"] = self.density
        elif self.method.startswith("dare"):
            found.update(drop_p=self.drop_p, seed=self.seed)
        return found


@dataclass(frozen=True)
class ModelInfo:
    """A checkpoint as the plan reads it: config, headers and tokenizer, not the weights."""

    directory: Path
    config: ModelConfig
    raw: dict[str, Any]  # config.json as written: the token ids are taken from it
    tensors: dict[str, str]  # tensor name -> safetensors file holding it
    dtypes: dict[str, str]  # tensor name -> stored dtype
    weight_bytes: int
    tokenizer_sha256: str


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of `config` holds and their shapes; a tied lm_head is not one."""
    import torch

    from albor.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def read_model(directory: Path) -> ModelInfo:
    """Config, safetensors headers and tokenizer hash of a checkpoint dir; ArtifactError naming
    the file and the fix when one is missing, unreadable or lacks a tensor."""
    from safetensors import SafetensorError, safe_open

    from albor.artifact import sha256_file
    from albor.data.bpe import TOKENIZER_JSON
    from albor.model.hf import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, weight_files
    from albor.model.load import require_checkpoint

    config = require_checkpoint(directory, "model")
    raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    tensors: dict[str, str] = {}
    dtypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    path = directory / WEIGHTS_FILE  # the file read first; a shard's path once it is read
    try:
        files = weight_files(directory)
        for fname, names in files.items():
            path = directory / fname
            if not path.is_file():
                raise ArtifactError(f"{path} is named in {INDEX_FILE} but missing")
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    header = f.get_slice(name)
                    tensors[name] = fname
                    dtypes[name] = _DTYPES.get(header.get_dtype(), header.get_dtype())
                    shapes[name] = tuple(header.get_shape())
    except SafetensorError as e:
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({e}): the weights are damaged; write the "
            "checkpoint again"
        ) from e
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(tensors))
    wrong = [
        f"{k} {shapes[k]} (config.json: {v})"
        for k, v in expected.items()
        if k in shapes and shapes[k] != v
    ]
    if missing or wrong:
        raise ArtifactError(
            f"{directory}: weights do not match config.json: missing {missing or 'none'}, "
            f"wrong shapes {wrong or 'none'}: point at a complete checkpoint"
        )
    odd = sorted({dtypes[k] for k in expected} - set(_BYTES))
    if odd:
        raise ArtifactError(
            f"{directory}: weights stored as {', '.join(odd)}: albor merges float32, bfloat16 "
            "and float16 checkpoints"
        )
    weight_bytes = sum((directory / f).stat().st_size for f in files)
    return ModelInfo(
        directory,
        config,
        raw,
        tensors,
        dtypes,
        weight_bytes,
        sha256_file(directory / TOKENIZER_JSON),
    )


def architecture_problems(infos: list[tuple[str, ModelInfo]]) -> list[str]:
    """Each ModelConfig field in which a model differs from the first, with both values."""
    (ref_label, ref), *others = infos
    first = ref.config.model_dump()
    found = []
    for label, info in others:
        theirs = info.config.model_dump()
        diff = [f"{k} {theirs[k]} (vs {first[k]})" for k in first if theirs[k] != first[k]]
        if diff:
            found.append(f"{label} {info.directory}: {', '.join(diff)}")
    if not found:
        return []
    return [
        f"architectures differ from {ref_label} {ref.directory}: {'; '.join(found)}: merge "
        "only models of one architecture (finetunes of one base)"
    ]


def tokenizer_problems(infos: list[tuple[str, ModelInfo]]) -> list[str]:
    """The tokenizer.json files whose bytes differ from the first's, with their sha256."""
    (ref_label, ref), *others = infos
    differ = [
        f"{info.directory / 'tokenizer.json'} (sha256 {info.tokenizer_sha256[:12]})"
        for _, info in others
        if info.tokenizer_sha256 != ref.tokenizer_sha256
    ]
    if not differ:
        return []
    return [
        f"tokenizers differ from {ref_label}'s {ref.directory / 'tokenizer.json'} (sha256 "
        f"{ref.tokenizer_sha256[:12]}): {', '.join(differ)}: token ids would mean different "
        "text; merge only models that share one tokenizer"
    ]


def _read_all(p: Plan, cfg: Config, ctx: PlanContext) -> list[tuple[str, ModelInfo]] | None:
    """Every input read (checks added); None when one is pending or unreadable."""
    infos: list[tuple[str, ModelInfo]] = []
    complete = True
    if ctx.is_pending("models"):
        p.add("models", "ok", ctx.pending_note("models"))
        complete = False
    else:
        for i, path in enumerate(cfg.models):
            label = f"models[{i}]"
            info = check_input(p, ctx, label, path, read_model, "a checkpoint directory")
            if info is None:
                complete = False
                continue
            infos.append((label, info))
            p.add(
                label,
                "ok",
                f"{path}: {format_count(sum(_numels(info).values()))} parameters, "
                f"{_main_dtype(info)}",
            )
    if cfg.base is not None:
        base = check_input(p, ctx, "base", cfg.base, read_model, "a checkpoint directory")
        if base is None:
            complete = False
        else:
            infos.append(("base", base))
            p.add("base", "ok", f"{cfg.base}: {_main_dtype(base)}")
    return infos if complete else None


def _numels(info: ModelInfo) -> dict[str, int]:
    return {k: math.prod(v) for k, v in expected_tensors(info.config).items()}


def _main_dtype(info: ModelInfo) -> str:
    return info.dtypes.get("model.embed_tokens.weight", "float32")


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    p = Plan(NAME)
    ctx = ctx or PlanContext()
    infos = _read_all(p, cfg, ctx)
    if infos is None:
        return p
    arch = architecture_problems(infos)
    p.require(
        "architecture",
        not arch,
        f"{len(infos)} checkpoints share one architecture",
        "; ".join(arch),
    )
    toks = tokenizer_problems(infos)
    p.require(
        "tokenizer",
        not toks,
        f"one tokenizer.json (sha256 {infos[0][1].tokenizer_sha256[:12]})",
        "; ".join(toks),
    )
    if arch:
        return p
    first = infos[0][1]
    numels = _numels(first)
    inputs = len(infos)
    out_bytes = sum(n * _BYTES[first.dtypes[k]] for k, n in numels.items())
    # Held at once: the merged model in its dtype, its serialised copy, and for the tensor being
    # merged each input as read and in float32, the stacked deltas, the result, and SLERP's two
    # float64 copies for the angle.
    working = (3 * inputs + 6) * max(numels.values()) * 4
    p.estimates["parameters"] = {
        "total": sum(numels.values()),
        "human": format_count(sum(numels.values())),
    }
    p.estimates["memory_bytes"] = 2 * out_bytes + working
    p.estimates["whole_models_fp32_bytes"] = inputs * sum(numels.values()) * 4
    tok_bytes = sum(
        (first.directory / f).stat().st_size
        for f in _tokenizer_files(first.directory) + list(_COPIED)
        if (first.directory / f).is_file()
    )
    p.estimates["disk_bytes"] = out_bytes + tok_bytes
    p.estimates["dtype"] = _main_dtype(first)
    spec = cfg.spec()
    shown = ", ".join(f"{k}={v}" for k, v in cfg.parameters().items())
    what = f"{len(cfg.models)} models" + (f" onto base {cfg.base}" if cfg.base else "")
    p.actions.append(f"merge {what} by {spec.method} ({shown}), per tensor in float32")
    p.actions.append(
        f"write the merged model in {_main_dtype(first)} (HF layout, tokenizer of models[0]) to "
        f"{cfg.output}"
    )
    return p


def _tokenizer_files(directory: Path) -> list[str]:
    from albor.data.bpe import TOKENIZER_FILES

    return [f for f in TOKENIZER_FILES if (directory / f).is_file()]


class _Weights:
    """A checkpoint's safetensors files, open for reading one tensor at a time."""

    def __init__(self, info: ModelInfo, stack: ExitStack) -> None:
        from safetensors import safe_open

        self.info = info
        self.files = {
            f: stack.enter_context(safe_open(str(info.directory / f), framework="pt"))
            for f in set(info.tensors.values())
        }

    def get(self, name: str) -> torch.Tensor:
        tensor: torch.Tensor = self.files[self.info.tensors[name]].get_tensor(name)
        return tensor


class SlerpNorms:
    """The evidence of SLERP's norm bound (FALSIFY-ALBOR-007), tensor by tensor: the cosine of
    the endpoints and ||merged|| / max(||a||, ||b||), measured on the merged tensor as written
    (in the output dtype), against `albor.evals.contracts.slerp_norm_bound`."""

    def __init__(self) -> None:
        self.tensors: dict[str, dict[str, float]] = {}

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor, merged: torch.Tensor) -> None:
        # float64: a float32 sum of squares of a large tensor loses the digits the bound is
        # judged on.
        x, y = a.reshape(-1).double(), b.reshape(-1).double()
        na, nb = float(x.norm()), float(y.norm())
        cos = float(x @ y) / (na * nb) if na and nb else 1.0
        del x, y  # freed before the result is read: the plan counts two float64 copies at once
        largest = max(na, nb)
        ratio = float(merged.reshape(-1).double().norm()) / largest if largest else 0.0
        self.tensors[name] = {"cos": min(1.0, max(-1.0, cos)), "ratio": ratio}

    def figures(self) -> dict[str, Any]:
        from albor.evals.contracts import slerp_norm_bound

        if not self.tensors:
            return {"tensors": 0}
        widest = max(self.tensors, key=lambda n: self.tensors[n]["ratio"])
        return {
            "tensors": len(self.tensors),
            "max_ratio": self.tensors[widest]["ratio"],
            "max_ratio_tensor": widest,
            "max_ratio_to_bound": max(
                t["ratio"] / slerp_norm_bound(t["cos"]) for t in self.tensors.values()
            ),
            "min_cos": min(t["cos"] for t in self.tensors.values()),
            "obtuse_tensors": sum(t["cos"] < 0 for t in self.tensors.values()),
            "per_tensor": self.tensors,
        }


def _token_id(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    import torch

    from albor.model.gpt import GPT
    from albor.model.hf import save_pretrained
    from albor.model.transforms.merge import merge_tensor, num_layers
    from albor.progress import track

    models = [read_model(p) for p in cfg.models]
    base = read_model(cfg.base) if cfg.base is not None else None
    labelled = [(f"models[{i}]", m) for i, m in enumerate(models)]
    labelled += [("base", base)] if base is not None else []
    problems = architecture_problems(labelled) + tokenizer_problems(labelled)
    if problems:
        raise ArtifactError("; ".join(problems))
    spec = cfg.spec()
    first = models[0]
    names = list(expected_tensors(first.config))
    layers = num_layers(names)
    merged: dict[str, torch.Tensor] = {}
    norms = SlerpNorms() if spec.method == "slerp" else None
    with ExitStack() as stack:
        readers = [_Weights(m, stack) for m in models]
        base_reader = _Weights(base, stack) if base is not None else None
        for name in track(names, f"merge ({spec.method})"):
            inputs = [r.get(name) for r in readers]
            merged[name] = merge_tensor(
                name,
                inputs,
                spec,
                base=base_reader.get(name) if base_reader is not None else None,
                layers=layers,
            )
            if norms is not None:
                norms.add(name, inputs[0], inputs[1], merged[name])
            del inputs
    with torch.device("meta"):
        model = GPT(first.config)
    model.load_state_dict(merged, strict=False, assign=True)
    model.tie_weights()  # assign=True replaced the embedding Parameter; the head shares it again
    eos = _token_id(first.raw, "eos_token_id")
    if eos is None:
        from albor.data.bpe import special_tokens

        eos = special_tokens(first.directory).ids["eos"]
    save_pretrained(
        model,
        first.config,
        ctx.out,
        eos_token_id=eos,
        bos_token_id=_token_id(first.raw, "bos_token_id"),
        pad_token_id=_token_id(first.raw, "pad_token_id"),
    )
    for f in _tokenizer_files(first.directory) + [
        c for c in _COPIED if (first.directory / c).is_file()
    ]:
        shutil.copyfile(first.directory / f, ctx.out / f)
    parameters = cfg.parameters()
    total = sum(t.numel() for t in merged.values())
    return Outcome(
        summary=f"{spec.method} merge of {len(models)} models: {format_count(total)} parameters",
        metrics={
            "method": spec.method,
            "parameters": parameters,
            "models": [str(m.directory) for m in models],
            "base": str(base.directory) if base is not None else None,
            "tensors": len(merged),
            "dtype": _main_dtype(first),
            **({"slerp_norms": norms.figures()} if norms is not None else {}),
        },
    )
