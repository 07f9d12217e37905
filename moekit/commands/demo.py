"""`moekit demo`: the main job, on data shipped with moekit (see moekit/demo.py)."""

from __future__ import annotations

import argparse

HELP = "train a small MoE LM vs its dense twin and MMoE vs Shared-Bottom on shipped data; write a report"
TUNE_MALLOC = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, metavar="DIR", help="the run folder (default: runs/demo-<date>-<time>)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every step (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from moekit.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress,
                        threads=args.threads))
    return 0
