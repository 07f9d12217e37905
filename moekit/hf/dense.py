"""Dense decoders to import and upcycle: Llama (optional llama3 RoPE, attention / MLP biases),
Mistral (sliding window), Qwen2 (q/k/v biases) and Qwen3 (per-head QK-norm)."""

from __future__ import annotations

from moekit.hf.common import (
    Family,
    Options,
    attention_rules,
    base_to_hf,
    gated_ffn_rules,
    layer_types,
    read_base,
    read_windows,
    skeleton_rules,
)
from moekit.hf.mapping import Rule
from moekit.models.transformer import TransformerConfig


def rules(config: TransformerConfig, hf: dict) -> list[Rule]:
    """The weight table of a dense decoder: embeddings, norms, attention, gated FFNs."""
    return [*skeleton_rules(), *attention_rules(), *gated_ffn_rules("blocks.{i}.ffn", "model.layers.{i}.mlp")]


def llama_from_hf(options: Options) -> TransformerConfig:
    """A Llama config.json as a moekit config."""
    base = read_base(options)
    attn_bias = bool(options.get("attention_bias", False))
    return TransformerConfig(**base, d_ff=options.need("intermediate_size"), bias=bool(options.get("mlp_bias", False)),
                             qkv_bias=attn_bias, attn_out_bias=attn_bias)


def llama_to_hf(config: TransformerConfig) -> dict:
    """A moekit config as a Llama config.json."""
    return {**base_to_hf(config, "llama", "LlamaForCausalLM"), "intermediate_size": config.d_ff,
            "attention_bias": config.qkv_bias_on, "mlp_bias": config.bias}


def mistral_from_hf(options: Options) -> TransformerConfig:
    """A Mistral config.json as a moekit config."""
    base = read_base(options)
    n_layer = base["n_layer"]
    window, layers = read_windows(options, n_layer,
                                  lambda: list(range(n_layer)) if options.get("sliding_window") else [])
    return TransformerConfig(**base, d_ff=options.need("intermediate_size"), sliding_window=window,
                             sliding_window_layers=layers)


def mistral_to_hf(config: TransformerConfig) -> dict:
    """A moekit config as a Mistral config.json."""
    return {**base_to_hf(config, "mistral", "MistralForCausalLM"), "intermediate_size": config.d_ff,
            "sliding_window": config.sliding_window}


def qwen_windows(options: Options, n_layer: int) -> tuple[int | None, list[int] | None]:
    """Qwen2/Qwen3's sliding windows: `layer_types`, or the layers from max_window_layers on."""
    use_sliding = options.get("use_sliding_window", False)
    max_window_layers = options.get("max_window_layers", n_layer)
    # transformers 5's rule for a Qwen2/Qwen3 config without layer_types
    return read_windows(options, n_layer, lambda: [i for i in range(n_layer) if use_sliding and i >= max_window_layers])


def qwen2_from_hf(options: Options) -> TransformerConfig:
    """A Qwen2 config.json as a moekit config."""
    base = read_base(options)
    window, layers = qwen_windows(options, base["n_layer"])
    return TransformerConfig(**base, d_ff=options.need("intermediate_size"), qkv_bias=True, attn_out_bias=False,
                             sliding_window=window, sliding_window_layers=layers)


def qwen2_to_hf(config: TransformerConfig) -> dict:
    """A moekit config as a Qwen2 config.json."""
    sliding = config.sliding_window is not None
    return {**base_to_hf(config, "qwen2", "Qwen2ForCausalLM"), "intermediate_size": config.d_ff,
            "use_sliding_window": sliding, "sliding_window": config.sliding_window, "layer_types": layer_types(config)}


def qwen3_from_hf(options: Options) -> TransformerConfig:
    """A Qwen3 config.json as a moekit config."""
    base = read_base(options)
    window, layers = qwen_windows(options, base["n_layer"])
    bias = bool(options.get("attention_bias", False))
    return TransformerConfig(**base, d_ff=options.need("intermediate_size"), qkv_bias=bias, attn_out_bias=bias,
                             qk_norm="head", sliding_window=window, sliding_window_layers=layers)


def qwen3_to_hf(config: TransformerConfig) -> dict:
    """A moekit config as a Qwen3 config.json."""
    return {**qwen2_to_hf(config), "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
            "attention_bias": config.qkv_bias_on}


LLAMA = Family("llama", "LlamaForCausalLM", llama_from_hf, llama_to_hf, rules, moe=False)
MISTRAL = Family("mistral", "MistralForCausalLM", mistral_from_hf, mistral_to_hf, rules, moe=False)
QWEN2 = Family("qwen2", "Qwen2ForCausalLM", qwen2_from_hf, qwen2_to_hf, rules, moe=False)
QWEN3 = Family("qwen3", "Qwen3ForCausalLM", qwen3_from_hf, qwen3_to_hf, rules, moe=False)
