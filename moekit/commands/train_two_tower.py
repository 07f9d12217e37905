"""`moekit train two-tower`: train a two-tower retrieval model on MovieLens and export its item index."""

from __future__ import annotations

import argparse

HELP = "train a two-tower retrieval model (MLP or MoE towers) on your interactions (--data FILE) or MovieLens"
TUNE_MALLOC = True  # see moekit.cli.MALLOC_TUNABLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.commands.shared import add_train_arguments
    from moekit.train.retrieval import TwoTowerRunConfig

    add_train_arguments(parser, TwoTowerRunConfig, "two-tower", aliases={"data": "data.path"})


def run(args: argparse.Namespace) -> int:
    from moekit.commands.shared import print_test_summary, train_runs
    from moekit.train.retrieval import TwoTowerRunConfig, fit

    results = train_runs(args, "two-tower", TwoTowerRunConfig, fit)
    first = results[0]
    print(f"\n{first.extra['split']} users: {first.extra['num_eval_users']}; training {first.train_seconds:.0f} s")
    print_test_summary(results, f"{first.extra['split']} Recall / Hit @ K, history excluded")
    for result in results:
        print(f"run folder: {result.out}")
    return 0
