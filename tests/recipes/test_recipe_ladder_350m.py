"""The packaged 350M ladder plans as the README says: with a local teacher directory (here a
tiny Qwen2-style transformers model with a Qwen-style tokenizer, built in the test, in the place
the recipe names), every stage's plan passes and the training stages are sized for the GPU
given as `target`."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tokenizers import trainers as tok_trainers

from albor.pipeline import load_pipeline, plan_pipeline

QWEN = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
TRAINING = ("base", "distill", "instruct")


def qwen_style_teacher(directory: Path, vocab_rows: int) -> Path:
    """A byte-level BPE saved as Qwen2.5-Coder's is (eos special, FIM tokens appended as plain
    added tokens) beside a tiny Qwen2ForCausalLM whose embedding pads the vocabulary."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("textwrap.py", "bisect.py", "heapq.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = tok_trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([QWEN[0]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN[1:]])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=QWEN[0]).save_pretrained(str(directory))
    config = Qwen2Config(
        vocab_size=vocab_rows,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("target", ["h100", "a100-80gb"])
def test_the_350m_ladder_plans_for_a_gpu_with_a_local_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    monkeypatch.chdir(tmp_path)
    qwen_style_teacher(tmp_path / "qwen2.5-coder-1.5b", vocab_rows=448)
    sets = [f"{n}.target={target}" for n in TRAINING]
    # The tiny teacher's 405 ids in 448 rows stand for Qwen2.5's 151,665 in 151,936.
    sets += ["base.architecture.vocab_size=448", "distill.architecture.vocab_size=448"]
    pipe = load_pipeline("ladder-350m", sets, workdir=tmp_path / "run")
    pp = plan_pipeline(pipe)
    assert pp.ok, pp.failures()
    kinds = {s.name: pipe.nodes[s.name].kind for s in pp.stages}
    assert {"teacher_logits", "distill", "finetune", "merge", "prune", "quantize"} <= set(
        kinds.values()
    )
    for stage in pp.stages:
        if stage.name in ("base", "distill"):
            est = stage.plan.estimates
            assert est["parameters"]["total"] > 300e6  # the 350m preset
            assert est["wall_time_s"] > 3600  # hours of a GPU, not seconds
            assert target in str(est)
    assert not (tmp_path / "run").exists()  # plan writes nothing
