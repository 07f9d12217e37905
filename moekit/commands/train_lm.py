"""`moekit train lm`: train a dense or MoE transformer language model from a YAML config."""

from __future__ import annotations

import argparse

HELP = "train a (MoE) transformer language model"
TUNE_MALLOC = True  # large short-lived activations: see moekit.cli.MALLOC_TUNABLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.commands.shared import add_train_arguments
    from moekit.train.lm import LMConfig

    add_train_arguments(parser, LMConfig, "lm", data_dir_key="data.path")
    run = parser.add_argument_group("lm")
    run.add_argument("--stop-at-step", type=int, metavar="N", help="save and stop after step N (resume later)")
    run.add_argument("--expert-parallel", type=int, metavar="P",
                     help="spread each MoE layer's experts over groups of P ranks; launch with "
                          "torchrun --nproc_per_node N (N divisible by P)")


def run(args: argparse.Namespace) -> int:
    import os

    from moekit.commands.shared import train_runs

    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise ValueError(f"--stop-at-step must be >= 1 (got {args.stop_at_step})")
    if args.expert_parallel is not None and args.expert_parallel < 1:
        raise ValueError(f"--expert-parallel must be >= 1 (got {args.expert_parallel})")
    from moekit.train.lm import LMConfig

    results = train_runs(args, "lm", LMConfig, _fit(args), base=init_sections(vars(args).get("cfg:train.init")))
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    for result in results:
        params = result.extra["parameters"]
        rows = [
            ("run folder", str(result.out)),
            ("steps / tokens", f"{result.steps:,} / {result.extra['tokens']:,}"),
            ("parameters (total / active)", f"{params.get('total', 0):,} / {params.get('active', 0):,}"),
            ("val loss (nats/token)", f"{result.test['val_loss']:.4f}"),
            ("val bits per byte", f"{result.test['val_bits_per_byte']:.4f}"),
            ("train tokens/s", f"{result.extra['train_tokens_per_s']:,.0f}"),
            ("peak memory (MB)", f"{result.extra['peak_memory_mb']:,.0f}"),
        ]
        width = max(len(k) for k, _ in rows)
        print()
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
    return 0


def init_sections(init: str | None) -> dict | None:
    """With --init DIR: the model section defaults to DIR's model config, the tokenizer to DIR's."""
    if init is None:
        return None
    from pathlib import Path

    from moekit.models.pretrained import read_model_header

    header = read_model_header(init)
    tokenizer = str(Path(init).resolve()) if (Path(init) / "tokenizer.json").is_file() else "byte"
    return {"model": header["model"], "data": {"tokenizer": tokenizer}}


def _fit(args: argparse.Namespace):
    import os

    from moekit.train.lm import fit

    parallelism = None
    if args.expert_parallel is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from moekit.train.lm_parallel import ExpertParallel

        parallelism = ExpertParallel(args.expert_parallel or 1)

    def run_fit(config, out, mode):
        import torch.distributed as dist

        try:
            return fit(config, out, mode=mode, stop_at_step=args.stop_at_step, parallelism=parallelism)
        finally:
            if parallelism is not None and dist.is_initialized():
                dist.destroy_process_group()

    return run_fit
