"""A decoder-only transformer language model whose FFNs are dense or Mixture-of-Experts.

Reads top to bottom like nanoGPT: RMSNorm -> rotary embedding -> CausalSelfAttention -> Block ->
TransformerConfig -> Transformer. The model knows nothing of optimizers, schedules or
process groups: those live in `moekit.train` and `moekit.distributed`.

Shape suffixes: B sequences, T positions (S: positions in the KV cache), D d_model, H heads,
G key/value heads, Q head dim, V vocabulary, E experts.

References: Radford et al. 2019 (GPT-2, pre-norm decoder); Zhang & Sennrich 2019 (RMSNorm);
Su et al. 2021 (RoPE); Ainslie et al. 2023 (grouped-query attention); Shazeer et al. 2017 and
Fedus et al. 2021 (MoE FFNs, the auxiliary loss); Dai et al. 2024 (DeepSeekMoE: first layers dense,
shared + fine-grained experts).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.config import EXPERT_TYPES, MoEConfig
from moekit.layers.experts import FeedForward, GroupedExperts
from moekit.layers.moe import MoE
from moekit.models.pretrained import Pretrained


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32: the mean of squares of bf16 activations loses too many digits.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin, each (max_len, head_dim // 2), for rotary position embedding."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHTQ: Tensor, cos_TQ: Tensor, sin_TQ: Tensor) -> Tensor:
    """Rotate the pairs (x[i], x[i + Q/2]) by each position's angles (the GPT-NeoX layout)."""
    x1, x2 = x_BHTQ.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos_TQ - x2 * sin_TQ, x2 * cos_TQ + x1 * sin_TQ), dim=-1)
    return out.to(x_BHTQ.dtype)


