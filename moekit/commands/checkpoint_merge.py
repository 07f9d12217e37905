"""`moekit checkpoint merge`: an expert-parallel checkpoint folder -> one single-device file."""

from __future__ import annotations

import argparse

HELP = "merge an expert-parallel checkpoint's per-rank expert shards into one single-device file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="expert-parallel checkpoint folder")
    parser.add_argument("--output", required=True,
                        help="a .safetensors file, or a folder for model.safetensors + config + tokenizer")
    parser.add_argument("--seed", type=int, default=0, help="unused (deterministic); accepted for uniformity")


def run(args: argparse.Namespace) -> int:
    from moekit.distributed.checkpoint import read_layout, save_merged

    layout = read_layout(args.input)
    path = save_merged(args.input, args.output)
    print(f"merged {layout['expert_parallel']} expert shards ({len(layout['experts'])} expert tensors) "
          f"into {path}")
    return 0
