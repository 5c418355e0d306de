"""Generation: the KV-cache path equals naive recomputation, sampling is seeded, stops stop."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from albor.errors import ConfigError
from albor.infer.engine import complete, generate, healing_candidates, next_token
from albor.model.gpt import GPT
from albor.model.presets import preset


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", max_seq_len=32)).eval()


def _naive_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


def test_greedy_with_cache_equals_naive_loop(model: GPT) -> None:
    prompt = [5, 17, 300, 2, 9]
    stream = generate(model, prompt, max_new_tokens=12)
    ours = [next(stream)]
    assert not torch.is_inference_mode_enabled()  # the suspended stream does not leak it
    ours += list(stream)
    assert ours == _naive_greedy(model, prompt, 12)


def test_generation_stops_at_the_context_limit(model: GPT) -> None:
    out = list(generate(model, [1, 2, 3], max_new_tokens=100))
    assert len(out) == 32 - 3 + 1  # the last token is predicted from a full context
    long_prompt = list(range(40))  # longer than the context: keeps the last 32 tokens
    out = list(generate(model, long_prompt, max_new_tokens=5))
    assert out == _naive_greedy(model, long_prompt[-32:], 1)


def test_seeded_sampling_is_reproducible(model: GPT) -> None:
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9)
    a = list(generate(model, [1, 2, 3], seed=7, **kw))
    b = list(generate(model, [1, 2, 3], seed=7, **kw))
    c = list(generate(model, [1, 2, 3], seed=8, **kw))
    assert a == b and len(a) == 10
    assert a != c


def test_stop_token_ends_generation(model: GPT) -> None:
    greedy = list(generate(model, [4, 5, 6], max_new_tokens=10))
    stop = greedy[3]
    first = greedy.index(stop)
    out = list(generate(model, [4, 5, 6], max_new_tokens=10, stop_token_ids=[stop]))
    assert out == greedy[:first]


def test_stop_strings_end_generation(model: GPT) -> None:
    greedy = list(generate(model, [4, 5, 6], max_new_tokens=10))
    decode = lambda ids: " ".join(f"<{i}>" for i in ids)  # noqa: E731
    out = list(
        generate(
            model, [4, 5, 6], max_new_tokens=10, stop_strings=[f"<{greedy[2]}>"], decode=decode
        )
    )
    assert out == greedy[: greedy.index(greedy[2]) + 1]


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    gen = torch.Generator().manual_seed(0)
    assert all(
        next_token(logits, temperature=2.0, top_k=1, generator=gen) == best for _ in range(20)
    )
    assert all(
        next_token(logits, temperature=2.0, top_p=1e-6, generator=gen) == best for _ in range(20)
    )
    draws = {next_token(logits, temperature=1.0, top_k=3, generator=gen) for _ in range(200)}
    assert draws <= set(torch.topk(logits, 3).indices.tolist()) and len(draws) > 1


def test_bad_sampling_arguments(model: GPT) -> None:
    # Raised at the call, before any token is drawn.
    with pytest.raises(ConfigError, match="temperature"):
        generate(model, [1], max_new_tokens=2, temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        generate(model, [1], max_new_tokens=2, top_p=1.5)
    with pytest.raises(ConfigError, match="top_k"):
        generate(model, [1], max_new_tokens=2, temperature=1.0, top_k=0)
    with pytest.raises(ConfigError, match="decode"):
        generate(model, [1], max_new_tokens=2, stop_strings=["x"])
    with pytest.raises(ConfigError, match="prompt"):
        generate(model, [], max_new_tokens=2)
    assert list(generate(model, [1], max_new_tokens=0)) == []


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 20
    tok.train_from_iterator(text, trainer)
    return tok


def test_complete_returns_text_and_stops_at_eos() -> None:
    tok = _tokenizer()
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.get_vocab_size(), max_seq_len=64)).eval()
    eos = tok.token_to_id("<|endoftext|>")
    prefix = "def add(a, b):\n"
    prompt = [eos, *tok.encode(prefix).ids]  # a completion starts a document, as in training
    greedy = list(generate(model, prompt, max_new_tokens=8, stop_token_ids=[eos]))
    text = complete(model, tok, prefix, max_new_tokens=8, heal=False)
    assert text == tok.decode(greedy) and text
    cut = text[len(text) // 2 :]
    assert (
        complete(model, tok, prefix, max_new_tokens=8, stop_strings=[cut], heal=False)
        == text[: text.index(cut)]
    )
    # Force EOS: the final norm outputs ones and only EOS's head row is all ones (logit 64).
    with torch.no_grad():
        model.lm_head.weight[eos] = 1.0
    hook = model.model.norm.register_forward_hook(lambda m, args, out: torch.ones_like(out))
    assert list(generate(model, [5], max_new_tokens=3)) == [eos] * 3
    assert complete(model, tok, prefix, max_new_tokens=8, heal=False) == ""
    hook.remove()


def test_token_healing_regenerates_the_cut_token() -> None:
    tok = _tokenizer()
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.get_vocab_size(), max_seq_len=64)).eval()
    eos = tok.token_to_id("<|endoftext|>")
    prefix = "def add(a, b):\n    return a +"
    ids = tok.encode(prefix).ids
    text, candidates = healing_candidates(tok, ids[-1])
    assert text == "+" or text.endswith("+")
    assert ids[-1] in candidates
    assert all(tok.decode([c]).startswith(text) for c in candidates)
    healed = complete(model, tok, prefix, max_new_tokens=6)
    # Same as generating from the prompt without its last token, first token restricted.
    raw = list(
        generate(
            model,
            [eos, *ids[:-1]],
            max_new_tokens=7,
            stop_token_ids=[eos],
            first_token_ids=candidates,
        )
    )
    assert raw[0] in candidates
    full = tok.decode([eos, *ids[:-1], *raw], skip_special_tokens=False)
    assert full == tok.decode([eos, *ids[:-1]], skip_special_tokens=False) + text + healed