class KVCache:
    """Keys and values of the positions seen so far, for one layer, preallocated to `max_len`."""

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, device, dtype) -> None:
        self.k_BGSQ = torch.zeros(batch, num_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v_BGSQ = torch.zeros_like(self.k_BGSQ)
        self.length = 0

    def append(self, k_BGTQ: Tensor, v_BGTQ: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k_BGTQ.shape[2]
        if end > self.k_BGSQ.shape[2]:
            raise ValueError(f"KV cache holds {self.k_BGSQ.shape[2]} positions; got {end}")
        self.k_BGSQ[:, :, self.length:end] = k_BGTQ
        self.v_BGSQ[:, :, self.length:end] = v_BGTQ
        self.length = end
        return self.k_BGSQ[:, :, :end], self.v_BGSQ[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.d_model // config.n_head
        self.q_proj = nn.Linear(config.d_model, self.n_head * self.head_dim, bias=config.bias)
        # Grouped-query attention: G < H key/value heads, each shared by H/G query heads.
        self.kv_proj = nn.Linear(config.d_model, 2 * self.n_kv_head * self.head_dim, bias=config.bias)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x_BTD: Tensor, cos_TQ: Tensor, sin_TQ: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, D = x_BTD.shape
        q_BHTQ = self.q_proj(x_BTD).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k_BTGQ, v_BTGQ = self.kv_proj(x_BTD).view(B, T, 2, self.n_kv_head, self.head_dim).unbind(2)
        k_BGTQ, v_BGTQ = k_BTGQ.transpose(1, 2), v_BTGQ.transpose(1, 2)
        q_BHTQ, k_BGTQ = apply_rope(q_BHTQ, cos_TQ, sin_TQ), apply_rope(k_BGTQ, cos_TQ, sin_TQ)

        past = 0
        if cache is not None:
            past = cache.length
            k_BGTQ, v_BGTQ = cache.append(k_BGTQ, v_BGTQ)  # now (B, G, past + T, Q)
        if self.n_kv_head != self.n_head:
            # repeat_interleave keeps query head h on kv head h // (H/G), the usual GQA layout.
            k_BGTQ = k_BGTQ.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v_BGTQ = v_BGTQ.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        mask = None
        if past > 0 and T > 1:
            # A chunk after cached positions: query i sees every cached key and chunk keys <= i.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x_BTD.device).tril(diagonal=past)
        y_BHTQ = F.scaled_dot_product_attention(
            q_BHTQ, k_BGTQ, v_BGTQ, attn_mask=mask, is_causal=past == 0 and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y_BTD = y_BHTQ.transpose(1, 2).reshape(B, T, D)
        return F.dropout(self.out_proj(y_BTD), self.dropout, self.training)


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
        self.attn = CausalSelfAttention(config)
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


@dataclass
class TransformerConfig:
    vocab_size: int = 256
    """256 = the byte-level tokenizer; a BPE tokenizer sets its own size."""
    block_size: int = 256
    """Longest context (the RoPE tables and the KV cache are this long)."""
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention; None = n_head (plain multi-head)."""
    d_model: int = 128
    d_ff: int | None = None
    """Hidden width of the dense FFNs; None = 4 * d_model (2/3 of that, rounded to 8, when gated,
    so a gated FFN has the parameters of a 4x MLP)."""
    ffn_type: str = "swiglu"
    """Dense FFN kind, as MoE experts: swiglu, geglu, mlp, linear."""
    activation: str = "gelu"
    bias: bool = False
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    """Share the token embedding and the output projection (fewer parameters, as in GPT-2)."""
    init_std: float = 0.02
    moe: MoEConfig | None = None
    """None: every FFN dense. Otherwise the MoE layers' config (its d_model must equal d_model)."""
    moe_every: int = 1
    """Every `moe_every`-th layer after the first dense ones is an MoE (2 = alternate, as in GShard)."""
    first_dense_layers: int = 0
    """Keep the first layers dense (DeepSeekMoE: early layers balance poorly and gain little)."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from a YAML/JSON file: d_model defaults to the model's
            self.moe = MoEConfig(**{"d_model": self.d_model, **self.moe})
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            gated = self.ffn_type in ("swiglu", "geglu")
            self.d_ff = 8 * round(4 * self.d_model * 2 / 3 / 8) if gated else 4 * self.d_model
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff",
                     "moe_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model must be divisible by n_head "
                             f"(got d_model={self.d_model}, n_head={self.n_head})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head dim d_model/n_head must be even for RoPE "
                             f"(got {self.d_model // self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head must be divisible by n_kv_head (got n_head={self.n_head}, "
                             f"n_kv_head={self.n_kv_head})")
        if self.ffn_type not in EXPERT_TYPES:
            raise ValueError(f"unknown ffn_type={self.ffn_type!r}; expected one of {', '.join(EXPERT_TYPES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {self.dropout})")
        if not 0 <= self.first_dense_layers <= self.n_layer:
            raise ValueError(f"first_dense_layers must be in 0..n_layer={self.n_layer} "
                             f"(got {self.first_dense_layers})")
        if self.moe is not None and self.moe.d_model != self.d_model:
            raise ValueError(f"moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")

    @staticmethod
    def _prepare_config_dict(data: dict) -> dict:
        """For `moekit.config.build_dataclass`: the MoE layers take the model's width unless told otherwise."""
        if isinstance(data.get("moe"), dict):
            data["moe"] = {"d_model": data.get("d_model", TransformerConfig.d_model), **data["moe"]}
        return data

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.moe is None or layer_idx < self.first_dense_layers:
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
        cos, sin = rope_tables(config.d_model // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

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

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                cache: list[KVCache] | None = None) -> tuple[Tensor, TransformerOutput]:
        """idx (B, T) token ids -> logits (B, T, V) and a `TransformerOutput`.

        With `cache` (one `KVCache` per layer), idx continues the cached positions.
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
        logits_BTV = self.lm_head(self.norm(x_BTD))

        lm_loss = loss = None
        if targets is not None:
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
        head_dim = cfg.d_model // cfg.n_head
        return [KVCache(batch, cfg.n_kv_head, max_len or cfg.block_size, head_dim, param.device, param.dtype)
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
        cache = self.new_cache(idx.shape[0])
        logits_BTV, _ = self(context, cache=cache)
        for _ in range(max_new_tokens):
            next_B = sample_next_token(logits_BTV[:, -1], temperature, top_k, top_p, generator)
            yield next_B
            context = torch.cat((context, next_B[:, None]), dim=1)
            if cache[0].length >= block:
                context = context[:, -(block // 2):]
                cache = self.new_cache(idx.shape[0])
                logits_BTV, _ = self(context, cache=cache)
            else:
                logits_BTV, _ = self(next_B[:, None], cache=cache)


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
