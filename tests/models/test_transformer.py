"""The transformer LM against independent references: masking, KV cache, a plain FFN, sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig
from moekit.models.transformer import Transformer, TransformerConfig, apply_rope, rope_tables, sample_next_token


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


def test_last_only_logits_and_one_forward_per_generated_token():
    torch.manual_seed(0)
    model = Transformer(tiny(MOE, n_kv_head=2)).eval()
    idx = torch.randint(0, 37, (2, 6))
    full, _ = model(idx)
    last, _ = model(idx, last_only=True)
    assert last.shape == (2, 1, 37)
    torch.testing.assert_close(last, full[:, -1:])
    with pytest.raises(ValueError, match="last_only"):
        model(idx, idx, last_only=True)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1]))
    assert len(list(model.generate(idx, 5, temperature=0))) == 5
    assert calls == [6, 1, 1, 1, 1]  # the prompt, then one token per step; none after the last


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
    torch.testing.assert_close(apply_rope(x, *rope_tables(8, 5, 10000.0)), expected)
    # The same numbers as the two-half formula, bit for bit.
    cos, sin = angle.cos().float(), angle.sin().float()
    x1, x2 = x.chunk(2, dim=-1)
    assert torch.equal(apply_rope(x, *rope_tables(8, 5, 10000.0)),
                       torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def test_moe_every_and_first_dense_layers():
    config = tiny(MOE, n_layer=6, moe_every=2, first_dense_layers=1)
    assert Transformer(config).moe_layers == [1, 3, 5]


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=18, n_head=4), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
    (dict(ffn_type="relu2"), "ffn_type must be one of"),
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


# --- options for released checkpoints: QK-norm, head_dim, biases, windows, sinks, YaRN, latent attention


def rope_ref(x_TQ, theta_T_half):
    """NeoX-layout rotation written with complex numbers: pairs (x[i], x[i + Q/2])."""
    half = x_TQ.shape[-1] // 2
    z = torch.complex(x_TQ[..., :half].double(), x_TQ[..., half:].double()) * torch.polar(
        torch.ones_like(theta_T_half), theta_T_half)
    return torch.cat((z.real, z.imag), dim=-1)


def rms_ref(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def attention_ref(q_HTQ, k_GSQ, v_GSU, window, sinks_H, scale):
    """Causal attention one head and one query at a time, with a window and sink logits."""
    H, T, _ = q_HTQ.shape
    G = k_GSQ.shape[0]
    out = torch.zeros(H, T, v_GSU.shape[-1], dtype=q_HTQ.dtype)
    for h in range(H):
        g = h // (H // G)
        for i in range(T):
            keys = [j for j in range(i + 1) if window is None or i - j < window]
            logits = [torch.dot(q_HTQ[h, i], k_GSQ[g, j]) * scale for j in keys]
            if sinks_H is not None:
                logits.append(sinks_H[h])
            p = torch.softmax(torch.stack(logits), dim=0)
            out[h, i] = sum(p[n] * v_GSU[g, j] for n, j in enumerate(keys))
    return out


def angles(config, T):
    from moekit.models.transformer import rope_inv_freq

    inv_freq, factor = rope_inv_freq(config.rope_dim, config.rope_theta, config.rope_scaling)
    return torch.outer(torch.arange(T, dtype=torch.float64), inv_freq), factor


def rope_layout(theta, factor):
    """The (T, Q) tables the attention modules take: [cos, cos] and [-sin, sin] (see `rope_tables`)."""
    cos, sin = theta.cos() * factor, theta.sin() * factor
    return torch.cat((cos, cos), dim=-1).float(), torch.cat((-sin, sin), dim=-1).float()


def randomize_(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "sinks" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


ATTENTION_OPTIONS = {
    "head-dim-qkv-bias": dict(head_dim=6, qkv_bias=True, n_kv_head=2),
    "qk-norm-head-window": dict(head_dim=8, qk_norm="head", sliding_window=3),
    "qk-norm-full-clip": dict(qk_norm="full", clip_qkv=0.3, n_kv_head=2),
    "sinks-window-out-bias": dict(head_dim=6, attn_sinks=True, sliding_window=4, qkv_bias=True,
                                  attn_out_bias=True, n_kv_head=1),
    "yarn": dict(rope_scaling=dict(type="yarn", factor=4.0, original_max_len=8, truncate=False)),
}


@pytest.mark.parametrize("options", ATTENTION_OPTIONS.values(), ids=ATTENTION_OPTIONS.keys())
def test_attention_options_match_a_plain_reference(options):
    config = tiny(**options)
    attn = randomize_(Transformer(config)).blocks[0].attn.eval()
    H, G, Q = config.n_head, config.n_kv_head, config.attn_head_dim
    T = 9
    x = torch.randn(1, T, config.d_model)
    theta, factor = angles(config, T)
    out = attn(x, *rope_layout(theta, factor))

    x_TD = x[0].double()
    w = {n: p.detach().double() for n, p in attn.named_parameters()}
    q = x_TD @ w["q_proj.weight"].t() + (w["q_proj.bias"] if "q_proj.bias" in w else 0)
    kv = x_TD @ w["kv_proj.weight"].t() + (w["kv_proj.bias"] if "kv_proj.bias" in w else 0)
    k, v = kv[:, :G * Q], kv[:, G * Q:]
    if config.qk_norm == "full":
        q, k = rms_ref(q, w["q_norm.weight"], config.norm_eps), rms_ref(k, w["k_norm.weight"], config.norm_eps)
    if config.clip_qkv:
        q, k, v = (t.clamp(-config.clip_qkv, config.clip_qkv) for t in (q, k, v))
    q, k, v = q.view(T, H, Q), k.view(T, G, Q), v.view(T, G, Q)
    if config.qk_norm == "head":
        q, k = rms_ref(q, w["q_norm.weight"], config.norm_eps), rms_ref(k, w["k_norm.weight"], config.norm_eps)
    q = torch.stack([rope_ref(q[:, h], theta) * factor for h in range(H)])
    k = torch.stack([rope_ref(k[:, g], theta) * factor for g in range(G)])
    y = attention_ref(q, k, v.transpose(0, 1), config.sliding_window, w.get("sinks"), Q**-0.5)
    expected = y.transpose(0, 1).reshape(T, H * Q) @ w["out_proj.weight"].t() + w.get("out_proj.bias", 0)
    torch.testing.assert_close(out[0].double(), expected, rtol=1e-5, atol=1e-5)


MLA = dict(kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=5, q_lora_rank=7)


@pytest.mark.parametrize("mla", [MLA, dict(MLA, q_lora_rank=None)], ids=["low-rank-q", "full-q"])
def test_latent_attention_matches_a_plain_reference(mla):
    scaling = dict(type="yarn", factor=4.0, original_max_len=8, mscale=1.0, mscale_all_dim=0.7)
    config = tiny(mla=mla, rope_scaling=scaling, qkv_bias=True)
    attn = randomize_(Transformer(config)).blocks[0].attn.eval()
    H, T = config.n_head, 7
    N, R, U, C = 4, 4, 5, 6
    x = torch.randn(1, T, config.d_model)
    theta, factor = angles(config, T)
    out = attn(x, *rope_layout(theta, factor))

    x_TD = x[0].double()
    w = {n: p.detach().double() for n, p in attn.named_parameters()}
    if mla["q_lora_rank"] is None:
        q = x_TD @ w["q_proj.weight"].t()
    else:
        q_lat = rms_ref(x_TD @ w["q_a_proj.weight"].t() + w["q_a_proj.bias"], w["q_a_norm.weight"], 1e-6)
        q = q_lat @ w["q_b_proj.weight"].t()
    q = q.view(T, H, N + R)
    kv_a = x_TD @ w["kv_a_proj.weight"].t() + w["kv_a_proj.bias"]
    c, k_rot = rms_ref(kv_a[:, :C], w["kv_a_norm.weight"], 1e-6), rope_ref(kv_a[:, C:], theta) * factor
    kv = (c @ w["kv_b_proj.weight"].t()).view(T, H, N + U)
    q_h = torch.stack([torch.cat((q[:, h, :N], rope_ref(q[:, h, N:], theta) * factor), -1) for h in range(H)])
    k_h = torch.stack([torch.cat((kv[:, h, :N], k_rot), -1) for h in range(H)])
    v_h = kv[:, :, N:].transpose(0, 1)
    mscale = 0.1 * 0.7 * math.log(4.0) + 1
    y = attention_ref(q_h, k_h, v_h, None, None, (N + R) ** -0.5 * mscale**2)
    expected = y.transpose(0, 1).reshape(T, H * U) @ w["out_proj.weight"].t()
    torch.testing.assert_close(out[0].double(), expected, rtol=1e-5, atol=1e-5)


CACHED = {
    "gqa-window": tiny(MOE, sliding_window=3, n_kv_head=2),  # decoding reads the cache per kv head
    "window-sinks-alternating": tiny(MOE, sliding_window=3, sliding_window_layers=[0], attn_sinks=True,
                                     head_dim=6, n_kv_head=2),
    "qk-norm-yarn": tiny(MOE, qk_norm="head", rope_scaling=dict(type="yarn", factor=2.0, original_max_len=8)),
    "mla": tiny(MOE, mla=MLA, moe_layers=[1]),
    "gpt-oss-experts": tiny(dict(MOE, expert_type="clamped_swiglu", expert_bias=True, router_bias=True,
                                 router="topk_softmax"), qkv_bias=True, attn_out_bias=True, attn_sinks=True),
}


@pytest.mark.parametrize("config", CACHED.values(), ids=CACHED.keys())
def test_kv_cache_and_causality_with_checkpoint_options(config):
    torch.manual_seed(0)
    model = randomize_(Transformer(config)).eval()
    idx = torch.randint(0, config.vocab_size, (2, 11))
    full, _ = model(idx)
    cache = model.new_cache(2)
    pieces = [model(idx[:, :4], cache=cache)[0], model(idx[:, 4:7], cache=cache)[0]]
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 11)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % config.vocab_size
    torch.testing.assert_close(model(changed)[0][:, :6], full[:, :6])


def test_sliding_window_limits_what_a_query_sees():
    model = Transformer(tiny(sliding_window=2, n_layer=1)).eval()
    idx = torch.randint(0, 37, (1, 8))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % 37
    logits, changed_logits = model(idx)[0], model(changed)[0]
    assert not torch.allclose(logits[0, 1], changed_logits[0, 1])  # position 1 sees position 0
    torch.testing.assert_close(logits[0, 2:], changed_logits[0, 2:])  # position 2 on do not


@pytest.mark.parametrize("scaling", [
    dict(rope_type="linear", factor=4.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=64),
    dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
         truncate=False),
    dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.8),
], ids=["linear", "llama3", "yarn-gpt-oss", "yarn-deepseek"])
def test_rope_scaling_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moekit.models.transformer import RopeScaling, rope_inv_freq

    hf = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=2048,
                     rope_parameters=dict(rope_theta=5000.0, **scaling))
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
    ours = RopeScaling(type=scaling["rope_type"], factor=scaling["factor"],
                       original_max_len=scaling.get("original_max_position_embeddings"),
                       **{k: v for k, v in scaling.items() if k in ("low_freq_factor", "high_freq_factor", "beta_fast",
                                                                    "beta_slow", "mscale", "mscale_all_dim",
                                                                    "truncate")})
    inv_freq, factor = rope_inv_freq(32, 5000.0, ours)
    torch.testing.assert_close(inv_freq.float(), hf_inv_freq, rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf_factor)


def test_moe_layers_list_and_explicit_head_dim():
    config = tiny(MOE, n_layer=4, moe_layers=[0, 3], head_dim=10)
    model = Transformer(config)
    assert model.moe_layers == [0, 3]
    assert model.blocks[0].attn.q_proj.weight.shape == (4 * 10, 16)
    assert model.blocks[0].attn.out_proj.weight.shape == (16, 4 * 10)


@pytest.mark.parametrize("config", [
    tiny(MOE, mla=MLA, rope_scaling=dict(type="yarn", factor=4.0, original_max_len=8, mscale_all_dim=1.0)),
    tiny(dict(MOE, selection_bias=True, router="sigmoid_topk"), sliding_window=3, sliding_window_layers=[1],
         qk_norm="full", clip_qkv=2.0, moe_layers=[1]),
], ids=["mla-yarn", "windows-qk-norm"])
def test_config_round_trips_through_json_and_the_model_folder(config, tmp_path):
    import json

    from moekit.config import build_dataclass, config_dict

    data = json.loads(json.dumps(config_dict(config)))
    assert build_dataclass(TransformerConfig, data) == config
    model = randomize_(Transformer(config)).eval()
    model.save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path)
    idx = torch.randint(0, 37, (1, 9))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(head_dim=5), "head dim must be even for RoPE (got 5)"),
    (dict(head_dim=0), "head_dim must be >= 1 (got 0)"),
    (dict(qk_norm="layer"), "qk_norm must be one of head, full (got 'layer')"),
    (dict(sliding_window=0), "sliding_window must be >= 1 (got 0)"),
    (dict(sliding_window_layers=[0]), "sliding_window_layers needs sliding_window"),
    (dict(sliding_window=4, sliding_window_layers=[2]), "sliding_window_layers[] must be <= 1 (got 2)"),
    (dict(moe_layers=[0, 0]), "moe_layers lists a layer twice"),
    (dict(clip_qkv=float("nan")), "clip_qkv must be a finite number (got nan)"),
    (dict(rope_scaling=dict(type="dynamic")), "rope_scaling.type must be one of linear, llama3, yarn"),
    (dict(rope_scaling=dict(type="yarn", factor=4.0)), "rope_scaling.original_max_len is required"),
    (dict(mla=dict(qk_rope_head_dim=3)), "mla.qk_rope_head_dim must be even"),
    (dict(mla=MLA, attn_sinks=True), "do not apply to latent attention"),
    (dict(n_layer=2.5), "n_layer must be an integer (got 2.5)"),
    (dict(dropout=1.0), "dropout must be < 1.0 (got 1.0)"),
])
def test_bad_checkpoint_options_are_named(kwargs, message):
    with pytest.raises(ValueError) as info:
        tiny(**kwargs)
    assert message in str(info.value)


def test_moe_output_width_must_match_the_model():
    with pytest.raises(ValueError, match="moe.d_out=3 must equal d_model=16"):
        tiny(dict(MOE, d_out=3))


def test_every_config_field_is_documented():
    import dataclasses

    from moekit.config import field_docs
    from moekit.models.transformer import MLAConfig, RopeScaling

    for cls in (TransformerConfig, MoEConfig, RopeScaling, MLAConfig):
        docs = field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not undocumented, f"{cls.__name__}: {undocumented}"
        assert "Fields:" in cls.__doc__
