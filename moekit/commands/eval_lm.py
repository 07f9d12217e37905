"""`moekit eval lm`: validation loss, perplexity and bits per byte of a trained language model."""

from __future__ import annotations

import argparse

HELP = "evaluate a trained language model (loss, perplexity, bits per byte)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="run folder or checkpoint folder")
    parser.add_argument("--text", help="evaluate on this text file instead of the run's validation split")
    parser.add_argument("--max-tokens", type=int, default=0, help="score at most this many tokens (0 = all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="random seed (evaluation itself\n"
                        "is deterministic)")


def run(args: argparse.Namespace) -> int:
    import math

    import numpy as np

    from moekit.data.text import TokenData, read_text_source
    from moekit.train.lm import autocast_context, bits_per_byte, build_data, evaluate, load_trained_lm
    from moekit.train.reproducibility import seed_everything

    seed_everything(args.seed)
    model, config, tokenizer, ckpt_dir = load_trained_lm(args.ckpt, args.device)
    if args.text:
        text = read_text_source(args.text)
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        data = TokenData(train=ids[:0], val=ids, tokenizer=tokenizer, val_bytes=len(text.encode("utf-8")))
        source = args.text
    else:
        data = build_data(config)
        source = f"{config.data.path} (last {config.data.val_fraction:.0%})"
    device = next(model.parameters()).device
    autocast = lambda: autocast_context(device, config.dtype)  # noqa: E731
    loss, tokens = evaluate(model, data, config.model.block_size, args.batch_size, args.max_tokens, autocast)
    rows = [("checkpoint", str(ckpt_dir)), ("text", source), ("tokens scored", f"{tokens:,}"),
            ("loss (nats/token)", f"{loss:.4f}"), ("perplexity", f"{math.exp(loss):.3f}"),
            ("bits per byte", f"{bits_per_byte(loss, tokens, data):.4f}")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
