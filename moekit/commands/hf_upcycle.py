"""`moekit hf upcycle`: a dense Hugging Face checkpoint -> an MoE moekit model folder (sparse upcycling)."""

from __future__ import annotations

import argparse

HELP = "turn a dense Llama / Mistral / Qwen2 / Qwen3 checkpoint into an MoE whose experts start as copies " \
       "of each FFN (same logits at initialisation)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="dense Hugging Face model folder")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--out", required=True, help="moekit model folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new routers' initialisation")


def run(args: argparse.Namespace) -> int:
    import warnings

    from moekit.commands.hf_import import describe, print_warnings
    from moekit.hf import HFImportWarning, upcycle_folder
    from moekit.layers.config import MoEConfig

    MoEConfig(d_model=1, d_ff=1, num_experts=args.experts, top_k=args.top_k)  # names a bad value before reading
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HFImportWarning)
        model = upcycle_folder(args.path, args.out, args.experts, args.top_k, args.seed)
    print_warnings(caught)
    print(f"wrote {args.out}: {describe(model)}")
    return 0
