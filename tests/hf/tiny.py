"""Tiny random Hugging Face models of every family moekit imports, saved by transformers itself.

Each config turns on the options its family is known for (sliding windows, QK-norm, biases,
clipping, YaRN, latent attention, dense layers among MoE ones) at sizes that run in milliseconds.
transformers initialises biases, sinks and selection biases to zero and norms to one; `build`
perturbs every tensor so that each one matters to the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=False)

CONFIGS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=5, rms_norm_eps=1e-5)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=40, moe_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=20,
                                         mlp_only_layers=[0], use_sliding_window=True, sliding_window=5,
                                         max_window_layers=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=40, moe_intermediate_size=16, num_experts=6,
                                         num_experts_per_tok=2, norm_topk_prob=True, head_dim=16,
                                         attention_bias=True, use_sliding_window=True, sliding_window=6)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=8, num_experts_per_tok=3, clip_qkv=0.5,
                                  eos_token_id=None)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                     sliding_window=4, swiglu_limit=0.5,
                                     rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=8.0,
                                                          original_max_position_embeddings=16, beta_fast=32.0,
                                                          beta_slow=1.0, truncate=False))),
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=12,
                                             n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, n_group=4,
                                             topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=12,
                                             qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6,
                                             routed_scaling_factor=2.5,
                                             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                                  original_max_position_embeddings=16, mscale=1.0,
                                                                  mscale_all_dim=0.8))),
    # dense models, for upcycling
    "llama": ("LlamaConfig", dict(intermediate_size=40, tie_word_embeddings=True,
                                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=16))),
    "qwen3": ("Qwen3Config", dict(intermediate_size=40, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=40)),
    "mistral": ("MistralConfig", dict(intermediate_size=40, sliding_window=5, head_dim=12)),
}
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"]
DENSE_FAMILIES = ["llama", "qwen3", "qwen2", "mistral"]


def hf_config(family: str, **overrides):
    import transformers

    name, kwargs = CONFIGS[family]
    return getattr(transformers, name)(**{**COMMON, **kwargs, **overrides})


def build(family: str, folder: Path, dtype: torch.dtype = torch.float32, **overrides):
    """A random `family` model saved into `folder` (with a tokenizer.json); returns it in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and "inv_freq" not in name:
                tensor.add_(torch.randn_like(tensor) * 0.1)
    model.generation_config.eos_token_id = None  # generate the full length
    model = model.to(dtype)
    model.save_pretrained(folder)
    save_char_tokenizer(folder)
    return model


CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n"


def save_char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer.json (one id per character, VOCAB ids at most)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    assert len(vocab) <= VOCAB
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(Path(folder) / "tokenizer.json"))
