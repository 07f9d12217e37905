"""What every family shares: reading config.json options (and refusing the ones moekit cannot
honour exactly), RoPE and sliding-window options, and the weight rules of attention, norms and
dense FFNs. A family module adds its own options and its MoE block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moekit.hf.mapping import Rule
from moekit.layers.config import MoEConfig
from moekit.models.transformer import RopeScaling, TransformerConfig

# Keys that do not change what the model computes: metadata, token ids, training-only settings
# (attention dropout, router jitter and aux-loss flags act only in training).
IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "output_router_logits", "output_attentions", "output_hidden_states", "return_dict", "attention_dropout",
    "router_jitter_noise", "auto_map", "tokenizer_class", "is_decoder", "is_encoder_decoder", "use_bfloat16",
    "torchscript", "tie_encoder_decoder", "chunk_size_feed_forward", "pretraining_tp", "id2label", "label2id",
    "problem_type", "finetuning_task", "task_specific_params", "prefix", "add_cross_attention",
})


class Unsupported(ValueError):
    """A config.json option moekit cannot reproduce exactly; the message names it."""


class HFImportWarning(UserWarning):
    """Something was left out on import (an MTP layer) or not read (an unknown config key)."""


class Options:
    """config.json as read by one family: remembers which keys were looked at, so the ones nobody
    read can be reported, and names the option in every refusal."""

    def __init__(self, data: dict, family: str) -> None:
        self.data, self.family, self.read = data, family, set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        value = self.data.get(key)
        return default if value is None else value

    def need(self, key: str) -> Any:
        self.read.add(key)
        if self.data.get(key) is None:
            raise Unsupported(f"config.json has no {key!r}, which a {self.family} config needs")
        return self.data[key]

    def expect(self, key: str, allowed: tuple, default: Any = None) -> Any:
        """The option, refused unless one of `allowed` (moekit implements only those)."""
        value = self.get(key, default)
        if value not in allowed:
            raise self.refuse(key, value, f"moekit supports {' or '.join(map(repr, allowed))}")
        return value

    def refuse(self, key: str, value: Any, why: str = "") -> Unsupported:
        return Unsupported(f"config.json option {key}={value!r} is not supported for {self.family}"
                           + (f" ({why})" if why else ""))

    def unread(self) -> list[str]:
        return sorted(set(self.data) - self.read - IGNORED)


def check_not_quantized(options: Options) -> None:
    """Refuse a quantised checkpoint (FP8, MXFP4, GPTQ, ...): moekit imports float weights."""
    if options.data.get("quantization_config") is not None:
        method = options.data["quantization_config"].get("quant_method", "?") \
            if isinstance(options.data["quantization_config"], dict) else "?"
        raise Unsupported(f"config.json option quantization_config (quant_method={method!r}) is not supported: "
                          f"moekit imports float32/bfloat16/float16 weights, not a quantised checkpoint")


# --- RoPE -------------------------------------------------------------------------------------

ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
             "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
             "truncate", "partial_rotary_factor"}


def read_rope(options: Options, default_theta: float = 10000.0) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = options.get("rope_parameters") or options.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise options.refuse("rope_scaling", params)
    where = "rope_parameters" if options.data.get("rope_parameters") else "rope_scaling"
    unknown = sorted(set(params) - ROPE_KEYS)
    if unknown:  # also nested per-layer-type parameters
        raise options.refuse(f"{where}.{unknown[0]}", params[unknown[0]], "moekit has one global RoPE")
    theta = float(params.get("rope_theta") or options.get("rope_theta", default_theta))
    partial = params.get("partial_rotary_factor", options.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise options.refuse("partial_rotary_factor", partial, "moekit rotates every head dim")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3", "yarn"):
        raise options.refuse(f"{where}.rope_type", kind, "moekit has default, linear, llama3 and yarn RoPE")
    max_len = options.need("max_position_embeddings")
    original = params.get("original_max_position_embeddings") or max_len
    factor = params.get("factor")
    if factor is None:
        if kind != "yarn":
            raise Unsupported(f"config.json {where} of type {kind!r} has no factor")
        factor = max_len / original
    scaling = RopeScaling(type=kind, factor=float(factor), original_max_len=int(original) if kind != "linear" else None)
    if kind == "llama3":
        scaling.low_freq_factor = float(params.get("low_freq_factor", 1.0))
        scaling.high_freq_factor = float(params.get("high_freq_factor", 4.0))
    if kind == "yarn":
        scaling.beta_fast = float(params.get("beta_fast") or 32.0)
        scaling.beta_slow = float(params.get("beta_slow") or 1.0)
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if params.get(key) is not None:
                setattr(scaling, key, float(params[key]))
        scaling.truncate = bool(params.get("truncate", True))
    scaling.__post_init__()
    return theta, scaling


def rope_to_hf(config: TransformerConfig) -> dict:
    """rope_theta and rope_scaling as both transformers 4 and 5 read them."""
    s = config.rope_scaling
    if s is None:
        return {"rope_theta": config.rope_theta, "rope_scaling": None}
    scaling: dict[str, Any] = {"rope_type": s.type, "factor": s.factor}
    if s.original_max_len is not None:
        scaling["original_max_position_embeddings"] = s.original_max_len
    if s.type == "llama3":
        scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.type == "yarn":
        scaling.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        scaling.update({k: getattr(s, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                        if getattr(s, k) is not None})
    return {"rope_theta": config.rope_theta, "rope_scaling": scaling}


# --- sliding windows --------------------------------------------------------------------------


def read_windows(options: Options, n_layer: int,
                 default_layers: Callable[[], list[int]]) -> tuple[int | None, list[int] | None]:
    """(sliding_window, sliding_window_layers) from `layer_types` where the config has it, else from
    the family's rule `default_layers()` (the layers transformers makes sliding)."""
    types = options.get("layer_types")
    if types is not None:
        if len(types) != n_layer or set(types) - {"full_attention", "sliding_attention"}:
            raise options.refuse("layer_types", types, "moekit has full_attention and sliding_attention layers")
        layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    else:
        layers = default_layers()
    if not layers:
        options.get("sliding_window")
        return None, None
    window = options.need("sliding_window")
    if not isinstance(window, int) or window < 1:
        raise options.refuse("sliding_window", window)
    return window, None if len(layers) == n_layer else layers


