"""`moekit train seqrec`: SASRec or FAME next-item recommendation with leave-one-out evaluation."""

from __future__ import annotations

import argparse

HELP = "train SASRec or FAME for next-item recommendation (Beauty, MovieLens) and report test HR/NDCG/MRR"
TUNE_MALLOC = True  # see moekit.cli.MALLOC_TUNABLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.data.sequences import DATASETS

    parser.add_argument("--dataset", choices=DATASETS, default="beauty")
    parser.add_argument("--data-dir", default=None,
                        help="the dataset's folder (e.g. ../shared/data/amazon-beauty); "
                        "default $MOEKIT_DATA/<folder>")
    parser.add_argument("--model", choices=["sasrec", "fame"], default="sasrec")
    parser.add_argument("--loss", choices=["ce", "bce"], default="ce",
                        help="ce: full softmax over all items; bce: one sampled negative (SASRec paper)")
    parser.add_argument("--min-rating", type=float, default=None, help="MovieLens: keep ratings >= this")
    parser.add_argument("--core", type=int, default=None, help="k-core (default 0 Beauty, 5 MovieLens)")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=None,
                        help="attention heads (default: 4 for SASRec, 2 for FAME, each model's best on Beauty)")
    parser.add_argument("--positions", choices=["end", "start"], default="end",
                        help="position index counted back from the newest item (SASRec paper) or from the "
                        "oldest item in the window (RecBole)")
    parser.add_argument("--experts", type=int, default=4, help="FAME: query experts per head")
    parser.add_argument("--head-mixing", choices=["logits", "probability"], default="logits",
                        help="FAME: mix the heads' item scores, or their softmax distributions (--loss ce)")
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10, help="epochs without better validation NDCG@10")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lr-decay", type=float, default=None,
                        help="multiply the learning rate by this after 2 epochs without a better validation "
                             "NDCG@10 (default: constant)")
    parser.add_argument("--eval", dest="eval_protocol", choices=["full", "sampled"], default="full",
                        help="full: rank all items (history masked); "
                        "sampled: the SASRec paper's 100 negatives")
    parser.add_argument("--valid-users", type=int, default=None, help="validate on a random subset of users")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds: mean ± std")
    parser.add_argument("--out", default="runs/seqrec", help="checkpoint and metrics folder")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from moekit.data.sequences import load_sequences
    from moekit.train.seqrec import SeqRecTrainConfig, train

    seeds = args.seeds or [args.seed]
    data = load_sequences(args.dataset, args.data_dir, min_rating=args.min_rating, core=args.core)
    print(data.summary())
    tests = []
    for seed in seeds:
        out = Path(args.out) / f"seed{seed}" if len(seeds) > 1 else Path(args.out)
        cfg = SeqRecTrainConfig(
            dataset=args.dataset, data_dir=args.data_dir, min_rating=args.min_rating, core=args.core,
            model=args.model, loss=args.loss, max_len=args.max_len, hidden=args.hidden,
            num_layers=args.layers, num_heads=args.heads, positions=args.positions, num_experts=args.experts,
            head_mixing=args.head_mixing,
            dropout=args.dropout, attn_dropout=args.dropout, epochs=args.epochs, patience=args.patience,
            batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
            eval_protocol=args.eval_protocol, valid_users=args.valid_users, threads=args.threads, seed=seed,
            out_dir=str(out))
        result = train(cfg, data)
        tests.append(result["test"])
        print(f"seed {seed}: best epoch {result['best_epoch']} of {result['epochs_run']}; checkpoint {out}")
    print(f"\ntest ({'SAMPLED 100 negatives' if args.eval_protocol == 'sampled' else 'full ranking'}), "
          f"{args.model}, {len(seeds)} seed(s):")
    for k in (5, 10, 20):
        cells = []
        for m in ("HR", "NDCG", "MRR"):
            v = [t[f"{m}@{k}"] for t in tests]
            cells.append(f"{m}@{k} {np.mean(v):.4f}" + (f" ± {np.std(v, ddof=1):.4f}" if len(v) > 1 else ""))
        print("  " + "   ".join(cells))
    return 0
