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
    moe_to_hf,
    read_base,
    read_moe,
    renormalized,
    skeleton_rules,
    softmax_router,
)
from moekit.hf.mapping import Rule
from moekit.models.transformer import TransformerConfig


def config_from_hf(options: Options) -> TransformerConfig:
    """A OLMoE config.json as a moekit config."""
    base = read_base(options)
    bias = bool(options.get("attention_bias", False))
    moe = read_moe(options, base["d_model"], "num_experts", "intermediate_size", **softmax_router(options))
    clip = options.get("clip_qkv")
    return TransformerConfig(**base, d_ff=moe.d_ff, bias=False, qkv_bias=bias, attn_out_bias=bias, qk_norm="full",
                             clip_qkv=None if clip is None else float(clip), moe=moe)


def config_to_hf(config: TransformerConfig) -> dict:
    """A moekit config as a OLMoE config.json."""
    return {**base_to_hf(config, "olmoe", "OlmoeForCausalLM"),
            **moe_to_hf(config.moe, "num_experts", "intermediate_size"), "norm_topk_prob": renormalized(config.moe),
            "attention_bias": config.qkv_bias_on, "clip_qkv": config.clip_qkv}


def rules(config: TransformerConfig, hf: dict) -> list[Rule]:
    """The OLMoE weight table."""
    mlp = f"{LAYER}.mlp"
    return [*skeleton_rules(), *attention_rules(), Rule("blocks.{i}.ffn.router.weight", f"{mlp}.gate.weight"),
            *expert_rules("blocks.{i}.ffn.experts", f"{mlp}.experts")]


FAMILY = Family("olmoe", "OlmoeForCausalLM", config_from_hf, config_to_hf, rules)
