"""`moekit eval <family> --ckpt RUN`: the test metrics of a finished run, computed again from its folder."""

from __future__ import annotations

import argparse

HELP = {
    "mtl": "evaluate a trained multi-task ranker on its test split (AUC, log-loss / RMSE, MAE per task)",
    "seqrec": "evaluate a trained sequential recommender on its test users (HR / NDCG / MRR @ 5, 10, 20)",
    "two-tower": "evaluate a trained two-tower model on its held-out interactions (Recall / Hit @ K)",
    "dqn": "evaluate a trained DQN recommender on its held-out simulated users (return, session length, hits)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.commands.shared import add_eval_arguments

    add_eval_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from moekit.train.families import expect_family, family_module
    from moekit.train.loop import seed_everything

    family = args.command_words[-1]
    expect_family(args.ckpt, family, f"moekit eval {family}")
    seed_everything(args.seed)
    metrics = family_module(family).evaluate_run(args.ckpt, device=args.device, data_dir=args.data_dir)
    saved_path = Path(args.ckpt) / "results.json"
    saved = json.loads(saved_path.read_text()).get("test", {}) if saved_path.is_file() else {}
    width = max(len(k) for k in metrics)
    print(f"{args.ckpt}: test metrics" + (" (results.json beside)" if saved else ""))
    for name, value in metrics.items():
        reported = saved.get(name)
        same = "" if reported is None else \
            ("  = reported" if _same(value, reported) else f"  (reported {reported:.4f})")
        print(f"  {name:<{width}}  {value:.4f}{same}")
    return 0


def _same(a: float, b: float) -> bool:
    import math

    return (math.isnan(a) and math.isnan(b)) or a == b
