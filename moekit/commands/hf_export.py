"""`moekit hf export`: a moekit model (or run) folder -> a Hugging Face checkpoint folder."""

from __future__ import annotations

import argparse

HELP = "export a moekit language model as a Hugging Face checkpoint that transformers loads with its own classes"
# moekit.hf.FAMILIES' names, spelled out so that `moekit --help` imports no torch (a test keeps them equal).
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "llama", "mistral", "qwen2",
            "qwen3")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="moekit model folder (from `moekit hf import`, `save_pretrained`, a run)")
    parser.add_argument("--out", required=True, help="Hugging Face folder to write")
    parser.add_argument("--family", choices=FAMILIES,
                        help="Hugging Face family to write (default: the first that holds the model exactly)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")


def run(args: argparse.Namespace) -> int:
    import json

    from moekit.hf import to_hf
    from moekit.hf.checkpoint import parse_size
    from moekit.models.transformer import Transformer

    parse_size(args.max_shard_size)  # a bad size fails before the model is read
    model = Transformer.from_pretrained(args.path)
    out = to_hf(model, args.out, args.family, tokenizer_from=args.path, max_shard_size=args.max_shard_size)
    config = json.loads((out / "config.json").read_text())
    shards = len(list(out.glob("*.safetensors")))
    print(f"wrote {out}: {config['architectures'][0]} ({config['model_type']}), {shards} safetensors file(s)")
    return 0
