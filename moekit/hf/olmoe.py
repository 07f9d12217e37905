"""OLMoE (Muennighoff et al. 2024): 64 small SwiGLU experts, top-8 softmax routing, QK-norm over
the whole query and key projections, optional q/k/v clipping."""

from __future__ import annotations

from moekit.hf.common import (
    LAYER,
    Family,
    Options,
    attention_rules,
    base_to_hf,
    expert_rules,
    read_base,
    skeleton_rules,
)
from moekit.hf.mapping import Rule
from moekit.hf.qwen_moe import renormalized, softmax_router
from moekit.layers.config import MoEConfig
from moekit.models.transformer import TransformerConfig


def config_from_hf(options: Options) -> TransformerConfig:
    base = read_base(options)
    d_ff = options.need("intermediate_size")
    bias = bool(options.get("attention_bias", False))
    moe = MoEConfig(d_model=base["d_model"], d_ff=d_ff, num_experts=options.need("num_experts"),
                    top_k=options.need("num_experts_per_tok"), **softmax_router(options),
                    aux_loss_coef=float(options.get("router_aux_loss_coef", 0.0)))
    clip = options.get("clip_qkv")
    return TransformerConfig(**base, d_ff=d_ff, bias=False, qkv_bias=bias, attn_out_bias=bias, qk_norm="full",
                             clip_qkv=None if clip is None else float(clip), moe=moe)


def config_to_hf(config: TransformerConfig) -> dict:
    moe = config.moe
    return {**base_to_hf(config, "olmoe", "OlmoeForCausalLM"), "intermediate_size": moe.d_ff,
            "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "norm_topk_prob": renormalized(moe),
            "attention_bias": config.qkv_bias_on, "clip_qkv": config.clip_qkv,
            "router_aux_loss_coef": moe.aux_loss_coef}


def rules(config: TransformerConfig, hf: dict) -> list[Rule]:
    mlp = f"{LAYER}.mlp"
    return [*skeleton_rules(), *attention_rules(), Rule("blocks.{i}.ffn.router.weight", f"{mlp}.gate.weight"),
            *expert_rules("blocks.{i}.ffn.experts", f"{mlp}.experts")]


FAMILY = Family("olmoe", "OlmoeForCausalLM", config_from_hf, config_to_hf, rules)
