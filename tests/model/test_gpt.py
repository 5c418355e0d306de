"""The decoder: sane loss at init, it learns, the KV cache is exact, tied weights are shared."""

from __future__ import annotations

import math

import pytest
import torch

from albor.model.gpt import GPT, KVCache
from albor.model.presets import preset


def _tiny(**overrides: object) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", **overrides))


def test_parameter_names_are_hf_llama_names() -> None:
    names = set(_tiny().state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    for i in range(2):
        p = f"model.layers.{i}."
        assert {
            p + "self_attn.q_proj.weight",
            p + "self_attn.k_proj.weight",
            p + "self_attn.v_proj.weight",
            p + "self_attn.o_proj.weight",
            p + "mlp.gate_proj.weight",
            p + "mlp.up_proj.weight",
            p + "mlp.down_proj.weight",
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
        } <= names
    assert not any(n.endswith(".bias") for n in names)
    biased = set(_tiny(qkv_bias=True).state_dict())
    assert {f"model.layers.0.self_attn.{x}_proj.bias" for x in "qkv"} <= biased
    assert "model.layers.0.self_attn.o_proj.bias" not in biased


def test_loss_at_init_is_about_ln_vocab() -> None:
    model = _tiny()
    idx = torch.randint(0, 512, (4, 64))
    # Targets independent of the inputs: with tied embeddings, predicting the input token itself
    # is easier than chance even at init.
    loss = model(idx, targets=torch.randint(0, 512, (4, 64)))
    assert loss.ndim == 0
    assert abs(loss.item() - math.log(512)) < 0.1


def test_ignore_index_masks_positions() -> None:
    model = _tiny()
    idx = torch.randint(0, 512, (2, 16))
    targets = idx.clone()
    targets[:, 8:] = -100
    full = torch.nn.functional.cross_entropy(
        model(idx)[:, :8].reshape(-1, 512), idx[:, :8].reshape(-1)
    )
    torch.testing.assert_close(model(idx, targets=targets), full)


def test_sum_reduction_is_the_mean_times_the_counted_tokens() -> None:
    model = _tiny()
    idx = torch.randint(0, 512, (2, 16))
    targets = idx.clone()
    targets[0, 5:] = -100  # uneven rows: 5 + 16 counted tokens
    with torch.no_grad():
        mean = model(idx, targets=targets)
        total = model(idx, targets=targets, reduction="sum")
        by_hand = torch.nn.functional.cross_entropy(
            model(idx).float().reshape(-1, 512), targets.reshape(-1), reduction="none"
        )
    assert total.ndim == 0 and total.dtype == torch.float32
    torch.testing.assert_close(total, mean * 21)
    torch.testing.assert_close(total, by_hand.sum())


def test_a_few_adamw_steps_lower_the_loss() -> None:
    model = _tiny()
    idx = torch.randint(0, 512, (2, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize("bias", [False, True])
def test_kv_cache_matches_full_forward(bias: bool) -> None:
    model = _tiny(qkv_bias=bias).eval()
    idx = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch_size=2)
        parts = [model(idx[:, :10], cache=cache)]  # prefill
        parts += [model(idx[:, t : t + 1], cache=cache) for t in range(10, 16)]  # one by one
        parts.append(model(idx[:, 16:], cache=cache))  # a chunk after a cached prefix
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_left_padded_rows_decode_as_if_alone() -> None:
    # Batched decoding: rows of different lengths left-padded into one batch, each with its own
    # RoPE positions and its padding slots masked, give each prompt's logits alone.
    model = _tiny().eval()
    rows = [[5, 17, 300, 2, 9, 11], [7, 8], [40, 41, 42, 43]]
    width = max(map(len, rows))
    pad = torch.tensor([width - len(r) for r in rows])
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    positions = (torch.arange(width)[None] - pad[:, None]).clamp(min=0)
    real = torch.arange(width + 3)[None] >= pad[:, None]
    nxt = torch.tensor([[3], [4], [5]])
    with torch.no_grad():
        cache = model.new_cache(3, width + 3)
        seen = real[:, :width]
        last = model(ids, cache=cache, positions=positions, key_mask=seen, last_only=True)
        step = model(
            nxt, cache=cache, positions=(width - pad)[:, None], key_mask=real[:, : width + 1]
        )
        for i, r in enumerate(rows):
            alone = model(torch.tensor([[*r, int(nxt[i])]]))[0]
            torch.testing.assert_close(last[i, 0], alone[-2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step[i, 0], alone[-1], rtol=1e-5, atol=1e-5)
    assert last.shape == (3, 1, 512) and cache.pos == width + 1
    with pytest.raises(ValueError, match="last_only"):
        model(ids, targets=ids, last_only=True)


def test_cache_and_context_limits() -> None:
    model = _tiny()
    cache = KVCache(model.cfg, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="context length 128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_tied_weights_are_one_tensor() -> None:
    model = _tiny()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 0] = 42.0
    assert model.lm_head.weight[3, 0].item() == 42.0
    untied = _tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_params() == model.num_params() + 512 * 64


def test_meta_model_materialises_with_init_weights() -> None:
    with torch.device("meta"):
        model = GPT(preset("tiny"))
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    std = model.model.layers[0].mlp.down_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(4), rel=0.1)  # residual scaling, 2 layers
    assert torch.all(model.model.norm.weight == 1)
    idx = torch.randint(0, 512, (1, 8))
    assert torch.isfinite(model(idx)).all()


def test_every_parameter_receives_a_gradient() -> None:
    # The ALB-038 lesson: a broken backward left most weights untrained while the loss printed.
    torch.manual_seed(0)
    model = GPT(preset("tiny", qkv_bias=True))
    model.init_weights()
    x = torch.randint(0, 512, (2, 17))
    model(x[:, :-1], targets=x[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
