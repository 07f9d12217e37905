"""`moekit hf import`: a Hugging Face checkpoint folder -> a moekit model folder."""

from __future__ import annotations

import argparse

HELP = "import a Hugging Face checkpoint (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, DeepSeek-V3; dense Llama, " \
       "Mistral, Qwen2/3) as a moekit model folder with the same logits"

DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--out", required=True, help="moekit model folder to write")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weights' dtype (auto: the checkpoint's)")


def print_warnings(caught) -> None:
    import sys

    for warning in caught:
        print(f"moekit: warning: {warning.message}", file=sys.stderr)


def describe(model) -> str:
    """One line: layers, experts, parameters, dtype."""
    cfg = model.config
    counts = model.num_parameters()
    moe = ""
    if model.moe_layers:
        moe = (f", {len(model.moe_layers)} MoE layers of {cfg.moe.num_experts} experts (top-{cfg.moe.top_k}"
               + (f", {cfg.moe.num_shared_experts} shared" if cfg.moe.num_shared_experts else "") + ")")
    return (f"{cfg.n_layer} layers{moe}, {counts['total']:,} parameters ({counts['active']:,} active), "
            f"{model.tok_emb.weight.dtype}".replace("torch.", ""))


def run(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from moekit.hf import HFImportWarning, import_folder

    dtype = None if DTYPES[args.dtype] is None else getattr(torch, DTYPES[args.dtype])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HFImportWarning)
        model = import_folder(args.path, args.out, dtype)
    print_warnings(caught)
    print(f"wrote {args.out}: {describe(model)}")
    return 0
