"""`moekit retrieve`: top-k movies for one user from a two-tower run, through the FAISS index."""

from __future__ import annotations

import argparse

HELP = "recommend the top-k items for a user with a trained two-tower model (FAISS index)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="RUN", help="a `moekit train two-tower` run folder")
    parser.add_argument("--user", required=True, help="user id as in the data's files")
    parser.add_argument("-k", type=int, default=50, help="how many movies (default: 50)")
    parser.add_argument("--data-dir", help="the data (default: the files the run was trained on)")
    parser.add_argument("--index", default="flat", choices=["flat", "hnsw"], help="exact (flat) or HNSW")
    parser.add_argument("--include-seen", action="store_true", help="do not exclude the user's rated movies")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0, help="unused: retrieval is deterministic")


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.train.families import expect_family
    from moekit.train.retrieval import ItemIndex, load_run, load_run_data, recent_history

    if args.k < 1:
        raise ValueError(f"-k must be >= 1 (got {args.k})")
    expect_family(args.ckpt, "two-tower", "moekit retrieve")
    loaded = load_run(args.ckpt, "cpu")
    ml, data = load_run_data(loaded, args.data_dir)
    user = ml.user_index(args.user)
    if args.k > data.num_items:
        raise ValueError(f"-k {args.k} is more than the {data.num_items} items in the catalogue")
    with torch.no_grad():
        query = loaded.model.user_forward(torch.tensor([user]), recent_history(data, user)[None]).embedding.numpy()
    exclude = None if args.include_seen else [data.seen[user].nonzero().flatten().numpy()]
    scores, ids = ItemIndex(loaded.item_embeddings.numpy(), kind=args.index).search(query, args.k, exclude=exclude)
    seen = int(data.seen[user].sum())
    print(f"user {args.user}: {seen} items in the training data"
          f"{'' if args.include_seen else ' (excluded)'}; top {args.k}:")
    print(f"{'rank':>4}  {'score':>6}  title")
    for rank, (item, score) in enumerate(zip(ids[0], scores[0], strict=True), start=1):
        tags = ", ".join(ml.genre_names[g] for g in ml.genres[item].nonzero()[0][:4])
        print(f"{rank:>4}  {score:+.3f}  {ml.titles[item]}" + (f"  [{tags}]" if tags else ""))
    return 0
