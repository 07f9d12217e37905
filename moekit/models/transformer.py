"""A decoder-only transformer language model whose FFNs are dense or Mixture-of-Experts.

Reads top to bottom like nanoGPT: RMSNorm -> rotary embedding -> KV cache and masks ->
CausalSelfAttention -> MultiHeadLatentAttention -> Block -> configs -> Transformer. The model knows
nothing of optimizers, schedules or process groups: those live in `moekit.train` and
`moekit.distributed`. The options a released checkpoint needs (QK-norm, sliding windows, attention
sinks, YaRN, latent attention, any set of MoE layers) are off by default and cost nothing then.

Shape suffixes: B sequences, T positions (S: positions in the KV cache), D d_model, H heads,
G key/value heads, Q head dim, V vocabulary, E experts; for latent attention C the compressed KV
width, R the rotary dims, N the non-rotary query/key dims, U the value head dim.

References: Radford et al. 2019 (GPT-2, pre-norm decoder); Zhang & Sennrich 2019 (RMSNorm);
Su et al. 2021 (RoPE); Ainslie et al. 2023 (grouped-query attention); Shazeer et al. 2017 and
Fedus et al. 2021 (MoE FFNs, the auxiliary loss); Dai et al. 2024 (DeepSeekMoE: first layers dense,
shared + fine-grained experts); Peng et al. 2023 (YaRN); Beltagy et al. 2020 (sliding-window
attention); Xiao et al. 2023 (attention sinks; learned per head in OpenAI 2025, GPT-OSS);
Dehghani et al. 2023 (QK-norm); DeepSeek-AI 2024 (DeepSeek-V2/V3: multi-head latent attention).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ConfigError, check_choice, check_int, check_number, documented
from moekit.layers.config import EXPERT_TYPES, MoEConfig
from moekit.layers.experts import GATED, FeedForward, GroupedExperts
from moekit.layers.moe import MoE
from moekit.models.pretrained import Pretrained


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps), computed in float32 for bf16/fp16 input (the mean of squares of
        # bf16 activations loses too many digits), cast back, then times the weight: one fused call.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# --- rotary position embedding ----------------------------------------------------------------


def rope_inv_freq(rot_dim: int, theta: float, scaling: RopeScaling | None = None) -> tuple[Tensor, float]:
    """(inverse frequencies (rot_dim // 2,) in float64, factor on cos and sin) for RoPE, stretched
    for long context by `scaling`: 'linear' (position interpolation), 'llama3' (Llama 3.1's
    wavelength bands) or 'yarn' (Peng et al. 2023: interpolate low frequencies, keep high ones,
    and scale attention logits through cos and sin)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    if scaling is None:
        return inv_freq, 1.0
    s = scaling
    if s.type == "linear":
        return inv_freq / s.factor, 1.0
    if s.type == "llama3":
        low_wavelen, high_wavelen = s.original_max_len / s.low_freq_factor, s.original_max_len / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: frequencies making fewer than beta_slow turns over the original context are interpolated,
    # more than beta_fast are kept, with a linear ramp between.
    def turns_to_dim(turns: float) -> float:
        return rot_dim * math.log(s.original_max_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = turns_to_dim(s.beta_fast), turns_to_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / s.factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, s.yarn_attention_factor


def rope_tables(head_dim: int, max_len: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[Tensor, Tensor]:
    """The tables of `apply_rope`, each (max_len, head_dim): [cos, cos] and [-sin, sin]."""
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
    return torch.cat((cos, cos), dim=-1).float(), torch.cat((-sin, sin), dim=-1).float()


def apply_rope(x_BHTQ: Tensor, cos_TQ: Tensor, sin_TQ: Tensor) -> Tensor:
    """Rotate the pairs (x1[i], x2[i]) = (x[i], x[i + Q/2]) by each position's angles (the GPT-NeoX
    layout): (x1 cos - x2 sin, x2 cos + x1 sin) = x * [cos, cos] + [x2, x1] * [-sin, sin], in float32.
    The second form is one roll and three products, the same numbers as the first."""
    x = x_BHTQ.float()
    return (x * cos_TQ + x.roll(x.shape[-1] // 2, dims=-1) * sin_TQ).to(x_BHTQ.dtype)


# --- KV cache and masks -----------------------------------------------------------------------


class KVCache:
    """Keys and values of the positions seen so far, for one layer, preallocated to `max_len`.

    Latent attention stores its compressed KV as the "keys" (v_dim: its shared rotary key part)."""

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, device, dtype,
                 v_dim: int | None = None) -> None:
        self.k_BGSQ = torch.zeros(batch, num_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v_BGSQ = torch.zeros(batch, num_kv_heads, max_len, v_dim or head_dim, device=device, dtype=dtype)
        self.length = 0

    def append(self, k_BGTQ: Tensor, v_BGTQ: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k_BGTQ.shape[2]
        if end > self.k_BGSQ.shape[2]:
            raise ValueError(f"KV cache holds {self.k_BGSQ.shape[2]} positions; got {end}")
        self.k_BGSQ[:, :, self.length:end] = k_BGTQ
        self.v_BGSQ[:, :, self.length:end] = v_BGTQ
        self.length = end
        return self.k_BGSQ[:, :, :end], self.v_BGSQ[:, :, :end]


def attention_mask(T: int, past: int, window: int | None, device) -> Tensor | None:
    """(T, past + T) bool, True where query i (position past + i) may see key j: j <= past + i and,
    with a sliding window, past + i - j < window. None when plain causal attention says it all."""
    if (window is None or window >= past + T) and (past == 0 or T == 1):
        return None  # is_causal (no cache) or one query seeing every cached key
    q_T1 = torch.arange(past, past + T, device=device).unsqueeze(1)
    k_1S = torch.arange(past + T, device=device).unsqueeze(0)
    mask_TS = k_1S <= q_T1
    if window is not None:
        mask_TS &= q_T1 - k_1S < window
    return mask_TS


def attend(q_BHTQ: Tensor, k_BHSQ: Tensor, v_BHSU: Tensor, past: int, window: int | None,
           sinks_H: Tensor | None = None, scale: float | None = None, dropout: float = 0.0,
           query_len: int | None = None) -> Tensor:
    """Causal scaled dot-product attention over cached + new keys, with an optional sliding window
    and per-head sink logits (GPT-OSS: an extra softmax term exp(sink) that takes probability
    mass and returns nothing). Keys and values may have fewer heads than queries (grouped-query
    attention, H/G query heads per kv head, without sinks). `query_len` = 1: the rows of q are not
    positions but queries of one position (grouped-query decoding)."""
    T = q_BHTQ.shape[2] if query_len is None else query_len
    mask_TS = attention_mask(T, past, window, q_BHTQ.device)
    is_causal = mask_TS is None and past == 0 and T > 1
    if sinks_H is not None:
        # The sink is one more key: a zero vector (logit 0) with a zero value, whose logit the float
        # mask sets to sink_h. Exact, and it keeps the fused SDPA kernel.
        if mask_TS is None:
            mask_TS = torch.ones(T, past + T, dtype=torch.bool, device=q_BHTQ.device)
            if is_causal:
                mask_TS = mask_TS.tril()
        is_causal = False
        B, H, S = q_BHTQ.shape[0], q_BHTQ.shape[1], k_BHSQ.shape[2]
        k_BHSQ = torch.cat((k_BHSQ, k_BHSQ.new_zeros(B, H, 1, k_BHSQ.shape[-1])), dim=2)
        v_BHSU = torch.cat((v_BHSU, v_BHSU.new_zeros(B, H, 1, v_BHSU.shape[-1])), dim=2)
        bias_TS = torch.zeros(T, S, dtype=q_BHTQ.dtype, device=q_BHTQ.device).masked_fill(~mask_TS, float("-inf"))
        sink_HT1 = sinks_H.to(q_BHTQ.dtype).view(H, 1, 1).expand(H, T, 1)
        mask_TS = torch.cat((bias_TS.expand(H, T, S), sink_HT1), dim=-1)  # (H, T, S + 1)
    return F.scaled_dot_product_attention(q_BHTQ, k_BHSQ, v_BHSU, attn_mask=mask_TS, is_causal=is_causal,
                                          dropout_p=dropout, scale=scale,
                                          enable_gqa=k_BHSQ.shape[1] != q_BHTQ.shape[1])


# --- attention --------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head / grouped-query attention with RoPE; optional QK-norm, q/k/v clipping, a sliding
    window and attention sinks."""

    def __init__(self, config: TransformerConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = Q = config.attn_head_dim
        self.q_proj = nn.Linear(config.d_model, self.n_head * Q, bias=config.qkv_bias_on)
        # Grouped-query attention: G < H key/value heads, each shared by H/G query heads.
        self.kv_proj = nn.Linear(config.d_model, 2 * self.n_kv_head * Q, bias=config.qkv_bias_on)
        self.out_proj = nn.Linear(self.n_head * Q, config.d_model, bias=config.attn_out_bias_on)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "head":  # Qwen3: RMSNorm over each head's dims
            self.q_norm, self.k_norm = RMSNorm(Q, config.norm_eps), RMSNorm(Q, config.norm_eps)
        elif config.qk_norm == "full":  # OLMoE: RMSNorm over the whole projection
            self.q_norm = RMSNorm(self.n_head * Q, config.norm_eps)
            self.k_norm = RMSNorm(self.n_kv_head * Q, config.norm_eps)
        self.clip_qkv = config.clip_qkv
        self.window = config.window_of_layer(layer_idx)
        self.sinks = nn.Parameter(torch.zeros(self.n_head)) if config.attn_sinks else None
        self.dropout = config.dropout

    def forward(self, x_BTD: Tensor, cos_TQ: Tensor, sin_TQ: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x_BTD.shape
        H, G, Q = self.n_head, self.n_kv_head, self.head_dim
        q_BTX = self.q_proj(x_BTD)  # X = H * Q
        k_BTY, v_BTY = self.kv_proj(x_BTD).split(G * Q, dim=-1)  # Y = G * Q
        if self.qk_norm == "full":
            q_BTX, k_BTY = self.q_norm(q_BTX), self.k_norm(k_BTY)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q_BTX, k_BTY, v_BTY = q_BTX.clamp(-c, c), k_BTY.clamp(-c, c), v_BTY.clamp(-c, c)
        q_BTHQ, k_BTGQ, v_BTGQ = q_BTX.view(B, T, H, Q), k_BTY.view(B, T, G, Q), v_BTY.view(B, T, G, Q)
        if self.qk_norm == "head":
            q_BTHQ, k_BTGQ = self.q_norm(q_BTHQ), self.k_norm(k_BTGQ)
        q_BHTQ, k_BGTQ, v_BGTQ = q_BTHQ.transpose(1, 2), k_BTGQ.transpose(1, 2), v_BTGQ.transpose(1, 2)
        q_BHTQ, k_BGTQ = apply_rope(q_BHTQ, cos_TQ, sin_TQ), apply_rope(k_BGTQ, cos_TQ, sin_TQ)

        past = 0
        if cache is not None:
            past = cache.length
            k_BGTQ, v_BGTQ = cache.append(k_BGTQ, v_BGTQ)  # now (B, G, past + T, Q)
        dropout = self.dropout if self.training else 0.0
        if G != H and T == 1 and self.sinks is None:
            # Decoding: the H/G query heads sharing kv head g become H/G queries of g, so the cache
            # is read once per kv head (one query sees every cached key: no causal mask between them).
            y_BGRQ = attend(q_BHTQ.reshape(B, G, H // G, Q), k_BGTQ, v_BGTQ, past, self.window,
                            dropout=dropout, query_len=1)  # R = H/G
            y_BHTQ = y_BGRQ.reshape(B, H, 1, Q)
        else:
            if G != H and self.sinks is not None:
                # The sink mask is per query head: give every query head its kv head's copy
                # (repeat_interleave keeps query head h on kv head h // (H/G), the usual GQA layout).
                k_BGTQ = k_BGTQ.repeat_interleave(H // G, dim=1)
                v_BGTQ = v_BGTQ.repeat_interleave(H // G, dim=1)
            y_BHTQ = attend(q_BHTQ, k_BGTQ, v_BGTQ, past, self.window, self.sinks, dropout=dropout)
        y_BTX = y_BHTQ.transpose(1, 2).reshape(B, T, H * Q)
        return F.dropout(self.out_proj(y_BTX), self.dropout, self.training)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention: queries through a low-rank bottleneck with its
    RMSNorm; keys and values decompressed from one C-wide latent (RMS-normed) per position; a
    separate R-dim rotary key shared by all heads. The KV cache holds only the latent and the
    rotary key, C + R numbers per position and layer.

    The rotary dims use the GPT-NeoX layout: the importer de-interleaves DeepSeek's weights."""

    def __init__(self, config: TransformerConfig, layer_idx: int = 0) -> None:
        super().__init__()
        mla = config.mla
        self.n_head, self.mla = config.n_head, mla
        H, N, R, U = config.n_head, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(config.d_model, H * (N + R), bias=False)
        else:
            self.q_a_proj = nn.Linear(config.d_model, mla.q_lora_rank, bias=config.qkv_bias_on)
            self.q_a_norm = RMSNorm(mla.q_lora_rank, mla.norm_eps)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, H * (N + R), bias=False)
        self.kv_a_proj = nn.Linear(config.d_model, mla.kv_lora_rank + R, bias=config.qkv_bias_on)
        self.kv_a_norm = RMSNorm(mla.kv_lora_rank, mla.norm_eps)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, H * (N + U), bias=False)
        self.out_proj = nn.Linear(H * U, config.d_model, bias=config.attn_out_bias_on)
        self.scale = config.mla_softmax_scale
        self.window = config.window_of_layer(layer_idx)
        self.dropout = config.dropout

    def forward(self, x_BTD: Tensor, cos_TR: Tensor, sin_TR: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x_BTD.shape
        H, mla = self.n_head, self.mla
        N, R, U, C = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank
        if mla.q_lora_rank is None:
            q_BTX = self.q_proj(x_BTD)
        else:
            q_BTX = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BTD)))
        q_BHTK = q_BTX.view(B, T, H, N + R).transpose(1, 2)
        q_nope_BHTN, q_rot_BHTR = q_BHTK.split((N, R), dim=-1)
        c_BTC, k_rot_BTR = self.kv_a_proj(x_BTD).split((C, R), dim=-1)
        c_B1TC = self.kv_a_norm(c_BTC).unsqueeze(1)
        k_rot_B1TR = apply_rope(k_rot_BTR.unsqueeze(1), cos_TR, sin_TR)
        q_rot_BHTR = apply_rope(q_rot_BHTR, cos_TR, sin_TR)

        past = 0
        if cache is not None:
            past = cache.length
            c_B1TC, k_rot_B1TR = cache.append(c_B1TC, k_rot_B1TR)  # now over past + T positions
        S = c_B1TC.shape[2]
        kv_BHSX = self.kv_b_proj(c_B1TC.squeeze(1)).view(B, S, H, N + U).transpose(1, 2)
        k_nope_BHSN, v_BHSU = kv_BHSX.split((N, U), dim=-1)
        k_BHSK = torch.cat((k_nope_BHSN, k_rot_B1TR.expand(B, H, S, R)), dim=-1)
        q_BHTK = torch.cat((q_nope_BHTN, q_rot_BHTR), dim=-1)
        y_BHTU = attend(q_BHTK, k_BHSK, v_BHSU, past, self.window, scale=self.scale,
                        dropout=self.dropout if self.training else 0.0)
        y_BTX = y_BHTU.transpose(1, 2).reshape(B, T, H * U)
        return F.dropout(self.out_proj(y_BTX), self.dropout, self.training)


@dataclass
class FFNOutput:
    """What one block's FFN reports besides its output (zeros / None for a dense FFN)."""

    aux_loss: Tensor | None = None
    expert_counts: Tensor | None = None
    dropped_tokens: int = 0


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); the FFN is dense or an MoE."""

    def __init__(self, config: TransformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        attention = MultiHeadLatentAttention if config.mla is not None else CausalSelfAttention
        self.attn = attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.ffn: nn.Module = MoE(config.moe)
        else:
            self.ffn = FeedForward(config.d_model, config.d_ff, config.ffn_type, config.activation,
                                   config.bias)
        self.dropout = config.dropout

    def forward(self, x_BTD: Tensor, cos_TQ: Tensor, sin_TQ: Tensor,
                cache: KVCache | None = None) -> tuple[Tensor, FFNOutput]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TQ, sin_TQ, cache)
        h_BTD = self.ffn_norm(x_BTD)
        if self.is_moe:
            moe_out = self.ffn(h_BTD)
            y_BTD = moe_out.hidden_states
            info = FFNOutput(moe_out.aux_loss, moe_out.expert_counts, moe_out.dropped_tokens)
        else:
            y_BTD, info = self.ffn(h_BTD), FFNOutput()
        return x_BTD + F.dropout(y_BTD, self.dropout, self.training), info


# --- configs ----------------------------------------------------------------------------------

ROPE_SCALINGS = ("linear", "llama3", "yarn")
QK_NORMS = ("head", "full")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@documented
@dataclass
class RopeScaling:
    """How RoPE is stretched past the context a model was trained on (Hugging Face's `rope_scaling`)."""

    type: str = "yarn"
    """'linear' (position interpolation), 'llama3' (Llama 3.1) or 'yarn' (GPT-OSS, DeepSeek-V3)."""
    factor: float = 1.0
    """Context extension factor: new context / original_max_len."""
    original_max_len: int | None = None
    """The context length of pretraining (llama3, yarn)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths longer than original_max_len / low_freq_factor are fully interpolated."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than original_max_len / high_freq_factor are kept."""
    beta_fast: float = 32.0
    """yarn: dims turning more than beta_fast times over the original context are kept ..."""
    beta_slow: float = 1.0
    """yarn: ... and those turning fewer than beta_slow times interpolated, with a ramp between."""
    mscale: float | None = None
    """yarn: scales ln(factor) in the cos/sin factor (DeepSeek); None = 1."""
    mscale_all_dim: float | None = None
    """yarn: the cos/sin factor is mscale(factor, mscale) / mscale(factor, mscale_all_dim), and latent
    attention's softmax scale is multiplied by mscale(factor, mscale_all_dim)^2 (DeepSeek)."""
    attention_factor: float | None = None
    """yarn: the factor on cos and sin, when set; None derives it from factor and the mscales."""
    truncate: bool = True
    """yarn: round the ramp's ends to whole dims (GPT-OSS sets false)."""

    def __post_init__(self) -> None:
        check_choice("rope_scaling.type", self.type, ROPE_SCALINGS)
        check_number("rope_scaling.factor", self.factor, 0, strict_min=True)
        if self.type in ("llama3", "yarn"):
            if self.original_max_len is None:
                raise ConfigError(f"rope_scaling.original_max_len is required for type={self.type!r}")
            check_int("rope_scaling.original_max_len", self.original_max_len, 1)
        for name in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            check_number(f"rope_scaling.{name}", getattr(self, name), 0, strict_min=True)
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                              f"low_freq_factor={self.low_freq_factor}")
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(self, name) is not None:
                check_number(f"rope_scaling.{name}", getattr(self, name), 0)

    @property
    def yarn_attention_factor(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)


@documented
@dataclass
class MLAConfig:
    """DeepSeek-V2/V3 multi-head latent attention (Hugging Face's names)."""

    kv_lora_rank: int = 512
    """C: width of the compressed key/value latent, the only per-head-free thing cached."""
    qk_nope_head_dim: int = 128
    """N: query/key dims per head without position encoding (decompressed from the latent)."""
    qk_rope_head_dim: int = 64
    """R: rotary query/key dims per head; the rotary key is one R-vector shared by all heads."""
    v_head_dim: int = 128
    """U: value dims per head."""
    q_lora_rank: int | None = 1536
    """Width of the query bottleneck (with its RMSNorm); None = one full query projection (V2-Lite)."""
    norm_eps: float = 1e-6
    """eps of the query and KV latent RMSNorms."""

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            check_int(f"mla.{name}", getattr(self, name), 1)
        if self.q_lora_rank is not None:
            check_int("mla.q_lora_rank", self.q_lora_rank, 1)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"mla.qk_rope_head_dim must be even for RoPE (got {self.qk_rope_head_dim})")
        check_number("mla.norm_eps", self.norm_eps, 0, strict_min=True)


@documented
@dataclass
class TransformerConfig:
    """A decoder-only LM: widths, attention options, dense FFNs and which layers are MoE."""

    vocab_size: int = 256
    """256 = the byte-level tokenizer; a BPE tokenizer sets its own size."""
    block_size: int = 256
    """Longest context (the RoPE tables and the KV cache are this long)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Query heads."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention; None = n_head (plain multi-head)."""
    d_model: int = 128
    """Width of the residual stream."""
    head_dim: int | None = None
    """Width of each attention head; None = d_model / n_head (Qwen3-MoE and GPT-OSS set their own)."""
    d_ff: int | None = None
    """Hidden width of the dense FFNs; None = 4 * d_model (2/3 of that, rounded to 8, when gated,
    so a gated FFN has the parameters of a 4x MLP)."""
    ffn_type: str = "swiglu"
    """Dense FFN kind, as MoE experts: swiglu, geglu, mlp, linear."""
    activation: str = "gelu"
    """Activation of 'mlp' FFNs."""
    bias: bool = False
    """Biases in every linear layer of attention and the dense FFNs (unless the two below say otherwise)."""
    qkv_bias: bool | None = None
    """Biases on the query, key and value projections; None = `bias` (Qwen2 and GPT-OSS set true)."""
    attn_out_bias: bool | None = None
    """Bias on the attention output projection; None = `bias` (GPT-OSS sets true)."""
    qk_norm: str | None = None
    """RMSNorm on queries and keys before RoPE: 'head' (over each head, Qwen3-MoE), 'full' (over the
    whole projection, OLMoE), None."""
    clip_qkv: float | None = None
    """Clamp the query, key and value projections to [-clip_qkv, clip_qkv] (OLMoE's option); None = off."""
    sliding_window: int | None = None
    """Each query sees at most this many latest positions, itself included; None = all of them."""
    sliding_window_layers: list[int] | None = None
    """Layers that use sliding_window; None = every layer (Mixtral); GPT-OSS alternates."""
    attn_sinks: bool = False
    """A learned logit per head added to each softmax's denominator, attending to nothing (GPT-OSS)."""
    dropout: float = 0.0
    """Dropout on attention weights and on each residual branch."""
    rope_theta: float = 10000.0
    """RoPE base wavelength."""
    rope_scaling: RopeScaling | None = None
    """RoPE stretched for long context (linear, llama3, yarn); None = plain RoPE."""
    mla: MLAConfig | None = None
    """None: multi-head / grouped-query attention. Otherwise DeepSeek's multi-head latent attention
    (n_kv_head, head_dim, qk_norm and attn_sinks do not apply)."""
    norm_eps: float = 1e-5
    """eps of every RMSNorm (the latent attention's own norms excepted)."""
    tie_embeddings: bool = True
    """Share the token embedding and the output projection (fewer parameters, as in GPT-2)."""
    init_std: float = 0.02
    """Standard deviation of the initial weights."""
    moe: MoEConfig | None = None
    """None: every FFN dense. Otherwise the MoE layers' config (its d_model must equal d_model)."""
    moe_every: int = 1
    """Every `moe_every`-th layer after the first dense ones is an MoE (2 = alternate, as in GShard)."""
    first_dense_layers: int = 0
    """Keep the first layers dense (DeepSeekMoE: early layers balance poorly and gain little)."""
    moe_layers: list[int] | None = None
    """The MoE layers by index, overriding moe_every and first_dense_layers (Qwen-MoE's
    mlp_only_layers and decoder_sparse_step come in as this list)."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from a YAML/JSON file: d_model defaults to the model's
            self.moe = MoEConfig(**{"d_model": self.d_model, **self.moe})
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if isinstance(self.mla, dict):
            self.mla = MLAConfig(**self.mla)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "moe_every"):
            check_int(name, getattr(self, name), 1)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        check_int("n_kv_head", self.n_kv_head, 1)
        check_choice("ffn_type", self.ffn_type, EXPERT_TYPES)
        if self.d_ff is None:
            gated = self.ffn_type in GATED
            self.d_ff = 8 * round(4 * self.d_model * 2 / 3 / 8) if gated else 4 * self.d_model
        check_int("d_ff", self.d_ff, 1)
        if self.head_dim is None:
            if self.d_model % self.n_head and self.mla is None:
                raise ConfigError(f"d_model must be divisible by n_head "
                                  f"(got d_model={self.d_model}, n_head={self.n_head})")
        else:
            check_int("head_dim", self.head_dim, 1)
        if self.mla is None and self.attn_head_dim % 2:
            raise ConfigError(f"head dim must be even for RoPE (got {self.attn_head_dim})")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head must be divisible by n_kv_head (got n_head={self.n_head}, "
                              f"n_kv_head={self.n_kv_head})")
        for name in ("bias", "attn_sinks", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false (got {getattr(self, name)!r})")
        for name in ("qkv_bias", "attn_out_bias"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true, false or null (got {getattr(self, name)!r})")
        if self.qk_norm is not None:
            check_choice("qk_norm", self.qk_norm, QK_NORMS)
        if self.clip_qkv is not None:
            check_number("clip_qkv", self.clip_qkv, 0, strict_min=True)
        if self.sliding_window is not None:
            check_int("sliding_window", self.sliding_window, 1)
        if self.sliding_window_layers is not None:
            if self.sliding_window is None:
                raise ConfigError("sliding_window_layers needs sliding_window")
            self._check_layer_list("sliding_window_layers", self.sliding_window_layers)
        check_number("dropout", self.dropout, 0.0, 1.0, strict_max=True)
        check_number("rope_theta", self.rope_theta, 0, strict_min=True)
        check_number("norm_eps", self.norm_eps, 0, strict_min=True)
        check_number("init_std", self.init_std, 0)
        if self.mla is not None and (self.qk_norm or self.attn_sinks or self.clip_qkv is not None):
            raise ConfigError("qk_norm, clip_qkv and attn_sinks do not apply to latent attention (mla)")
        check_int("first_dense_layers", self.first_dense_layers, 0, self.n_layer)
        if self.moe_layers is not None:
            self._check_layer_list("moe_layers", self.moe_layers)
        if self.moe is not None:
            if self.moe.d_model != self.d_model:
                raise ConfigError(f"moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")
            if self.moe.output_width != self.d_model:
                raise ConfigError(f"moe.d_out={self.moe.d_out} must equal d_model={self.d_model} in a transformer")

    def _check_layer_list(self, name: str, layers: list[int]) -> None:
        if not isinstance(layers, list | tuple):
            raise ConfigError(f"{name} must be a list of layer indices (got {layers!r})")
        for i in layers:
            check_int(f"{name}[]", i, 0, self.n_layer - 1)
        if len(set(layers)) != len(layers):
            raise ConfigError(f"{name} lists a layer twice (got {list(layers)})")

    @staticmethod
    def _prepare_config_dict(data: dict) -> dict:
        """For `moekit.config.build_dataclass`: the MoE layers take the model's width unless told otherwise."""
        if isinstance(data.get("moe"), dict):
            data["moe"] = {"d_model": data.get("d_model", TransformerConfig.d_model), **data["moe"]}
        return data

    @property
    def attn_head_dim(self) -> int:
        """Width of each query/key/value head (standard attention)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    @property
    def rope_dim(self) -> int:
        """Dims each head rotates: the head width, or latent attention's rotary part."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.attn_head_dim

    @property
    def qkv_bias_on(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def attn_out_bias_on(self) -> bool:
        return self.bias if self.attn_out_bias is None else self.attn_out_bias

    @property
    def mla_softmax_scale(self) -> float:
        """Latent attention's softmax scale: 1/sqrt(N + R), times YaRN's mscale(factor, mscale_all_dim)^2."""
        scale = (self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim) ** -0.5
        s = self.rope_scaling
        if s is not None and s.type == "yarn" and s.mscale_all_dim:
            scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
        return scale

    def window_of_layer(self, layer_idx: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is None or layer_idx in self.sliding_window_layers:
            return self.sliding_window
        return None

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.moe is None:
            return False
        if self.moe_layers is not None:
            return layer_idx in self.moe_layers
        if layer_idx < self.first_dense_layers:
            return False
        return (layer_idx - self.first_dense_layers) % self.moe_every == 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; expected some of {sorted(known)}")
        return cls(**data)


@dataclass
class TransformerOutput:
    loss: Tensor | None
    """The training objective: lm_loss + aux_loss (None without targets)."""
    lm_loss: Tensor | None
    """Mean next-token cross-entropy in nats (None without targets)."""
    aux_loss: Tensor
    """Sum of the MoE layers' balancing losses (0 for a dense model)."""
    expert_counts: dict[int, Tensor] = field(default_factory=dict)
    """Layer index -> (E,) token assignments per expert, for the MoE layers of this forward."""
    dropped_tokens: dict[int, int] = field(default_factory=dict)
    """Layer index -> assignments dropped by capacity."""


class Transformer(Pretrained, nn.Module):
    """A decoder-only LM: token embedding -> `n_layer` pre-norm blocks (attention + dense or MoE FFN) ->
    RMSNorm -> LM head. `forward(idx, targets)` returns (logits, `TransformerOutput`); `generate`
    samples with a KV cache; `save_pretrained` / `from_pretrained` write and read a model folder."""

    config_class = TransformerConfig
    family = "lm"

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(config.rope_dim, config.block_size, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_rope(self) -> None:
        """Recompute the RoPE tables (after `to_empty()` on a model built on the meta device), in the
        dtype of the model's other floating tensors, as `to(dtype)` would leave them."""
        cfg = self.config
        cos, sin = rope_tables(cfg.rope_dim, cfg.block_size, cfg.rope_theta, cfg.rope_scaling)
        dtype, device = self.tok_emb.weight.dtype, self.tok_emb.weight.device
        self.rope_cos, self.rope_sin = cos.to(device, dtype), sin.to(device, dtype)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, block in enumerate(self.blocks) if block.is_moe]

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer) so the
        residual stream's variance does not grow with depth. Dense FFNs and experts get the same
        init, so a dense model and its MoE twin start alike. Routers keep their own init."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, CausalSelfAttention) and module.sinks is not None:
                nn.init.zeros_(module.sinks)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.w_in, std=std if module.w_out is not None else out_std)
                if module.w_out is not None:
                    nn.init.normal_(module.w_out, std=out_std)
                for bias in (module.b_in, module.b_out):
                    if bias is not None:
                        nn.init.zeros_(bias)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, std=out_std)
            if isinstance(block.ffn, FeedForward):
                last = block.ffn.w_out or block.ffn.w_in
                nn.init.normal_(last.weight, std=out_std)
            elif block.ffn.shared_experts is not None:
                shared = block.ffn.shared_experts
                nn.init.normal_((shared.w_out or shared.w_in).weight, std=out_std)

    def num_parameters(self) -> dict[str, int]:
        """Total parameters, and the ones each token uses (only top-k routed experts count)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() counts tied weights once
        inactive = 0
        for block in self.blocks:
            if block.is_moe and isinstance(block.ffn.experts, GroupedExperts):
                cfg = block.ffn.config
                per_expert = sum(p.numel() for p in block.ffn.experts.parameters()) // cfg.num_experts
                inactive += (cfg.num_experts - cfg.experts_per_token) * per_expert
        return {"total": total, "active": total - inactive, "embedding": self.tok_emb.weight.numel()}

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: list[KVCache] | None = None,
                last_only: bool = False) -> tuple[Tensor, TransformerOutput]:
        """idx (B, T) token ids -> logits (B, T, V) and a `TransformerOutput`.

        With `cache` (one `KVCache` per layer), idx continues the cached positions. `last_only`
        computes the logits of the last position only, (B, 1, V): all that sampling needs.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        start = cache[0].length if cache else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than "
                             f"block_size={self.config.block_size}")
        cos_TQ, sin_TQ = self.rope_cos[start:start + T], self.rope_sin[start:start + T]

        x_BTD = F.dropout(self.tok_emb(idx), self.config.dropout, self.training)
        aux_loss = x_BTD.new_zeros((), dtype=torch.float32)
        counts, dropped = {}, {}
        for i, block in enumerate(self.blocks):
            x_BTD, info = block(x_BTD, cos_TQ, sin_TQ, cache[i] if cache else None)
            if info.expert_counts is not None:
                aux_loss = aux_loss + info.aux_loss
                counts[i], dropped[i] = info.expert_counts, info.dropped_tokens
        if last_only:
            x_BTD = x_BTD[:, -1:]
        logits_BTV = self.lm_head(self.norm(x_BTD))

        lm_loss = loss = None
        if targets is not None:
            if last_only:
                raise ValueError("targets need the logits of every position (last_only=False)")
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal "
                                 f"idx shape {tuple(idx.shape)}")
            # Cross-entropy in float32: bf16 logits lose the small probabilities the loss averages.
            lm_loss = F.cross_entropy(logits_BTV.float().view(B * T, -1), targets.reshape(-1),
                                      ignore_index=-1)
            loss = lm_loss + aux_loss
        return logits_BTV, TransformerOutput(loss, lm_loss, aux_loss, counts, dropped)

    def new_cache(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        cfg, param = self.config, self.tok_emb.weight
        length = min(max_len or cfg.block_size, cfg.block_size)
        if cfg.mla is not None:  # the latent and the shared rotary key, once per position
            return [KVCache(batch, 1, length, cfg.mla.kv_lora_rank, param.device, param.dtype,
                            v_dim=cfg.mla.qk_rope_head_dim) for _ in range(cfg.n_layer)]
        return [KVCache(batch, cfg.n_kv_head, length, cfg.attn_head_dim, param.device, param.dtype)
                for _ in range(cfg.n_layer)]

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """Yield (B,) sampled token ids one step at a time, using a KV cache.

        When the context fills up, the cache is rebuilt from the last block_size // 2 tokens
        (the model never saw positions past block_size)."""
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"prompt must be (batch, time) with at least one token, got {tuple(idx.shape)}")
        block = self.config.block_size
        context = idx[:, -block:]
        # The cache holds what this call needs, not block_size (a long-context model's is large).
        cache = self.new_cache(idx.shape[0], context.shape[1] + max_new_tokens)
        capacity = cache[0].k_BGSQ.shape[2]
        logits_B1V, _ = self(context, cache=cache, last_only=True)
        for step in range(max_new_tokens):
            next_B = sample_next_token(logits_B1V[:, -1], temperature, top_k, top_p, generator)
            yield next_B
            if step == max_new_tokens - 1:
                return  # no forward for a token nobody asked for
            context = torch.cat((context, next_B[:, None]), dim=1)
            if cache[0].length >= capacity:
                context = context[:, -(block // 2):]
                cache = self.new_cache(idx.shape[0])
                logits_B1V, _ = self(context, cache=cache, last_only=True)
            else:
                logits_B1V, _ = self(next_B[:, None], cache=cache, last_only=True)


def sample_next_token(logits_BV: Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One token per row: greedy at temperature 0, else sampled from the top-k / nucleus (top-p) set."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k > 0:
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_BV = (cum_BV - sorted_BV.softmax(dim=-1)) >= top_p
        logits_BV = logits_BV.scatter(1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)
