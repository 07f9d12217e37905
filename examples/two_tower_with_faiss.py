"""A two-tower retrieval model on your interaction log, served with a FAISS index.

    python examples/two_tower_with_faiss.py --data log.csv [--items items.csv] [--out runs/tt]

Trains with in-batch softmax, exports the item embeddings, builds an exact inner-product index
(`kind="hnsw"` for an approximate one on large catalogues) and answers a user's top-k query,
leaving out what they already have.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import torch

import moekit
from moekit.train.retrieval import (
    ItemIndex,
    RetrievalDataConfig,
    TwoTowerOptions,
    TwoTowerRunConfig,
    TwoTowerTrainSettings,
    fit,
    load_run_data,
    recent_history,
)


def example_log(folder: Path) -> str:
    rows = [{"user": f"u{u}", "item": f"i{(u * 3 + j) % 30}", "timestamp": j} for u in range(80) for j in range(10)]
    pd.DataFrame(rows).to_csv(folder / "log.csv", index=False)
    return str(folder / "log.csv")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data")
    parser.add_argument("--items")
    parser.add_argument("--out", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--ks", default="5,10", help="Recall/Hit cut-offs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = Path(args.out or tempfile.mkdtemp(prefix="two-tower-"))
    config = TwoTowerRunConfig(
        model=TwoTowerOptions(tower="moe", dim=16, hidden=32, ffn_hidden=32, history_len=8),
        data=RetrievalDataConfig(path=args.data or example_log(folder), items=args.items),
        train=TwoTowerTrainSettings(epochs=args.epochs, batch_size=64, ks=tuple(int(k) for k in args.ks.split(",")),
                                    seed=args.seed, progress=False))
    result = fit(config, folder / "run")
    print("test:", result.test)

    run = moekit.load(folder / "run")
    ml, data = load_run_data(run)
    index = ItemIndex(run.item_embeddings.numpy())            # exact maximum inner product
    user = ml.user_index(ml.user_ids[0])
    with torch.no_grad():
        query = run.model.user_forward(torch.tensor([user]), recent_history(data, user)[None]).embedding.numpy()
    seen = data.seen[user].nonzero().flatten().numpy()
    scores, ids = index.search(query, 5, exclude=[seen])
    for score, item in zip(scores[0], ids[0], strict=True):
        print(f"{score:+.3f}  {ml.titles[item]}")
    return result.test


if __name__ == "__main__":
    main()
