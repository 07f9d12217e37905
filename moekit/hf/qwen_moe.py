"""Qwen-MoE: Qwen1.5/Qwen2-MoE (`qwen2_moe`: q/k/v biases, a shared expert with a sigmoid gate) and
Qwen3-MoE (`qwen3_moe`: per-head QK-norm, no shared expert). Both route softmax-then-top-k,
renormalised when `norm_topk_prob`, and choose their MoE layers with `mlp_only_layers` and
`decoder_sparse_step`."""

from __future__ import annotations

from moekit.hf.common import (
    LAYER,
    Family,
    Options,
    attention_rules,
    base_to_hf,
    expert_rules,
    gated_ffn_rules,
    layer_types,
    moe_to_hf,
    read_base,
    read_moe,
    read_windows,
    renormalized,
    skeleton_rules,
    softmax_router,
)
from moekit.hf.mapping import Rule
from moekit.layers.config import MoEConfig
from moekit.models.transformer import TransformerConfig


def moe_layer_list(options: Options, n_layer: int) -> list[int] | None:
    """The layers transformers makes sparse; None when that is every layer."""
    step = options.get("decoder_sparse_step", 1)
    dense = set(options.get("mlp_only_layers", []))
    layers = [i for i in range(n_layer) if i not in dense and (i + 1) % step == 0]
    return None if len(layers) == n_layer else layers


def read_qwen_moe(options: Options, d_model: int, **extra) -> MoEConfig:
    """The MoE layer of a Qwen-MoE config.json (softmax routing, renormalised when `norm_topk_prob`)."""
    # transformers 5 saves a Qwen3-MoE's expert count as num_local_experts, releases as num_experts
    key = "num_experts" if options.data.get("num_experts") is not None else "num_local_experts"
    options.read.update({"num_experts", "num_local_experts"})
    return read_moe(options, d_model, key, "moe_intermediate_size", **softmax_router(options), **extra)


def qwen_moe_to_hf(config: TransformerConfig) -> dict:
    """The MoE keys of a Qwen-MoE config.json, the MoE layers as `mlp_only_layers`."""
    moe = config.moe
    moe_layers = [i for i in range(config.n_layer) if config.is_moe_layer(i)]
    return {**moe_to_hf(moe, "num_experts", "moe_intermediate_size"), "intermediate_size": config.d_ff,
            "norm_topk_prob": renormalized(moe), "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(config.n_layer) if i not in moe_layers]}


def qwen2_config_from_hf(options: Options) -> TransformerConfig:
    """A Qwen2-MoE config.json as a moekit config."""
    base = read_base(options)
    n_layer = base["n_layer"]
    use_sliding = options.get("use_sliding_window", False)
    max_window_layers = options.get("max_window_layers", n_layer)
    # transformers 5's rule for a Qwen2-MoE config without layer_types
    window, layers = read_windows(options, n_layer, lambda: [i for i in range(n_layer) if use_sliding
                                                             and (i + 1) % 2 and i < max_window_layers])
    shared = options.need("shared_expert_intermediate_size")
    if shared < 1:
        raise options.refuse("shared_expert_intermediate_size", shared)
    moe = read_qwen_moe(options, base["d_model"], num_shared_experts=1, shared_d_ff=shared, shared_expert_gate=True)
    qkv_bias = bool(options.get("qkv_bias", True))
    return TransformerConfig(**base, d_ff=options.need("intermediate_size"), qkv_bias=qkv_bias, attn_out_bias=False,
                             sliding_window=window, sliding_window_layers=layers, moe=moe,
                             moe_layers=moe_layer_list(options, n_layer))


def qwen2_config_to_hf(config: TransformerConfig) -> dict:
    """A moekit config as a Qwen2-MoE config.json."""
    sliding = any(config.window_of_layer(i) for i in range(config.n_layer))
    return {**base_to_hf(config, "qwen2_moe", "Qwen2MoeForCausalLM"), **qwen_moe_to_hf(config),
            "shared_expert_intermediate_size": config.moe.shared_width, "qkv_bias": config.qkv_bias_on,
            "use_sliding_window": sliding, "sliding_window": config.sliding_window if sliding else None,
            "layer_types": layer_types(config), "max_window_layers": config.n_layer}


def qwen3_config_from_hf(options: Options) -> TransformerConfig:
    """A Qwen3-MoE config.json as a moekit config."""
    base = read_base(options)
    n_layer = base["n_layer"]
    options.get("max_window_layers")  # transformers 5 slides every layer of a Qwen3-MoE
    use_sliding = options.get("use_sliding_window", False)
    options.read.add("layer_types")
    window = options.need("sliding_window") if use_sliding else None
    if not use_sliding:
        options.get("sliding_window")
    bias = bool(options.get("attention_bias", False))
    return TransformerConfig(**base, d_ff=options.need("intermediate_size"), bias=False, qkv_bias=bias,
                             attn_out_bias=bias, qk_norm="head", sliding_window=window,
                             moe=read_qwen_moe(options, base["d_model"]), moe_layers=moe_layer_list(options, n_layer))


def qwen3_config_to_hf(config: TransformerConfig) -> dict:
    """A moekit config as a Qwen3-MoE config.json."""
    return {**base_to_hf(config, "qwen3_moe", "Qwen3MoeForCausalLM"), **qwen_moe_to_hf(config),
            "attention_bias": config.qkv_bias_on, "use_sliding_window": config.sliding_window is not None,
            "sliding_window": config.sliding_window, "max_window_layers": config.n_layer}


def rules(config: TransformerConfig, hf: dict) -> list[Rule]:
    """The Qwen-MoE weight table: attention, dense and sparse MLPs, the shared expert and its gate."""
    mlp = f"{LAYER}.mlp"
    return [*skeleton_rules(), *attention_rules(), *gated_ffn_rules("blocks.{i}.ffn", mlp),
            Rule("blocks.{i}.ffn.router.weight", f"{mlp}.gate.weight"),
            *expert_rules("blocks.{i}.ffn.experts", f"{mlp}.experts"),
            *gated_ffn_rules("blocks.{i}.ffn.shared_experts", f"{mlp}.shared_expert"),
            Rule("blocks.{i}.ffn.shared_gate.weight", f"{mlp}.shared_expert_gate.weight")]


QWEN2_MOE = Family("qwen2_moe", "Qwen2MoeForCausalLM", qwen2_config_from_hf, qwen2_config_to_hf, rules)
QWEN3_MOE = Family("qwen3_moe", "Qwen3MoeForCausalLM", qwen3_config_from_hf, qwen3_config_to_hf, rules)
