"""`moekit train seqrec`: SASRec or FAME next-item recommendation with leave-one-out evaluation."""

from __future__ import annotations

import argparse

HELP = ("train SASRec or FAME for next-item recommendation on your interactions (--data FILE) or Beauty / "
        "MovieLens, and report test HR/NDCG/MRR")
TUNE_MALLOC = True  # see moekit.cli.MALLOC_TUNABLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.commands.shared import add_train_arguments
    from moekit.train.seqrec import SeqRecConfig

    add_train_arguments(parser, SeqRecConfig, "seqrec",
                        aliases={"model": "model.architecture", "eval": "train.eval_protocol", "data": "data.path"})


def run(args: argparse.Namespace) -> int:
    from moekit.commands.shared import print_test_summary, train_runs
    from moekit.train.seqrec import SeqRecConfig, fit

    results = train_runs(args, "seqrec", SeqRecConfig, fit)
    first = results[0]
    data = first.extra["data"]
    print(f"\n{data['name']}: {data['users']:,} users, {data['items']:,} items, "
          f"{data['interactions']:,} interactions; {first.extra['protocol']}")
    for result in results:
        print(f"{result.out}: best epoch {result.best_epoch} of {len(result.history)}")
    print_test_summary(results, "test" if "SAMPLED" not in first.extra["protocol"] else "test (SAMPLED 100 negatives)")
    return 0
