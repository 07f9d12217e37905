"""`moekit train lm`: train a dense or MoE transformer language model from a YAML config."""

from __future__ import annotations

import argparse
import os

HELP = "train a (MoE) transformer language model"
TUNE_MALLOC = True  # large short-lived activations: see moekit.cli.MALLOC_TUNABLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file (see configs/lm/); defaults apply to missing keys")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override config keys, e.g. model.n_layer=6 lr=1e-3 model.moe.top_k=1")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in out_dir\n"
                             "(same loss curve as an uninterrupted run)")
    parser.add_argument("--seed", type=int, help="random seed (overrides the config's)")
    parser.add_argument("--out-dir", help="run folder (overrides the config's out_dir)")
    parser.add_argument("--stop-at-step", type=int, help="save and stop after this step (resume later)")
    parser.add_argument("--expert-parallel", type=int, metavar="P",
                        help="spread each MoE layer's experts over groups of P ranks; launch with "
                             "torchrun --nproc_per_node N (N divisible by P)")


def run(args: argparse.Namespace) -> int:
    from moekit.train.lm import load_lm_config, train_lm

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.out_dir is not None:
        overrides.append(f"out_dir={args.out_dir}")
    config = load_lm_config(args.config, overrides)
    if args.expert_parallel is not None:
        import torch.distributed as dist

        from moekit.distributed.lm import train_lm_expert_parallel

        try:
            results = train_lm_expert_parallel(config, args.expert_parallel, resume=args.resume,
                                               stop_at_step=args.stop_at_step)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        if int(os.environ.get("RANK", 0)) != 0:
            return 0
    else:
        results = train_lm(config, resume=args.resume, stop_at_step=args.stop_at_step)
    params = results.parameters
    rows = [
        ("run folder", results.out_dir),
        ("steps / tokens", f"{results.steps:,} / {results.tokens:,}"),
        ("parameters (total / active)", f"{params.get('total', 0):,} / {params.get('active', 0):,}"),
        ("val loss (nats/token)", f"{results.val_loss:.4f}"),
        ("val bits per byte", f"{results.val_bits_per_byte:.4f}"),
        ("train tokens/s", f"{results.train_tokens_per_s:,.0f}"),
        ("peak memory (MB)", f"{results.peak_memory_mb:,.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
