"""`moekit eval lm`: validation loss, perplexity and bits per byte of a trained language model."""

from __future__ import annotations

import argparse

HELP = "evaluate a trained language model (loss, perplexity, bits per byte)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="RUN",
                        help="a run folder, a step checkpoint or a model folder (imported, upcycled)")
    parser.add_argument("--text", help="evaluate on this text file instead of the run's validation split")
    parser.add_argument("--data-dir", help="the run's text, read from here instead (its validation split)")
    parser.add_argument("--max-tokens", type=int, default=0, help="score at most this many tokens (0 = all)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: the run's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0, help="random seed (evaluation itself is deterministic)")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import math

    import numpy as np

    from moekit.data.text import TokenData, read_text_source
    from moekit.train.families import expect_family
    from moekit.train.lm import autocast_context, bits_per_byte, build_data, evaluate, load_run
    from moekit.train.loop import seed_everything

    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0 (got {args.max_tokens})")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1 (got {args.batch_size})")
    seed_everything(args.seed)
    expect_family(args.ckpt if not _is_step(args.ckpt) else _run_of(args.ckpt), "lm", "moekit eval lm")
    loaded = load_run(args.ckpt, args.device)
    model, config = loaded.model, loaded.config
    block = model.config.block_size
    if args.text:
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.path} has no tokenizer.json to encode --text with")
        text = read_text_source(args.text)
        ids = np.asarray(loaded.tokenizer.encode(text), dtype=np.int64)
        if len(ids) <= block:
            raise ValueError(f"--text {args.text} encodes to {len(ids)} tokens, fewer than the model's context + 1 "
                             f"= {block + 1}")
        data = TokenData(train=ids[:0], val=ids, tokenizer=loaded.tokenizer, val_bytes=len(text.encode("utf-8")))
        source, dtype, batch = args.text, "auto", args.batch_size or 32
    else:
        if config is None:
            raise ValueError(f"{loaded.path} is a model folder without a training config: pass --text FILE")
        if args.data_dir:
            config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=args.data_dir))
        data = build_data(config, loaded.path)
        source = f"{config.data.path} (last {config.data.val_fraction:.0%})"
        dtype, batch = config.train.dtype, args.batch_size or config.train.batch_size
    device = next(model.parameters()).device
    autocast = lambda: autocast_context(device, dtype)  # noqa: E731
    loss, tokens = evaluate(model, data, block, batch, args.max_tokens, autocast)
    if not math.isfinite(loss):
        raise ValueError(f"the loss on {source} is {loss}: the weights in {loaded.weights} are not finite")
    rows = [("checkpoint", str(loaded.weights)), ("text", source), ("tokens scored", f"{tokens:,}"),
            ("loss (nats/token)", f"{loss:.4f}"), ("perplexity", f"{math.exp(loss):.3f}"),
            ("bits per byte", f"{bits_per_byte(loss, tokens, data):.4f}")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _is_step(path: str) -> bool:
    from pathlib import Path

    return (Path(path) / "trainer_state.json").is_file() and not (Path(path) / "config.json").is_file()


def _run_of(step_folder: str) -> str:
    from pathlib import Path

    return str(Path(step_folder).parent.parent)
