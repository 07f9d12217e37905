"""`moekit retrieve`: top-k movies for one user from a two-tower checkpoint, through the FAISS index."""

from __future__ import annotations

import argparse

HELP = "recommend the top-k movies for a user with a trained two-tower checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="folder written by `moekit train two-tower`")
    parser.add_argument("--user", type=int, required=True, help="raw MovieLens user id")
    parser.add_argument("-k", type=int, default=50)
    parser.add_argument("--data-dir", help="MovieLens folder (default: the checkpoint's training data)")
    parser.add_argument("--index", default="flat", choices=["flat", "hnsw"], help="exact (flat) or HNSW")
    parser.add_argument("--include-seen", action="store_true", help="do not exclude the user's rated movies")
    parser.add_argument("--seed", type=int, default=0, help="unused: retrieval is deterministic")


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.data.movielens import load_movielens
    from moekit.train.retrieval import ItemIndex, load_two_tower, prepare_retrieval_data, recent_history

    if args.k < 1:
        raise ValueError(f"-k must be >= 1 (got {args.k})")
    model, saved, items = load_two_tower(args.ckpt)
    train = saved["train"]
    ml = load_movielens(args.data_dir or train["data_dir"], train["dataset"])
    if ml.num_items != model.config.num_items or ml.num_users != model.config.num_users:
        raise ValueError(f"{ml.name} at {args.data_dir or train['data_dir']} has {ml.num_users} users and "
                         f"{ml.num_items} movies; the checkpoint expects {model.config.num_users} and "
                         f"{model.config.num_items}")
    user = ml.user_index(args.user)
    data = prepare_retrieval_data(ml, train["split"], model.config.history_len, model.config.num_year_buckets)
    history = recent_history(data, user)
    with torch.no_grad():
        query = model.user_forward(torch.tensor([user]), history[None]).embedding.numpy()
    exclude = None if args.include_seen else [data.seen[user].nonzero().flatten().numpy()]
    scores, ids = ItemIndex(items.numpy(), kind=args.index).search(query, args.k, exclude=exclude)
    seen = int(data.seen[user].sum())
    print(f"user {args.user}: {seen} rated movies in the training data"
          f"{'' if args.include_seen else ' (excluded)'}; top {args.k}:")
    for rank, (item, score) in enumerate(zip(ids[0], scores[0], strict=True), start=1):
        print(f"{rank:>4}  {score:+.3f}  {ml.titles[item]}")
    return 0
