"""Generation: the KV-cache path equals naive recomputation, sampling is seeded, stops stop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from albor.errors import ConfigError
from albor.infer.engine import generate, next_token
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


# ----- batched generation -------------------------------------------------------------------


def test_the_engine_has_no_attention_of_its_own() -> None:
    # One owner per computation: batched decoding goes through GPT.forward, so a change to the
    # model is made once (the padded-row arithmetic is tested in tests/model/test_gpt.py).
    import albor.infer.engine as engine

    source = Path(engine.__file__).read_text(encoding="utf-8")
    for name in ("scaled_dot_product_attention", "apply_rope", "rope_cos_sin", "self_attn"):
        assert name not in source


def test_batched_rows_of_different_lengths_equal_the_model_alone(model: GPT) -> None:
    from albor.infer.engine import stream_batch

    rows = [[5, 17, 300, 2, 9, 11], [7, 8], [40, 41, 42, 43]]
    got: dict[int, int] = {}
    for row, token in stream_batch(model, rows, max_new_tokens=1):
        if token is not None:
            got[row] = token
    with torch.no_grad():
        want = {i: int(model(torch.tensor([r]))[0, -1].argmax()) for i, r in enumerate(rows)}
    assert got == want


def test_batched_greedy_rows_equal_single_prompt_generation(model: GPT) -> None:
    from albor.infer.engine import stream_batch

    prompts = [[5, 17, 300, 2, 9], [1], [44, 45, 46], [5, 17, 300, 2, 9, 8, 7, 6, 5]]
    single = [list(generate(model, p, max_new_tokens=10)) for p in prompts]
    rows: list[list[int]] = [[] for _ in prompts]
    ended: list[int] = []
    for row, token in stream_batch(model, prompts, max_new_tokens=10):
        if token is None:
            ended.append(row)
        else:
            assert row not in ended
            rows[row].append(token)
    assert rows == single and sorted(ended) == [0, 1, 2, 3]


def test_batched_rows_end_on_their_own(model: GPT) -> None:
    from albor.infer.engine import stream_batch

    prompts = [[1, 2, 3], list(range(10, 30)), [4, 5]]
    alone = [list(generate(model, p, max_new_tokens=40)) for p in prompts]
    stop = alone[2][1]  # a stop token that ends row 2 early
    out: list[list[int]] = [[] for _ in prompts]
    done: set[int] = set()
    for row, token in stream_batch(
        model, prompts, max_new_tokens=[40, 40, 40], stop_token_ids=[stop], done=done
    ):
        if token is not None:
            out[row].append(token)
            if row == 0 and len(out[0]) == 3:
                done.add(0)  # as a stop string found in the text would
    assert out[0] == alone[0][:3]
    # Row 1's 20-token prompt fills the 32-token context after 13 tokens, as it does alone.
    cut1 = alone[1].index(stop) if stop in alone[1] else len(alone[1])
    assert out[1] == alone[1][:cut1] and len(alone[1]) == 32 - 20 + 1
    assert out[2] == alone[2][: alone[2].index(stop)]


def test_seeded_batches_are_reproducible_and_rows_differ(model: GPT) -> None:
    from albor.infer.engine import Sampling, stream_batch

    def run(seed: int) -> list[list[int]]:
        out: list[list[int]] = [[], [], []]
        sampling = Sampling(temperature=1.0, top_p=0.95, seed=seed)
        for row, token in stream_batch(model, [[3, 4]] * 3, max_new_tokens=12, sampling=sampling):
            if token is not None:
                out[row].append(token)
        return out

    a = run(1)
    assert a == run(1) and a != run(2)
    assert len({tuple(r) for r in a}) == 3  # the same prompt n times gives n samples
