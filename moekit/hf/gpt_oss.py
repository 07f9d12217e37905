"""GPT-OSS (OpenAI 2025): top-k routing with a router bias and softmax over the chosen logits;
experts with biases and a clamped SwiGLU (gate * sigmoid(1.702 gate) * (up + 1)); attention with
q/k/v/o biases, a learned sink per head, sliding and full layers alternating; YaRN RoPE.

Its experts are stored stacked and transposed, gate and up interleaved: gate_up_proj (E, D, 2F)
with gate = [..., ::2], up = [..., 1::2]; down_proj (E, F, D)."""

from __future__ import annotations

from moekit.hf.common import (
    LAYER,
    Family,
    Options,
    attention_rules,
    base_to_hf,
    layer_types,
    moe_to_hf,
    read_base,
    read_moe,
    read_windows,
    skeleton_rules,
)
from moekit.hf.mapping import Permute, Rule, Transpose, interleave_halves
from moekit.models.transformer import TransformerConfig


def config_from_hf(options: Options) -> TransformerConfig:
    """A GPT-OSS config.json as a moekit config."""
    base = read_base(options)
    n_layer = base["n_layer"]
    window, layers = read_windows(options, n_layer, lambda: [i for i in range(n_layer) if (i + 1) % 2])
    bias = bool(options.get("attention_bias", True))
    top_k = options.need("num_experts_per_tok")
    if options.data.get("experts_per_token", top_k) != top_k:  # the original release's duplicate key
        raise options.refuse("experts_per_token", options.data["experts_per_token"],
                             f"it contradicts num_experts_per_tok={top_k}")
    options.read.update({"experts_per_token", "initial_context_length"})
    moe = read_moe(options, base["d_model"], "num_local_experts", "intermediate_size", router="topk_softmax",
                   router_bias=True, expert_type="clamped_swiglu", expert_bias=True,
                   swiglu_alpha=float(options.get("swiglu_alpha", 1.702)),
                   swiglu_limit=float(options.get("swiglu_limit", 7.0)))
    return TransformerConfig(**base, d_ff=moe.d_ff, bias=False, qkv_bias=bias, attn_out_bias=bias, attn_sinks=True,
                             sliding_window=window, sliding_window_layers=layers, moe=moe)


def config_to_hf(config: TransformerConfig) -> dict:
    """A moekit config as a GPT-OSS config.json."""
    moe = config.moe
    return {**base_to_hf(config, "gpt_oss", "GptOssForCausalLM"),
            **moe_to_hf(moe, "num_local_experts", "intermediate_size"), "attention_bias": config.qkv_bias_on,
            "swiglu_alpha": moe.swiglu_alpha, "swiglu_limit": moe.swiglu_limit,
            "sliding_window": config.sliding_window, "layer_types": layer_types(config)}


def rules(config: TransformerConfig, hf: dict) -> list[Rule]:
    """The GPT-OSS weight table."""
    mlp = f"{LAYER}.mlp"
    interleave = Permute(interleave_halves, dim=1)
    return [*skeleton_rules(), *attention_rules(),
            Rule("blocks.{i}.ffn.router.weight", f"{mlp}.router.weight"),
            Rule("blocks.{i}.ffn.router.bias", f"{mlp}.router.bias"),
            Rule("blocks.{i}.ffn.experts.w_in", f"{mlp}.experts.gate_up_proj", layout=(interleave, Transpose())),
            Rule("blocks.{i}.ffn.experts.b_in", f"{mlp}.experts.gate_up_proj_bias", layout=(interleave,)),
            Rule("blocks.{i}.ffn.experts.w_out", f"{mlp}.experts.down_proj", layout=(Transpose(),)),
            Rule("blocks.{i}.ffn.experts.b_out", f"{mlp}.experts.down_proj_bias")]


FAMILY = Family("gpt_oss", "GptOssForCausalLM", config_from_hf, config_to_hf, rules)
