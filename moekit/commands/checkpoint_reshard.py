"""`moekit checkpoint reshard`: re-write an expert-parallel checkpoint for another expert-parallel size."""

from __future__ import annotations

import argparse

HELP = "re-shard an expert-parallel checkpoint for another --expert-parallel size (model weights only)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="expert-parallel checkpoint folder")
    parser.add_argument("--output", required=True, help="folder to write the re-sharded checkpoint to")
    parser.add_argument("--expert-parallel", type=int, required=True, help="P of the new run")
    parser.add_argument("--seed", type=int, default=0, help="unused (deterministic); accepted for uniformity")


def run(args: argparse.Namespace) -> int:
    from moekit.distributed.checkpoint import read_layout, reshard_checkpoint

    layout = read_layout(args.input)
    path = reshard_checkpoint(args.input, args.output, args.expert_parallel)
    print(f"re-sharded expert_parallel={layout['expert_parallel']} -> {args.expert_parallel} into {path} "
          "(optimizer state is not carried over)")
    return 0
