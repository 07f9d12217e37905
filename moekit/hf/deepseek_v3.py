"""DeepSeek-V3 (DeepSeek-AI 2024): multi-head latent attention; after `first_k_dense_replace` dense
layers, MoE layers with sigmoid routing, a fixed selection bias (`e_score_correction_bias`),
group-limited choice by the top-2 sum of each group, renormalised weights times
`routed_scaling_factor`, and shared experts; YaRN RoPE with its softmax scale.

The checkpoint's rotary dims are interleaved pairs (`rope_interleave`); moekit rotates GPT-NeoX
halves, so the rows that make the rotary query and key parts are permuted on the way in and out.
The multi-token-prediction layer (model.layers.<num_hidden_layers>) is not imported."""

from __future__ import annotations

import re

from moekit.hf.common import (
    LAYER,
    Family,
    Options,
    base_to_hf,
    expert_rules,
    gated_ffn_rules,
    moe_to_hf,
    read_base,
    read_moe,
    skeleton_rules,
)
from moekit.hf.mapping import Permute, Rule, interleave_rope
from moekit.models.transformer import MLAConfig, TransformerConfig


def config_from_hf(options: Options) -> TransformerConfig:
    """A DeepSeek-V3 config.json as a moekit config."""
    base = read_base(options)
    options.expect("scoring_func", ("sigmoid",), "sigmoid")
    options.expect("topk_method", ("noaux_tc",), "noaux_tc")
    options.expect("moe_layer_freq", (1,), 1)
    options.read.update({"ep_size", "num_nextn_predict_layers", "aux_loss_alpha", "seq_aux", "qk_head_dim"})
    mla = MLAConfig(kv_lora_rank=options.need("kv_lora_rank"), qk_nope_head_dim=options.need("qk_nope_head_dim"),
                    qk_rope_head_dim=options.need("qk_rope_head_dim"), v_head_dim=options.need("v_head_dim"),
                    q_lora_rank=options.get("q_lora_rank"))
    if options.get("head_dim", mla.qk_rope_head_dim) != mla.qk_rope_head_dim:
        raise options.refuse("head_dim", options.data["head_dim"], "DeepSeek-V3 rotates qk_rope_head_dim dims")
    base["head_dim"] = None  # the head widths are the MLA fields
    options.get("rope_interleave")  # read by `rules`
    top_k = options.need("num_experts_per_tok")
    normalize = bool(options.get("norm_topk_prob", True))
    if normalize and top_k == 1:
        raise options.refuse("norm_topk_prob", True, "with num_experts_per_tok=1")
    moe = read_moe(options, base["d_model"], "n_routed_experts", "moe_intermediate_size", router="sigmoid_topk",
                   normalize_topk=normalize, selection_bias=True, group_score="top2_sum",
                   num_expert_groups=options.get("n_group", 1), topk_groups=options.get("topk_group", 1),
                   routed_scaling_factor=float(options.get("routed_scaling_factor", 1.0)),
                   num_shared_experts=options.get("n_shared_experts", 0),
                   shared_d_ff=options.need("moe_intermediate_size"))
    bias = bool(options.get("attention_bias", False))
    return TransformerConfig(**base, d_ff=options.need("intermediate_size"), bias=False, qkv_bias=bias,
                             attn_out_bias=bias, mla=mla, moe=moe,
                             first_dense_layers=min(options.get("first_k_dense_replace", 0), base["n_layer"]))


def config_to_hf(config: TransformerConfig) -> dict:
    """A moekit config as a DeepSeek-V3 config.json."""
    moe, mla = config.moe, config.mla
    first_moe = next((i for i in range(config.n_layer) if config.is_moe_layer(i)), config.n_layer)
    return {**base_to_hf(config, "deepseek_v3", "DeepseekV3ForCausalLM"), "head_dim": mla.qk_rope_head_dim,
            **moe_to_hf(moe, "n_routed_experts", "moe_intermediate_size"), "intermediate_size": config.d_ff,
            "n_shared_experts": moe.num_shared_experts, "n_group": moe.num_expert_groups,
            "topk_group": moe.topk_groups, "routed_scaling_factor": moe.routed_scaling_factor,
            "norm_topk_prob": moe.normalize_topk, "first_k_dense_replace": first_moe, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", "q_lora_rank": mla.q_lora_rank, "kv_lora_rank": mla.kv_lora_rank,
            "qk_nope_head_dim": mla.qk_nope_head_dim, "qk_rope_head_dim": mla.qk_rope_head_dim,
            "v_head_dim": mla.v_head_dim, "rope_interleave": True, "attention_bias": config.qkv_bias_on,
            "num_nextn_predict_layers": 0}


def rules(config: TransformerConfig, hf: dict) -> list[Rule]:
    """The DeepSeek-V3 weight table."""
    attn, mlp = f"{LAYER}.self_attn", f"{LAYER}.mlp"
    mla = config.mla
    N, R, C = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    q_rows = kv_rows = ()
    if hf.get("rope_interleave", True):
        q_rows = (Permute(interleave_rope(N + R, N, R)),)  # each head's rows: N plain, then R rotary
        kv_rows = (Permute(interleave_rope(C + R, C, R)),)  # the latent, then the shared rotary key
    return [
        *skeleton_rules(),
        Rule("blocks.{i}.attn.q_proj.weight", f"{attn}.q_proj.weight", layout=q_rows),
        Rule("blocks.{i}.attn.q_a_proj.weight", f"{attn}.q_a_proj.weight"),
        Rule("blocks.{i}.attn.q_a_proj.bias", f"{attn}.q_a_proj.bias"),
        Rule("blocks.{i}.attn.q_a_norm.weight", f"{attn}.q_a_layernorm.weight"),
        Rule("blocks.{i}.attn.q_b_proj.weight", f"{attn}.q_b_proj.weight", layout=q_rows),
        Rule("blocks.{i}.attn.kv_a_proj.weight", f"{attn}.kv_a_proj_with_mqa.weight", layout=kv_rows),
        Rule("blocks.{i}.attn.kv_a_proj.bias", f"{attn}.kv_a_proj_with_mqa.bias", layout=kv_rows),
        Rule("blocks.{i}.attn.kv_a_norm.weight", f"{attn}.kv_a_layernorm.weight"),
        Rule("blocks.{i}.attn.kv_b_proj.weight", f"{attn}.kv_b_proj.weight"),
        Rule("blocks.{i}.attn.out_proj.weight", f"{attn}.o_proj.weight"),
        Rule("blocks.{i}.attn.out_proj.bias", f"{attn}.o_proj.bias"),
        *gated_ffn_rules("blocks.{i}.ffn", mlp),
        Rule("blocks.{i}.ffn.router.weight", f"{mlp}.gate.weight"),
        Rule("blocks.{i}.ffn.router.expert_bias", f"{mlp}.gate.e_score_correction_bias"),
        *expert_rules("blocks.{i}.ffn.experts", f"{mlp}.experts"),
        *gated_ffn_rules("blocks.{i}.ffn.shared_experts", f"{mlp}.shared_experts"),
    ]


def is_mtp_tensor(name: str, hf: dict) -> bool:
    """A tensor of the multi-token-prediction layers, numbered after the last decoder layer."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= hf["num_hidden_layers"]


FAMILY = Family("deepseek_v3", "DeepseekV3ForCausalLM", config_from_hf, config_to_hf, rules, skip_tensor=is_mtp_tensor)
