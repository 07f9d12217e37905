"""Hugging Face checkpoints in and out of moekit.

`from_hf(path)` reads a Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS or DeepSeek-V3 checkpoint
(or a dense Llama, Mistral, Qwen2, Qwen3) into a `moekit.models.transformer.Transformer` with the
same logits; `to_hf(model, folder)` writes one that transformers loads with its own classes;
`upcycle(model, num_experts, top_k)` turns a dense model into an MoE whose experts start as copies
of its FFNs. One module per family holds its config options and its weight-name table
(`moekit.hf.mapping.Rule`). Needs `safetensors` (the `train` extra), not transformers.
"""

from moekit.hf.common import HFImportWarning, Unsupported
from moekit.hf.convert import FAMILIES, from_hf, import_folder, to_hf, upcycle, upcycle_folder

__all__ = ["FAMILIES", "HFImportWarning", "Unsupported", "from_hf", "import_folder", "to_hf", "upcycle",
           "upcycle_folder"]
