"""MMoE on your own DataFrame: two tasks, a train/validation/test split, then scores for new rows.

    python examples/mmoe_on_a_dataframe.py --data my.csv --tasks click,purchase [--out runs/mmoe]

Without --data it makes a small table whose two tasks depend on different features.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

import moekit
from moekit.models.multitask import MultiTaskOptions
from moekit.train.mtl import MTLConfig, MTLDataConfig, MTLTrainSettings, fit


def example_table(n: int = 4000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"user": [f"u{i}" for i in range(n)], "country": rng.choice(["fr", "de", "us", "jp"], n),
                          "age": rng.normal(40, 10, n).round(1), "device": rng.choice(["ios", "android"], n)})
    frame["click"] = (frame.country.isin(["fr", "de"]) ^ (rng.random(n) < 0.1)).astype(int)
    frame["purchase"] = ((frame.age > 40) ^ (rng.random(n) < 0.1)).astype(int)
    return frame


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a CSV, TSV or Parquet file (default: a generated table)")
    parser.add_argument("--tasks", default="click,purchase", help="label columns, comma-separated")
    parser.add_argument("--id-column", default="user")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="mmoe-")) / "run"
    data = args.data
    if data is None:
        data = str(out.parent / "table.csv")
        example_table(seed=args.seed).to_csv(data, index=False)

    config = MTLConfig(
        model=MultiTaskOptions(architecture="mmoe", num_experts=4, expert_hidden=32, expert_dim=16, tower_widths=(16,)),
        data=MTLDataConfig(path=data, tasks=tuple(args.tasks.split(",")), id_column=args.id_column),
        train=MTLTrainSettings(epochs=args.epochs, patience=5, batch_size=256, lr=3e-3, seed=args.seed,
                               progress=False))
    result = fit(config, out)
    print("test:", {k: round(v, 4) for k, v in result.test.items()})

    run = moekit.load(out)                   # the model, its config and its feature spec
    new_rows = pd.read_csv(data).head(5)      # (any rows with the training columns; labels not needed)
    print(run.predict(new_rows))             # a column per task: probabilities for binary tasks
    return result.test


if __name__ == "__main__":
    main()