def sliding_layers(config: TransformerConfig) -> list[int]:
    """The layers of `config` that attend through a sliding window."""
    return [i for i in range(config.n_layer) if config.window_of_layer(i) is not None]


def layer_types(config: TransformerConfig) -> list[str]:
    """Hugging Face's `layer_types` list for `config`."""
    return ["sliding_attention" if config.window_of_layer(i) else "full_attention" for i in range(config.n_layer)]


# --- the options every decoder shares ----------------------------------------------------------


def read_base(options: Options, tie_default: bool = False) -> dict:
    """TransformerConfig fields every family spells the same way."""
    check_not_quantized(options)
    act = options.get("hidden_act", options.get("hidden_activation", "silu"))
    if act != "silu":
        raise options.refuse("hidden_act", act, "moekit's gated FFNs use silu (SwiGLU)")
    d_model, n_head = options.need("hidden_size"), options.need("num_attention_heads")
    head_dim = options.get("head_dim")
    theta, scaling = read_rope(options)
    return dict(
        vocab_size=options.need("vocab_size"), d_model=d_model, n_layer=options.need("num_hidden_layers"),
        n_head=n_head, n_kv_head=options.get("num_key_value_heads", n_head),
        head_dim=None if head_dim is None or head_dim * n_head == d_model else head_dim,
        block_size=options.need("max_position_embeddings"), norm_eps=float(options.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(options.get("tie_word_embeddings", tie_default)),
        init_std=float(options.get("initializer_range", 0.02)), rope_theta=theta, rope_scaling=scaling,
    )


def base_to_hf(config: TransformerConfig, model_type: str, architecture: str) -> dict:
    """The config.json keys every decoder family spells the same way (the inverse of `read_base`)."""
    return {
        "architectures": [architecture], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "head_dim": config.attn_head_dim, "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std, "hidden_act": "silu", "attention_dropout": 0.0,
        **rope_to_hf(config),
    }


def read_moe(options: Options, d_model: int, experts_key: str, d_ff_key: str, **fields) -> MoEConfig:
    """The MoE layer from the family's keys for the expert count and width, and the shared ones."""
    return MoEConfig(d_model=d_model, d_ff=options.need(d_ff_key), num_experts=options.need(experts_key),
                     top_k=options.need("num_experts_per_tok"),
                     aux_loss_coef=float(options.get("router_aux_loss_coef", 0.0)), **fields)


def moe_to_hf(moe: MoEConfig, experts_key: str, d_ff_key: str) -> dict:
    """The config.json keys of the MoE layer (the inverse of `read_moe`)."""
    return {experts_key: moe.num_experts, d_ff_key: moe.d_ff, "num_experts_per_tok": moe.top_k,
            "router_aux_loss_coef": moe.aux_loss_coef}


def softmax_router(options: Options) -> dict:
    """Softmax, top-k, renormalised over the k when `norm_topk_prob` (Qwen-MoE, OLMoE): moekit's
    topk_softmax gives exactly those weights (for k = 1 too), softmax_topk without renormalising
    the others."""
    if options.get("norm_topk_prob", False):
        return dict(router="topk_softmax")
    return dict(router="softmax_topk", normalize_topk=False)


def renormalized(moe: MoEConfig) -> bool:
    """`norm_topk_prob` of a softmax router (the inverse of `softmax_router`)."""
    return moe.router == "topk_softmax" or (moe.normalize_topk and moe.top_k > 1)


# --- weight rules -----------------------------------------------------------------------------

LAYER = "model.layers.{i}"


def skeleton_rules() -> list[Rule]:
    """Embedding, final norm, LM head and the two norms of every block."""
    return [
        Rule("tok_emb.weight", "model.embed_tokens.weight"),
        Rule("norm.weight", "model.norm.weight"),
        Rule("lm_head.weight", "lm_head.weight"),
        Rule("blocks.{i}.attn_norm.weight", f"{LAYER}.input_layernorm.weight"),
        Rule("blocks.{i}.ffn_norm.weight", f"{LAYER}.post_attention_layernorm.weight"),
    ]


def attention_rules() -> list[Rule]:
    """q/k/v/o projections with their biases, QK-norm weights and sinks (a rule whose tensor the
    model lacks simply matches nothing)."""
    attn = f"{LAYER}.self_attn"
    rules = []
    for kind in ("weight", "bias"):
        rules += [
            Rule(f"blocks.{{i}}.attn.q_proj.{kind}", f"{attn}.q_proj.{kind}"),
            Rule(f"blocks.{{i}}.attn.kv_proj.{kind}", f"{attn}.k_proj.{kind}", chunk=(0, 2)),
            Rule(f"blocks.{{i}}.attn.kv_proj.{kind}", f"{attn}.v_proj.{kind}", chunk=(1, 2)),
            Rule(f"blocks.{{i}}.attn.out_proj.{kind}", f"{attn}.o_proj.{kind}"),
        ]
    return rules + [
        Rule("blocks.{i}.attn.q_norm.weight", f"{attn}.q_norm.weight"),
        Rule("blocks.{i}.attn.k_norm.weight", f"{attn}.k_norm.weight"),
        Rule("blocks.{i}.attn.sinks", f"{attn}.sinks"),
    ]


def gated_ffn_rules(moekit: str, hf: str) -> list[Rule]:
    """A SwiGLU FFN [gate | up] -> down stored as gate_proj / up_proj / down_proj (with biases if any).
    `moekit` is the module path ('blocks.{i}.ffn'), `hf` the Hugging Face one ('model.layers.{i}.mlp')."""
    rules = []
    for kind in ("weight", "bias"):
        rules += [Rule(f"{moekit}.w_in.{kind}", f"{hf}.gate_proj.{kind}", chunk=(0, 2)),
                  Rule(f"{moekit}.w_in.{kind}", f"{hf}.up_proj.{kind}", chunk=(1, 2)),
                  Rule(f"{moekit}.w_out.{kind}", f"{hf}.down_proj.{kind}")]
    return rules


def expert_rules(moekit: str, hf: str, gate: str = "gate_proj", up: str = "up_proj",
                 down: str = "down_proj") -> list[Rule]:
    """Stacked experts `moekit`.w_in (E, 2F, D) / w_out (E, D, F) <-> one Linear per expert `hf`.{e}.<name>."""
    return [Rule(f"{moekit}.w_in", f"{hf}.{{e}}.{gate}.weight", chunk=(0, 2)),
            Rule(f"{moekit}.w_in", f"{hf}.{{e}}.{up}.weight", chunk=(1, 2)),
            Rule(f"{moekit}.w_out", f"{hf}.{{e}}.{down}.weight")]


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family: its config both ways and its weight-name table."""

    model_type: str
    architecture: str
    config_from_hf: Callable[[Options], TransformerConfig]
    config_to_hf: Callable[[TransformerConfig], dict]
    rules: Callable[[TransformerConfig, dict], list[Rule]]
    """The weight table for a model with this config and this Hugging Face config.json."""
    moe: bool = True
    """An MoE family (export and routing analysis), or a dense one (import and upcycling)."""
    skip_tensor: Callable[[str, dict], bool] = lambda name, hf: False
    """Tensors left out on import with a warning (DeepSeek-V3's multi-token-prediction layer)."""
