"""Mixtral (Jiang et al. 2024, "Mixtral of Experts"): every FFN an MoE of 8 SwiGLU experts, top-2
softmax routing renormalised over the chosen two (moekit's topk_softmax: the same weights);
grouped-query attention, optional sliding window."""

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
    read_windows,
    skeleton_rules,
)
from moekit.hf.mapping import Rule
from moekit.models.transformer import TransformerConfig


def config_from_hf(options: Options) -> TransformerConfig:
    """A Mixtral config.json as a moekit config."""
    base = read_base(options)
    n_layer = base["n_layer"]
    window, layers = read_windows(options, n_layer,
                                  lambda: list(range(n_layer)) if options.get("sliding_window") else [])
    moe = read_moe(options, base["d_model"], "num_local_experts", "intermediate_size", router="topk_softmax")
    return TransformerConfig(**base, d_ff=moe.d_ff, sliding_window=window, sliding_window_layers=layers, moe=moe)


def config_to_hf(config: TransformerConfig) -> dict:
    """A moekit config as a Mixtral config.json."""
    return {**base_to_hf(config, "mixtral", "MixtralForCausalLM"),
            **moe_to_hf(config.moe, "num_local_experts", "intermediate_size"), "sliding_window": config.sliding_window}


def rules(config: TransformerConfig, hf: dict) -> list[Rule]:
    """The Mixtral weight table."""
    moe = f"{LAYER}.block_sparse_moe"
    return [*skeleton_rules(), *attention_rules(),
            Rule("blocks.{i}.ffn.router.weight", f"{moe}.gate.weight"),
            *expert_rules("blocks.{i}.ffn.experts", f"{moe}.experts", "w1", "w3", "w2")]


FAMILY = Family("mixtral", "MixtralForCausalLM", config_from_hf, config_to_hf, rules)
