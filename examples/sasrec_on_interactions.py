"""SASRec on your own interaction log: user, item, time columns (+ an optional items file with titles).

    python examples/sasrec_on_interactions.py --data log.csv --user-column uid --item-column sku \
        --time-column ts [--items items.csv] [--out runs/sasrec]

Without --data it makes a small log where each user walks through items in order.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

import moekit
from moekit.train.seqrec import (
    SeqRecConfig,
    SeqRecModelOptions,
    SeqRecTrainSettings,
    SequenceDataConfig,
    fit,
    recommend,
)


def example_log(folder: Path) -> tuple[str, str]:
    rows = [{"user": f"u{u}", "item": f"i{(u + j) % 15}", "timestamp": j} for u in range(60) for j in range(8)]
    pd.DataFrame(rows).to_csv(folder / "log.csv", index=False)
    pd.DataFrame({"item": [f"i{k}" for k in range(15)], "title": [f"Item number {k}" for k in range(15)],
                  "category": ["even" if k % 2 == 0 else "odd" for k in range(15)]}).to_csv(folder / "items.csv",
                                                                                           index=False)
    return str(folder / "log.csv"), str(folder / "items.csv")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data")
    parser.add_argument("--items")
    parser.add_argument("--user-column", default="user")
    parser.add_argument("--item-column", default="item")
    parser.add_argument("--time-column", default="timestamp")
    parser.add_argument("--out", default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = Path(args.out or tempfile.mkdtemp(prefix="sasrec-"))
    data, items = (args.data, args.items) if args.data else example_log(folder)

    config = SeqRecConfig(
        model=SeqRecModelOptions(architecture="sasrec", hidden=32, max_len=20),
        data=SequenceDataConfig(path=data, items=items, user_column=args.user_column, item_column=args.item_column,
                                time_column=args.time_column),
        train=SeqRecTrainSettings(epochs=args.epochs, seed=args.seed, progress=False))
    result = fit(config, folder / "run")
    print("test:", {k: round(v, 4) for k, v in result.test.items() if k.endswith("@10")})

    run = moekit.load(folder / "run")
    titles, ids = run.items["titles"], run.items["raw_item_ids"]
    history = [1, 2, 3]  # internal item ids (1..num_items) of what a user just did
    for item, score in recommend(run.model, history, k=3):
        print(f"{score:7.3f}  {ids[item]}  {titles.get(str(item), '')}")
    return result.test


if __name__ == "__main__":
    main()
