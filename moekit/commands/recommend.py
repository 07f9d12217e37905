"""`moekit recommend`: top-k next items for one user from a `moekit train seqrec` run."""

from __future__ import annotations

import argparse

HELP = "recommend the next items for a user from a trained sequential model (titles where available)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="RUN", help="a `moekit train seqrec` run folder")
    parser.add_argument("--user", required=True, help="user id as in the dataset's files")
    parser.add_argument("-k", type=int, default=10, help="how many items (default: 10)")
    parser.add_argument("--history", type=int, default=5, help="how many of the user's latest items to show "
                        "(default: 5)")
    parser.add_argument("--data-dir", default=None, help="dataset folder (default: the one the run was trained on)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0, help="unused: inference is deterministic")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from moekit.train.families import expect_family
    from moekit.train.seqrec import load_data, load_run, recommend

    if args.k < 1:
        raise ValueError(f"-k must be >= 1 (got {args.k})")
    if args.history < 0:
        raise ValueError(f"--history must be >= 0 (got {args.history})")
    expect_family(args.ckpt, "seqrec", "moekit recommend")
    loaded = load_run(args.ckpt, args.device)
    if loaded.config is None:
        raise ValueError(f"{args.ckpt} holds a model without its data config: cannot look up user histories")
    data_config = loaded.config.data
    if args.data_dir:
        data_config = dataclasses.replace(data_config, data_dir=args.data_dir)
    data = load_data(data_config)
    model = loaded.model
    if data.num_items != model.config.num_items:
        raise ValueError(f"the data has {data.num_items} items but the run was trained on {model.config.num_items}: "
                         f"pass the data it was trained on (--data-dir)")
    by_raw = {str(u): row for row, u in enumerate(data.raw_user_ids)}
    if str(args.user) not in by_raw:
        ids = sorted(data.raw_user_ids, key=lambda u: (len(str(u)), str(u)))
        raise ValueError(f"user {args.user} is not in {data.name} (after preprocessing); ids run "
                         f"{ids[0]}..{ids[-1]}")
    history = data.sequences[by_raw[str(args.user)]]

    def describe(item: int) -> str:
        title = data.item_titles.get(item, "")
        cats = ", ".join(data.item_categories.get(item, ())[:4])
        return f"{data.raw_item_ids[item]!s:>8}  {title}" + (f"  [{cats}]" if cats else "")

    shown = history[-args.history:] if args.history else []
    print(f"user {args.user}: {len(history)} items in the history; the latest {len(shown)}, most recent last:")
    for item in shown:
        print("           " + describe(item))
    picks = recommend(model, history, args.k)
    print(f"top {len(picks)} next items ({loaded.config.model.architecture}, history excluded):")
    print(f"{'rank':>4} {'score':>8} {'item':>8}  title")
    for rank, (item, score) in enumerate(picks, 1):
        print(f"{rank:>4} {score:8.3f} {describe(item)}")
    return 0
