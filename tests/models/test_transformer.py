"""The transformer LM against independent references: masking, KV cache, a plain FFN, sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig
from moekit.models.transformer import Transformer, TransformerConfig, apply_rope, sample_next_token


def tiny(moe: dict | None = None, **kw) -> TransformerConfig:
    base = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, d_model=16, d_ff=24)
    base.update(kw)
    if moe is not None:
        base["moe"] = MoEConfig(d_model=base["d_model"], **moe)
    return TransformerConfig(**base)


MOE = dict(d_ff=12, num_experts=4, top_k=2)


@pytest.mark.parametrize("config", [tiny(), tiny(MOE), tiny(MOE, n_kv_head=2, first_dense_layers=1)],
                         ids=["dense", "moe", "moe-gqa-first-dense"])
def test_later_tokens_never_change_earlier_outputs(config):
    torch.manual_seed(0)
    model = Transformer(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = torch.randint(0, config.vocab_size, (2, 5))
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[:, :7], logits_changed[:, :7])
    assert not torch.allclose(logits[:, 7:], logits_changed[:, 7:])


@pytest.mark.parametrize("config", [tiny(), tiny(MOE, n_kv_head=1), tiny(MOE, n_kv_head=2, moe_every=2)],
                         ids=["dense", "moe-mqa", "moe-every-2"])
def test_kv_cache_equals_full_recomputation(config):
    torch.manual_seed(0)
    model = Transformer(config).eval()
    idx = torch.randint(0, config.vocab_size, (3, 11))
    full, _ = model(idx)
    cache = model.new_cache(3)
    pieces = [model(idx[:, :4], cache=cache)[0]]  # a prompt chunk, then a chunk of 3, then single tokens
    pieces.append(model(idx[:, 4:7], cache=cache)[0])
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 11)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_with_cache_equals_argmax_of_full_forward():
    torch.manual_seed(0)
    model = Transformer(tiny(MOE)).eval()
    prompt = torch.randint(0, 37, (2, 3))
    generated = torch.stack(list(model.generate(prompt, 13, temperature=0)), dim=1)  # fills block_size=16
    seq = prompt
    for _ in range(13):  # reference: no cache, recompute the whole sequence every step
        seq = torch.cat((seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(generated, seq[:, 3:])
    # Past block_size the context is cropped and the cache rebuilt: generation goes on.
    assert torch.stack(list(model.generate(prompt, 40, temperature=0)), dim=1).shape == (2, 40)


def test_moe_with_one_expert_equals_a_plain_ffn():
    torch.manual_seed(0)
    config = tiny(dict(d_ff=24, num_experts=1, top_k=1), n_layer=1)
    moe = Transformer(config).blocks[0].ffn
    x = torch.randn(5, 16)
    w_in, w_out = moe.experts.w_in[0], moe.experts.w_out[0]  # (2H, D), (D, H): [gate | up]
    gate, up = (x @ w_in.t()).chunk(2, dim=-1)
    expected = (F.silu(gate) * up) @ w_out.t()  # SwiGLU written out by hand
    torch.testing.assert_close(moe(x).hidden_states, expected)


def test_dense_and_moe_twins_have_equal_active_parameters():
    dense = Transformer(tiny())
    moe = Transformer(tiny(MOE))
    counts = moe.num_parameters()
    router = 2 * 4 * 16  # the only extra active parameters: one (E, D) router per layer
    assert counts["active"] == dense.num_parameters()["total"] + router
    expert = 3 * 12 * 16  # w_in (2H, D) + w_out (D, H), H = 12
    assert counts["total"] - counts["active"] == 2 * (4 - 2) * expert


def test_aux_losses_reach_the_training_loss():
    torch.manual_seed(0)
    model = Transformer(tiny(dict(MOE, aux_loss_coef=0.5, z_loss_coef=0.1)))
    idx = torch.randint(0, 37, (2, 8))
    logits, out = model(idx, idx)
    expected_lm = F.cross_entropy(logits.view(-1, 37), idx.view(-1))
    torch.testing.assert_close(out.lm_loss, expected_lm)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert sorted(out.expert_counts) == [0, 1]
    assert all(int(c.sum()) == 2 * 8 * 2 for c in out.expert_counts.values())  # T * k assignments
    out.loss.backward()
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0


def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 5, 8)
    pos = torch.arange(5, dtype=torch.float64)[:, None]
    freqs = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angle = pos * freqs
    z = torch.complex(x[..., :4].double(), x[..., 4:].double()) * torch.polar(torch.ones_like(angle), angle)
    expected = torch.cat((z.real, z.imag), dim=-1).float()
    torch.testing.assert_close(apply_rope(x, angle.cos().float(), angle.sin().float()), expected)


def test_moe_every_and_first_dense_layers():
    config = tiny(MOE, n_layer=6, moe_every=2, first_dense_layers=1)
    assert Transformer(config).moe_layers == [1, 3, 5]


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=18, n_head=4), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
    (dict(ffn_type="relu2"), "unknown ffn_type"),
    (dict(first_dense_layers=5), "first_dense_layers"),
])
def test_bad_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_moe_width_mismatch_and_too_long_input():
    with pytest.raises(ValueError, match="moe.d_model=32 must equal d_model=16"):
        TransformerConfig(d_model=16, n_head=4, moe=MoEConfig(d_model=32, d_ff=8))
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="longer than block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_top_k_and_top_p_sampling_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(logits, 1.0, top_k=2, generator=gen) for _ in range(400)])
    assert set(draws.unique().tolist()) == {0, 1}
    # top_p=0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it, so the nucleus is {0, 1}.
    draws = torch.stack([sample_next_token(logits, 1.0, top_p=0.7, generator=gen) for _ in range(400)])
    assert set(draws.unique().tolist()) == {0, 1}
    frac = (draws == 0).float().mean().item()
    assert abs(frac - 0.5 / 0.8) < 4 * math.sqrt(0.625 * 0.375 / 400)  # renormalised within the nucleus
    assert sample_next_token(logits, 0.0).item() == 0
