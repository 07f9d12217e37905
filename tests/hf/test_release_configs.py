"""config.json files as the releases publish them (older transformers spelling: rope_theta and
rope_scaling, original keys) are read without warnings into the intended moekit config. Weights
are not needed: only the config translation is checked here; the logits are checked on tiny
models in test_import_export.py."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from moekit.hf import HFImportWarning, Unsupported
from moekit.hf.convert import read_hf_config

GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


def read(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error", HFImportWarning)
        return read_hf_config(tmp_path)[2]


def test_gpt_oss_release_config(tmp_path):
    config = read(tmp_path, GPT_OSS_20B)
    assert config.sliding_window == 128 and config.sliding_window_layers == list(range(0, 24, 2))
    assert config.attn_sinks and config.head_dim == 64 and config.qkv_bias and config.attn_out_bias
    assert (config.rope_scaling.type, config.rope_scaling.factor, config.rope_scaling.truncate) == ("yarn", 32.0, False)
    moe = config.moe
    assert (moe.num_experts, moe.top_k, moe.router, moe.router_bias) == (32, 4, "topk_softmax", True)
    assert (moe.expert_type, moe.expert_bias, moe.swiglu_limit) == ("clamped_swiglu", True, 7.0)


def test_deepseek_v3_release_config(tmp_path):
    config = read(tmp_path, DEEPSEEK_V3)
    assert config.first_dense_layers == 3 and config.d_ff == 18432 and config.moe.d_ff == 2048
    assert (config.mla.kv_lora_rank, config.mla.q_lora_rank, config.mla.qk_rope_head_dim) == (512, 1536, 64)
    moe = config.moe
    assert (moe.router, moe.selection_bias, moe.num_expert_groups, moe.topk_groups) == ("sigmoid_topk", True, 8, 4)
    assert (moe.routed_scaling_factor, moe.num_shared_experts, moe.group_score) == (2.5, 1, "top2_sum")
    assert config.rope_scaling.mscale_all_dim == 1.0 and config.rope_scaling.factor == 40.0
    assert config.mla_softmax_scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)


def test_qwen3_moe_release_config(tmp_path):
    config = read(tmp_path, QWEN3_30B_A3B)
    assert config.qk_norm == "head" and config.head_dim == 128 and config.sliding_window is None
    assert (config.moe.num_experts, config.moe.top_k, config.moe.router) == (128, 8, "topk_softmax")
    assert config.rope_theta == 1e6 and config.rope_scaling is None and config.moe_layers is None


def test_the_released_quantised_files_are_refused(tmp_path):
    with pytest.raises(Unsupported, match="quantization_config \\(quant_method='fp8'\\)"):
        read(tmp_path, {**DEEPSEEK_V3, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}})
