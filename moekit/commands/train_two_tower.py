"""`moekit train two-tower`: train a two-tower retrieval model on MovieLens and export its item index."""

from __future__ import annotations

import argparse

HELP = "train a two-tower retrieval model (MLP or MoE towers) on MovieLens"
TUNE_MALLOC = True  # see moekit.cli.MALLOC_TUNABLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="MovieLens folder (default: $MOEKIT_DATA/<dataset>)")
    parser.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m"])
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--split", default="test", choices=["test", "valid"],
                        help="evaluate on the last rating per user (test) or the one before it (valid)")
    parser.add_argument("--tower", default="mlp", choices=["mlp", "moe"])
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--pooling", default="mean", choices=["mean", "attention"])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--history-len", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--no-logq", action="store_true", help="turn off the logQ popularity correction")
    parser.add_argument("--extra-negatives", type=int, default=0, help="uniform random negatives per batch")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100], help="Recall/Hit cut-offs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.train.retrieval import RetrievalTrainConfig, train_two_tower

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RetrievalTrainConfig(
        data_dir=args.data_dir, dataset=args.dataset, split=args.split, out_dir=args.out, seed=args.seed,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, logq=not args.no_logq,
        extra_negatives=args.extra_negatives, ks=tuple(args.ks),
        model={"tower": args.tower, "num_experts": args.num_experts, "top_k": args.top_k,
               "pooling": args.pooling, "dim": args.dim, "history_len": args.history_len,
               "temperature": args.temperature},
    )
    _, report = train_two_tower(cfg)
    print(f"{args.split} users: {report['num_eval_users']}, training {report['train_seconds']:.0f} s")
    print(" ".join(f"{k:>10}" for k in report["metrics"]))
    print(" ".join(f"{v:>10.4f}" for v in report["metrics"].values()))
    print(f"checkpoint: {args.out}")
    return 0
