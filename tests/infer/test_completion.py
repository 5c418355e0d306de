"""Tests of the text layer (`infer/completion.py`): prompts, token healing, incremental
decoding, stop strings, completions."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from albor.infer.completion import complete, healing_candidates
from albor.infer.engine import generate
from albor.model.gpt import GPT
from albor.model.presets import preset


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


# ----- text: incremental decoding, stop strings, prompts --------------------------------------


def _byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: every UTF-8 byte is its own token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=257,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["a"], trainer)
    return tok


def test_text_stream_emits_multibyte_characters_whole() -> None:
    from albor.infer.completion import TextStream

    tok = _byte_tokenizer()
    text = "x = '🐍 ñandú → 中文'\n"
    ids = tok.encode(text).ids
    assert len(ids) == len(text.encode())  # one token per byte: characters span tokens
    decode = lambda t: tok.decode(list(t), skip_special_tokens=False)  # noqa: E731
    stream = TextStream(decode, tok.encode("print(").ids)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text == stream.text
    assert all("\ufffd" not in p for p in pieces)
    assert [p for p in pieces if p][5] == "🐍"  # four tokens, one character


def test_text_stream_holds_back_and_cuts_stop_strings() -> None:
    from albor.infer.completion import HUMANEVAL_STOPS, TextStream

    assert HUMANEVAL_STOPS == ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
    tok = _byte_tokenizer()
    decode = lambda t: tok.decode(list(t), skip_special_tokens=False)  # noqa: E731
    body = "    return a + b\n    # done\ndef next():"
    stream = TextStream(decode, stop=HUMANEVAL_STOPS)
    pieces = []
    for i in tok.encode(body).ids:
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    assert "".join(pieces) == "    return a + b\n    # done" == stream.text
    # "\n" and "\n " were held back (a stop string could have started there), not lost.
    assert "\n" not in pieces and stream.stopped
    # Text that only looked like the start of a stop string comes out at the end.
    stream = TextStream(decode, stop=["\ndef"])
    out = "".join(stream.push(i) for i in tok.encode("x\nde").ids) + stream.flush()
    assert out == "x\nde" and not stream.stopped


def test_streamed_text_equals_complete_and_counts_tokens() -> None:
    from albor.infer.completion import completions, make_prompt, stream_completions
    from albor.infer.engine import TorchBackend

    tok = _tokenizer()
    torch.manual_seed(1)
    model = GPT(preset("tiny", vocab_size=tok.get_vocab_size(), max_seq_len=64)).eval()
    backend = TorchBackend(model, tok)
    prefixes = ["def add(a, b):\n", "for i in range(", "x = 1"]
    prompts = [make_prompt(backend, p) for p in prefixes]
    assert prompts[0].healed == "\n" or prompts[0].healed.endswith("\n")
    pieces = ["", "", ""]
    finals = {}
    for d in stream_completions(backend, prompts, max_new_tokens=9):
        pieces[d.row] += d.text
        if d.finish_reason:
            finals[d.row] = d
    for i, p in enumerate(prefixes):
        assert pieces[i] == complete(model, tok, p, max_new_tokens=9)
        assert finals[i].completion_tokens <= 9
        if finals[i].finish_reason == "length":
            assert finals[i].completion_tokens == 9
    gathered = completions(backend, prompts, max_new_tokens=9)
    assert [c.text for c in gathered] == pieces
    assert gathered[0].prompt_tokens == 1 + len(tok.encode(prefixes[0]).ids)  # EOS + prefix


def test_fim_prompts_use_the_training_layout_and_end_at_eos(trained_model: Path) -> None:
    from albor.data.bpe import EOS_ID, plain_text
    from albor.data.fim import prompt_ids
    from albor.infer.completion import completions, make_prompt
    from albor.infer.engine import TorchBackend
    from albor.model.load import load_model

    model, _ = load_model(trained_model)
    tok = Tokenizer.from_file(str(trained_model / "tokenizer.json"))
    backend = TorchBackend(model, tok)
    prefix, suffix = "def area(r):\n    return ", " * r * r\n"
    for mode in ("psm", "spm"):
        prompt = make_prompt(backend, prefix, suffix, fim_mode=mode)
        assert prompt.ids == [EOS_ID, *prompt_ids(plain_text(tok), prefix, suffix, mode)]
        (c,) = completions(backend, [prompt], max_new_tokens=40)
        greedy = list(generate(model, prompt.ids, max_new_tokens=40))
        assert EOS_ID not in greedy or c.finish_reason == "stop"
        cut = greedy.index(EOS_ID) if EOS_ID in greedy else len(greedy)
        assert c.text == tok.decode(greedy[:cut]) and c.completion_tokens == cut
        assert "<|" not in c.text
