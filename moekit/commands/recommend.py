"""`moekit recommend`: top-k next items for one user from a `moekit train seqrec` checkpoint."""

from __future__ import annotations

import argparse

HELP = "recommend the next items for a user from a trained sequential model (titles where available)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="the --out folder of `moekit train seqrec`")
    parser.add_argument("--user", type=int, required=True, help="user id as in the dataset's files")
    parser.add_argument("-k", type=int, default=10, help="how many items")
    parser.add_argument("--data-dir", default=None, help="dataset folder (default: the training one)")
    parser.add_argument("--seed", type=int, default=0, help="unused: inference is deterministic")


def run(args: argparse.Namespace) -> int:
    from moekit.data.sequences import load_sequences
    from moekit.train.seqrec import load_checkpoint, recommend

    if args.k < 1:
        raise ValueError(f"-k must be >= 1 (got {args.k})")
    model, meta = load_checkpoint(args.ckpt)
    tc = meta["train_config"]
    data = load_sequences(tc["dataset"], args.data_dir or tc["data_dir"], min_rating=tc["min_rating"],
                          core=tc["core"])
    if data.num_items != model.config.num_items:
        raise ValueError(f"the data has {data.num_items} items but the checkpoint was trained on "
                         f"{model.config.num_items}: pass the same --data-dir/preprocessing as for training")
    try:
        row = data.raw_user_ids.index(args.user)
    except ValueError:
        raise ValueError(f"user {args.user} is not in {data.name} (after preprocessing); ids run "
                         f"{min(data.raw_user_ids)}..{max(data.raw_user_ids)}") from None
    history = data.sequences[row]

    def describe(item: int) -> str:
        title = data.item_titles.get(item, "")
        cats = ", ".join(data.item_categories.get(item, ())[:4])
        return f"{data.raw_item_ids[item]:>7}  {title}" + (f"  [{cats}]" if cats else "")

    print(f"user {args.user}: {len(history)} items; most recent last:")
    for item in history[-5:]:
        print("   " + describe(item))
    print(f"top {args.k} next items ({meta['model']}, history excluded):")
    for rank, (item, score) in enumerate(recommend(model, history, args.k), 1):
        print(f"{rank:>3} {score:8.3f} {describe(item)}")
    return 0
