"""`moekit generate`: sample text from a trained (or imported) language model, streamed token by token."""

from __future__ import annotations

import argparse

HELP = "generate text from a trained language model (KV cache; temperature, top-k, top-p)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="RUN",
                        help="a run folder, a step checkpoint or a model folder (imported, upcycled)")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import math
    import sys

    import torch

    from moekit.data.text import StreamDecoder
    from moekit.train.lm import load_run
    from moekit.train.loop import seed_everything

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0 (got {args.max_new_tokens})")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a number >= 0 (got {args.temperature})")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (got {args.top_k}; 0 = all tokens)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (got {args.top_p})")
    generator = seed_everything(args.seed)
    loaded = load_run(args.ckpt, args.device)
    if loaded.tokenizer is None:
        raise ValueError(f"{loaded.path} has no tokenizer.json: cannot encode the prompt")
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    device = next(model.parameters()).device
    if device.type != "cpu":
        generator = torch.Generator(device).manual_seed(args.seed)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    sys.stdout.write(args.prompt)
    decoder = StreamDecoder(tokenizer)
    for token_B in model.generate(prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                                  args.top_p, generator):
        sys.stdout.write(decoder.push(int(token_B[0])))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
